"""Static export through kaleido + a local Chromium, and of matplotlib figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_routing.errors import PlotError, PlotInputError
from moe_routing.plots import (
    BrowserNotFoundError,
    expert_load_heatmap,
    find_browser,
    save_figure,
    save_figures,
)
from moe_routing.plots import export as export_mod
from moe_routing.plots.load import expert_load_heatmap_static

from ._synth import load_frame, make_trace

MAGIC = {"png": b"\x89PNG", "svg": b"<svg", "pdf": b"%PDF"}


def _browser() -> str:
    """The browser; skip without one, except on CI (``CI=true``), where a missing browser is a failure."""
    try:
        return find_browser()
    except BrowserNotFoundError as exc:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but the static-export checks cannot run: {exc}", pytrace=False)
        pytest.skip(str(exc))


def test_plotly_png_svg_pdf(tmp_path: Path) -> None:
    _browser()
    fig = expert_load_heatmap(load_frame(make_trace()))
    paths = save_figures({"load": fig}, tmp_path / "figs", formats=("png", "svg", "pdf"), scale=1)
    assert [p.suffix for p in paths] == [".png", ".svg", ".pdf"]
    for p in paths:
        head = p.read_bytes()[:400]
        assert MAGIC[p.suffix[1:]] in head, p
        assert p.stat().st_size > 3000
    png = save_figure(fig, tmp_path / "one.png", width=500, height=300, scale=1)
    from PIL import Image

    assert Image.open(png).size == (500, 300)


def test_matplotlib_and_bad_format(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    fig = expert_load_heatmap_static(load_frame(make_trace()))
    p = save_figure(fig, tmp_path / "sub" / "static.svg")
    assert b"<svg" in p.read_bytes()[:500]
    with pytest.raises(PlotError, match="cannot export to 'gif'"):
        save_figure(fig, tmp_path / "x.gif")
    with pytest.raises(PlotInputError):
        save_figure(object(), tmp_path / "x.png")


def test_missing_browser_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chrome")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(export_mod, "_DEBIAN", ())
    with pytest.raises(BrowserNotFoundError, match="apt-get install -y chromium"):
        find_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _browser()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        _browser()


def test_browser_not_found_error_lives_in_errors_and_the_old_names_still_work() -> None:
    from moe_routing import errors, plots

    assert errors.BrowserNotFoundError is plots.BrowserNotFoundError is export_mod.BrowserNotFoundError
    assert issubclass(errors.BrowserNotFoundError, errors.MoERoutingError)
