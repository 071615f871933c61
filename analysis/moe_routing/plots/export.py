"""Static export: PNG / SVG / PDF of plotly figures (kaleido 1.x driving a local Chromium) and matplotlib ones.

kaleido 1.x renders in a real Chrome/Chromium. It looks for ``$BROWSER_PATH`` first and then for
``chromium``/``google-chrome`` on ``PATH``; :func:`find_browser` does the same search (plus Debian's
``/usr/bin/chromium``) and sets ``BROWSER_PATH`` so kaleido never tries to download one. Without a browser the
error says how to install one (``apt-get install -y chromium`` on Debian/Ubuntu).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from ..errors import BrowserNotFoundError, PlotError, PlotInputError

FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp")
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_DEBIAN = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_browser() -> str:
    """Path of a Chrome/Chromium executable; sets ``BROWSER_PATH`` for kaleido. Raises if there is none."""
    env = os.environ.get("BROWSER_PATH")
    if env and os.access(env, os.X_OK):
        return env
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            os.environ["BROWSER_PATH"] = path
            return path
    for path in _DEBIAN:
        if os.access(path, os.X_OK):
            os.environ["BROWSER_PATH"] = path
            return path
    hint = f" (BROWSER_PATH={env!r} is not executable)" if env else ""
    raise BrowserNotFoundError(
        f"static export needs Chrome or Chromium and none was found{hint}. Install it with "
        "`apt-get install -y chromium` (Debian/Ubuntu) or set BROWSER_PATH to a Chrome executable."
    )


def _target(path: str | Path, format: str | None) -> tuple[Path, str]:
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise PlotError(
            f"cannot export to {fmt!r}; use one of {', '.join(FORMATS)} (from the path's suffix)."
        )
    if not path.suffix:
        path = path.with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, fmt


def _plotly_size(fig: go.Figure, width: int | None, height: int | None) -> tuple[int, int]:
    return int(width or fig.layout.width or 1000), int(height or fig.layout.height or 600)


def save_figure(
    fig: Any,
    path: str | Path,
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 2.0,
    format: str | None = None,
) -> Path:
    """Write ``fig`` (plotly or matplotlib Figure) to ``path``; the format comes from the suffix or ``format``.

    Plotly figures go through kaleido (``width``/``height`` in CSS pixels, default: the figure's own or
    1000x600; ``scale`` multiplies raster resolution). Matplotlib figures use ``savefig`` (``scale`` x 100 dpi).
    Parent folders are created. Returns the path written.
    """
    path, fmt = _target(path, format)
    if isinstance(fig, go.Figure):
        find_browser()
        w, h = _plotly_size(fig, width, height)
        fig.write_image(str(path), format=fmt, width=w, height=h, scale=scale)
    elif hasattr(fig, "savefig"):
        fig.savefig(path, format="jpeg" if fmt == "jpg" else fmt, dpi=100 * scale, bbox_inches="tight")
    else:
        raise PlotInputError(f"save_figure takes a plotly or matplotlib Figure, got {type(fig).__name__}.")
    return path


def save_figures(
    figures: dict[str, Any],
    out_dir: str | Path,
    *,
    formats: tuple[str, ...] = ("png",),
    scale: float = 2.0,
) -> list[Path]:
    """Save ``{name: fig}`` as ``out_dir/name.<fmt>`` for every format; plotly ones share one browser.

    Returns the paths written, in order.
    """
    out: list[Path] = []
    batch: list[tuple[go.Figure, Path, str]] = []
    for name, fig in figures.items():
        for fmt in formats:
            path, fmt_ = _target(Path(out_dir) / f"{name}.{fmt}", None)
            if isinstance(fig, go.Figure):
                batch.append((fig, path, fmt_))
            else:
                save_figure(fig, path, scale=scale)
            out.append(path)
    if batch:
        import plotly.io as pio

        find_browser()
        sizes = [_plotly_size(f, None, None) for f, _, _ in batch]
        pio.write_images(
            [f for f, _, _ in batch],
            [str(p) for _, p, _ in batch],
            format=[fmt for _, _, fmt in batch],
            width=[w for w, _ in sizes],
            height=[h for _, h in sizes],
            scale=scale,
        )
    return out
