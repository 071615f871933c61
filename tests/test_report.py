"""The report machinery: execute throwaway py:percent notebooks, render HTML, open it in headless Chromium.

The notebooks live in a temp folder (not notebooks/); screenshots go to ``<report>/screenshots/``.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import nbformat
import pytest

from moe_routing import report
from moe_routing.errors import MoERoutingError, NotebookNotFoundError, UsageError
from moe_routing.plots import BrowserNotFoundError, find_browser

NB_OK = """
# %% [markdown]
# # Routing at a glance
# A throwaway notebook for the report tests.

# %% tags=["parameters"]
n_docs = 2
label = "default"

# %%
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import moe_routing as mr
import moe_routing.plots as mp

mp.use_theme()
rng = np.random.default_rng(0)
n, layers, experts = 12 * n_docs, (1, 3, 5), 6
z = rng.normal(size=(n, len(layers), experts))
ids = np.argsort(-z, axis=2)[:, :, :2]
w = np.take_along_axis(np.exp(z), ids, axis=2)
trace = mr.RoutingTrace.from_arrays(ids, w / w.sum(axis=2, keepdims=True), layers=layers, num_experts=experts,
                                    doc_ids=np.arange(n) // 12, router_logits=z)
words = (["The", " router", " sends", " each", " token", " to", " two", " of", " six", " experts", ".", "\\n"]
         * n_docs)
print("label:", label, "tokens:", trace.num_tokens)

# %% [markdown]
# ## Tokens and their experts

# %%
mp.token_expert_text(trace, doc_id=0, tokens=words)

# %% [markdown]
# ## Load per expert

# %%
counts = np.stack([np.bincount(trace.expert_ids[:, i].ravel(), minlength=experts) for i in range(3)])
load = pd.DataFrame([{"layer": layer, "expert": e, "count": int(c), "share": c / counts[i].sum()}
                     for i, layer in enumerate(layers) for e, c in enumerate(counts[i])])
mp.expert_load_heatmap(load)

# %%
mp.top1_sankey(trace, top_n=3)

# %%
fig, ax = plt.subplots(figsize=(4, 2))
ax.plot(range(5))
"""

NB_FAIL = """
# %% [markdown]
# # Broken on purpose

# %%
raise RuntimeError("this notebook fails on purpose")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    nbdir = root / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_glance.py").write_text(textwrap.dedent(NB_OK).lstrip())
    (nbdir / "02_broken.py").write_text(textwrap.dedent(NB_FAIL).lstrip())
    (nbdir / "helper.py").write_text("x = 1\n")  # not a NN_ notebook: ignored
    runs = root / "runs"
    runs.mkdir()
    (runs / "demo" / "heldout").mkdir(parents=True)
    (runs / "demo" / "heldout" / "manifest.json").write_text(json.dumps({
        "model_name": "tiny-qwen", "model": {"name": "tiny-qwen", "model_type": "qwen3_moe", "dtype": "float32"},
        "settings": {"device": "cpu"}, "tokens": 1234, "complete": True}))
    index = report.build_report(nbdir, root / "report", parameters={
        "n_docs": 3, "label": "from-test", "MODEL": "tiny-qwen", "RUNS": str(runs), "CORPUS": "flores",
        "PART": "heldout", "DTYPE": "auto", "CORPUS_FALLBACK": "FLORES+ is gated"})
    return index


def test_index_lists_every_notebook_with_status(built: Path) -> None:
    text = built.read_text()
    assert built.name == "index.html"
    assert text.count('<tr class="nb">') == 2
    assert 'href="01_glance.html"' in text and "Routing at a glance" in text
    assert 'href="02_broken.html"' in text and "this notebook fails on purpose" in text
    results = {r["name"]: r for r in json.loads((built.parent / "report.json").read_text())}
    assert results["01_glance"]["status"] == "ok", results["01_glance"]["error"]
    assert results["02_broken"]["status"] == "failed"
    assert "RuntimeError" in results["02_broken"]["error"]
    assert all(r["seconds"] > 0 for r in results.values())


def test_parameters_injected_and_outputs_kept(built: Path) -> None:
    nb = nbformat.read(built.parent / "01_glance.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "n_docs = 3" in injected[0].source
    stream = "".join(
        o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream"
    )
    assert "label: from-test tokens: 36" in stream
    page = (built.parent / "01_glance.html").read_text()
    assert "* plotly.js v" not in page  # plotly.js once for the whole report, as a file next to the pages
    assert page.count(f'src="{report.PLOTLYJS_FILE}"') == 1
    assert (built.parent / report.PLOTLYJS_FILE).read_text().count("* plotly.js v") == 1
    assert page.count('class="plotly-graph-div"') == 3
    assert "require.min.js" not in page
    assert "data:image/png;base64" in page  # the matplotlib figure


def test_navigation_contents_and_failure_on_pages(built: Path) -> None:
    out = built.parent
    first, second = (out / "01_glance.html").read_text(), (out / "02_broken.html").read_text()
    for page in (first, second):
        assert page.count('href="index.html" rel="index"') == 2  # top and bottom bars
    assert 'href="02_broken.html" rel="next"' in first and 'rel="prev"' not in first
    assert 'href="01_glance.html" rel="prev"' in second and 'rel="next"' not in second
    toc = re.search(r'<div class="mr-toc">(.*?)</div>', first, re.S).group(1)
    targets = re.findall(r'href="#([^"]+)"', toc)
    assert len(targets) == 2 and all(f'id="{t}"' in first for t in targets)
    assert "Tokens and their experts" in toc and "Load per expert" in toc
    assert "This notebook failed" in second and "this notebook fails on purpose" in second
    assert "This notebook failed" not in first
    report.add_navigation(out, [report.NotebookResult(**r) for r in json.loads((out / "report.json").read_text())],
                          json.loads((out / "run.json").read_text()))
    assert (out / "01_glance.html").read_text() == first  # idempotent


def test_index_says_what_produced_it_and_what_failed(built: Path) -> None:
    text = built.read_text()
    produced = re.search(r'<div class="meta produced">(.*?)</div>', text, re.S).group(1)
    assert "<code>tiny-qwen</code>" in produced and "flores (heldout)" in produced
    assert "float32 (auto)" in produced  # the dtype the trace's manifest records for --dtype auto
    assert "corpus fallback" in produced and "FLORES+ is gated" in produced
    assert "<code>demo/heldout</code>" in text and "qwen3_moe" in text
    assert "1 of 2 notebooks failed" in text and 'href="02_broken.html">02_broken</a>' in text
    assert 'href="01_glance.html#Load-per-expert"' in text  # sections listed under each notebook
    facts = json.loads((built.parent / "run.json").read_text())
    assert facts["traces"][0]["tokens"] == 1234


def test_report_size_shares_plotlyjs(built: Path) -> None:
    """plotly.js is stored once: the pages together are far smaller than one inline copy per page."""
    js = (built.parent / report.PLOTLYJS_FILE).stat().st_size
    pages = [p.stat().st_size for p in built.parent.glob("*.html") if p.name != "index.html"]
    assert js > 1_000_000 and all(size < js / 4 for size in pages)


def test_find_notebooks_only() -> None:
    root = Path(__file__).parent
    with pytest.raises(FileNotFoundError) as err:
        report.find_notebooks(root / "does-not-exist")
    assert isinstance(err.value, MoERoutingError)


def test_find_notebooks_selection(built: Path) -> None:
    nbdir = built.parent.parent / "notebooks"
    assert [p.name for p in report.find_notebooks(nbdir)] == ["01_glance.py", "02_broken.py"]
    assert [p.name for p in report.find_notebooks(nbdir, ["2"])] == ["02_broken.py"]
    assert [p.name for p in report.find_notebooks(nbdir, ["glance"])] == ["01_glance.py"]
    with pytest.raises(NotebookNotFoundError, match="matches none"):
        report.find_notebooks(nbdir, ["07"])


def test_param_parsing() -> None:
    assert report.parse_params(["a=3", "b=0.5", "c=[1, 2]", "d=runs/demo", "e=true", "f=None", "g='x=y'"]) == {
        "a": 3, "b": 0.5, "c": [1, 2], "d": "runs/demo", "e": True, "f": None, "g": "x=y"
    }  # fmt: skip
    with pytest.raises(UsageError, match="KEY=VALUE"):
        report.parse_params(["oops"])
    with pytest.raises(UsageError, match="identifier"):
        report.parse_params(["1x=2"])


def test_kernel_runs_this_python() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    report.ensure_kernel("python3")
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in {"python", "python3"} or Path(spec.argv[0]).exists()


def _chromium_or_skip() -> None:
    """Skip without Chromium, except on CI (``CI=true``), where a missing browser is a failure."""
    try:
        find_browser()
    except BrowserNotFoundError as exc:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but the browser checks cannot run: {exc}", pytrace=False)
        pytest.skip(f"{exc} (apt-get install -y chromium chromium-driver)")


def test_browser_checks_fail_instead_of_skipping_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_routing.plots import export

    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chrome")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(export, "_DEBIAN", ())
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _chromium_or_skip()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _chromium_or_skip()


def test_pages_render_plotly_figures_in_chromium(built: Path) -> None:
    _chromium_or_skip()
    out = built.parent
    figs = report.rendered_figures(report.dump_dom(out / "01_glance.html"))
    assert len(figs) == 3
    for fig in figs:
        assert fig["rendered"], fig
        assert fig["main_svg"] > 0, fig
        assert fig["marks"] > 0, fig  # bars, heatmap image, Sankey links actually drawn
    index_dom = report.dump_dom(built)
    assert index_dom.count('<tr class="nb">') == 2


def test_screenshots_saved(built: Path) -> None:
    _chromium_or_skip()
    shots = report.screenshot_report(built.parent)
    names = sorted(p.name for p in shots)
    assert names == ["01_glance.png", "02_broken.png", "index.png"]
    from PIL import Image

    for p in shots:
        assert p.parent == built.parent / "screenshots"
        img = Image.open(p)
        assert img.size == (1400, 2000)
        # not a blank page: several distinct colours in the top half
        assert len(img.convert("RGB").crop((0, 0, 1400, 1000)).getcolors(maxcolors=1_000_000) or []) > 20


def test_figure_census_tells_drawn_from_empty() -> None:
    dom = (
        '<div id="a" class="plotly-graph-div js-plotly-plot"><div><svg class="main-svg"><g class="point">'
        '<path d="M0,0H5V5Z"></path></g></svg></div></div>'
        '<div id="b" class="plotly-graph-div js-plotly-plot"><svg class="main-svg"><g class="point">'
        '<path d=""></path></g></svg></div>'
        '<div id="c" class="plotly-graph-div"></div><p><br>after</p>'
    )
    figs = {f["id"]: f for f in report.rendered_figures(dom)}
    assert figs["a"] == {"id": "a", "rendered": True, "main_svg": 1, "marks": 1}
    assert figs["b"]["marks"] == 0
    assert figs["c"]["rendered"] is False and figs["c"]["main_svg"] == 0


def test_cli_only_and_exit_status(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nbdir = built.parent.parent / "notebooks"
    rc = report.main(
        ["--notebooks", str(nbdir), "--out", str(tmp_path / "r"), "--only", "02", "-p", "n_docs=1"]
    )
    assert rc == 1  # the only notebook run fails on purpose
    results = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [r["name"] for r in results] == ["02_broken"]
    assert results[0]["parameters"] == {"n_docs": 1}
    assert "1 failed: 02_broken" in capsys.readouterr().out
