"""Static export through kaleido + a local Chromium, and of matplotlib figures."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    try:
        return find_browser()
    except BrowserNotFoundError as exc:
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
    with pytest.raises(ValueError, match="cannot export to 'gif'"):
        save_figure(fig, tmp_path / "x.gif")
    with pytest.raises(TypeError):
        save_figure(object(), tmp_path / "x.png")


def test_missing_browser_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chrome")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(export_mod, "_DEBIAN", ())
    with pytest.raises(BrowserNotFoundError, match="apt-get install -y chromium"):
        find_browser()
