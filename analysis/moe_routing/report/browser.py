"""Headless Chromium: a page's DOM after its scripts ran, screenshots, and a census of drawn plotly figures."""

from __future__ import annotations

from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from ..errors import ReportError

# --------------------------------------------------------------------------------------------- chromium
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _chromium(args: Sequence[str], page: Path, *, budget_ms: int, timeout: float, fragment: str = "") -> str:
    """Run headless Chromium on ``page`` (``#fragment`` appended when given) with extra ``args``; its stdout."""
    import subprocess
    import tempfile

    from ..plots.export import find_browser

    exe = find_browser()
    with tempfile.TemporaryDirectory(prefix="moe-chromium-") as profile:
        cmd = [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *args,
        ]
        proc = subprocess.run(
            [*cmd, Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        raise ReportError(f"chromium failed ({proc.returncode}) on {page}: {proc.stderr[-800:]}")
    return proc.stdout


def dump_dom(page: str | Path, *, budget_ms: int = 10000, timeout: float = 120, fragment: str = "") -> str:
    """The DOM of ``page`` (opened at ``#fragment`` when given) after its scripts ran (``--dump-dom``)."""
    return _chromium(["--dump-dom"], Path(page), budget_ms=budget_ms, timeout=timeout, fragment=fragment)


def screenshot(
    page: str | Path,
    png: str | Path,
    *,
    size: tuple[int, int] = (1400, 2000),
    budget_ms: int = 10000,
    timeout: float = 120,
    fragment: str = "",
) -> Path:
    """PNG screenshot of ``page`` (``size`` = window width, height in CSS pixels) by headless Chromium."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium(
        [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}"],
        Path(page),
        budget_ms=budget_ms,
        timeout=timeout,
        fragment=fragment,
    )
    if not png.exists():
        raise ReportError(f"chromium wrote no screenshot of {page}.")
    return png


class _FigureCensus(HTMLParser):
    """Counts, per plotly graph div, its ``svg.main-svg`` elements and drawn marks (traces, images, canvas)."""

    _VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict[str, Any]] = []
        self._stack: list[tuple[str, list[str]]] = []  # open elements inside the current figure

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if not self._stack:
            if tag == "div" and "plotly-graph-div" in cls:
                self.figures.append(
                    {"id": a.get("id"), "rendered": "js-plotly-plot" in cls, "main_svg": 0, "marks": 0}
                )
                self._stack.append((tag, cls))
            return
        fig = self.figures[-1]
        if tag == "svg" and "main-svg" in cls:
            fig["main_svg"] += 1
        elif self._is_mark(tag, cls, a, self._stack[-1][1]):
            fig["marks"] += 1
        if tag not in self._VOID:
            self._stack.append((tag, cls))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if self._stack and tag not in self._VOID and self._stack[-1][0] == tag:
            self._stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    @staticmethod
    def _is_mark(tag: str, cls: list[str], a: dict[str, str | None], parent: list[str]) -> bool:
        """A drawn element: WebGL canvas, heatmap image, bar/marker/line path, Sankey node."""
        if tag == "canvas":
            return True
        if tag == "image":
            return bool(a.get("href") or a.get("xlink:href"))
        if tag == "path":
            marked = any(c in cls for c in ("point", "js-line", "sankey-link")) or "point" in parent
            return bool((a.get("d") or "").strip()) and marked
        return tag == "rect" and "node-rect" in cls


def rendered_figures(dom: str) -> list[dict[str, Any]]:
    """One entry per plotly figure in a dumped DOM: ``id``, ``rendered``, ``main_svg`` and ``marks`` counts.

    A figure drew something when ``main_svg > 0`` and ``marks > 0`` (bars, markers, lines, heatmap images,
    Sankey nodes/links, WebGL canvases).
    """
    census = _FigureCensus()
    census.feed(dom)
    return census.figures


def screenshot_report(out_dir: str | Path = "report", *, size: tuple[int, int] = (1400, 2000)) -> list[Path]:
    """Screenshots of ``index.html`` and every rendered notebook page into ``out_dir/screenshots/``."""
    out = Path(out_dir)
    pages = [out / "index.html", *sorted(p for p in out.glob("*.html") if p.name != "index.html")]
    return [screenshot(p, out / "screenshots" / f"{p.stem}.png", size=size) for p in pages if p.exists()]


