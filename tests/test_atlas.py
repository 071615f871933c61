"""The expert atlas: data from the metrics, pages rendered by headless Chromium, links resolve, search works."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moe_routing as mr
from moe_routing import metrics as M
from moe_routing.atlas import build_atlas_data
from moe_routing.cli import main as cli_main
from moe_routing.errors import UsageError
from moe_routing.plots import BrowserNotFoundError, find_browser
from moe_routing.report import dump_dom
from plots._synth import WORDS, make_trace

VOCAB = list(dict.fromkeys(WORDS))


def _payload(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(text[text.index("(") + 1 : text.rindex(")")])


@pytest.fixture(scope="module")
def trace() -> mr.RoutingTrace:
    return make_trace(n_docs=9)


@pytest.fixture(scope="module")
def site(trace: mr.RoutingTrace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    effect = pd.DataFrame({"layer": 3, "expert": range(8), "lang": "de", "delta": np.linspace(0.01, 0.08, 8),
                           "ci_low": 0.0, "ci_high": 0.1, "tokens": 57})
    return mr.atlas(trace, tmp_path_factory.mktemp("atlas") / "site", tokens=VOCAB, ablation=effect,
                    min_count=5, n_boot=50)


def test_data_comes_from_the_metrics(trace: mr.RoutingTrace) -> None:
    index, shards, facts = build_atlas_data(trace, tokens=VOCAB, n_boot=50, min_count=5)
    assert len(index) == len(trace.layers) * trace.num_experts and sorted(shards) == list(trace.layers)
    load = M.expert_load(trace).set_index(["layer", "expert"])
    usage = M.label_usage(trace, "lang").set_index(["lang", "layer", "expert"])
    coact = M.coactivation_matrices(trace)
    flows = M.transitions(trace)
    for layer, shard in shards.items():
        for x, page in enumerate(shard["experts"]):
            assert page["count"] == load.loc[(layer, x), "count"]
            assert page["share_low"] <= page["share"] <= page["share_high"]
            for value, count, _share, lift, _tok in page["labels"]["lang"]:
                assert count == usage.loc[(value, layer, x), "count"]
                assert lift == pytest.approx(usage.loc[(value, layer, x), "lift"], abs=1e-3)
            for other, p in page["coactive"]:
                assert p == pytest.approx(float(coact.sel(layer=layer, expert=x, other=other)), abs=1e-4)
            if shard["next"] is not None:
                for nxt, p, _base in page["feeds"]:
                    assert p == pytest.approx(float(flows.sel(layer=layer, expert=x, next_expert=nxt)), abs=1e-4)
            for tok in page["tokens"]:  # concordance lines hold the token where this expert was chosen
                assert tok["text"] == VOCAB[tok["id"]] and tok["lines"]
                assert all(line[1] == tok["text"] for line in tok["lines"])
    assert facts["tokens"] == trace.num_tokens and facts["has_effect"] is False


def test_index_lists_preferred_label_values(site: Path) -> None:
    from moe_routing.atlas import PREFER

    payload = _payload(site.parent / "data" / "index.js")
    cols = payload["columns"]
    shards = {x: _payload(site.parent / "data" / f"L{x}.js") for x in payload["facts"]["layers"]}
    for r in payload["rows"]:
        page = shards[r[0]]["experts"][r[1]]
        want = {f"lang={v}" for v, c, _s, lf, _t in page["labels"]["lang"]
                if c >= payload["facts"]["min_count"] and lf is not None and lf >= PREFER}
        got = {p.split(" (")[0] for p in r[cols.index("prefers")].split(") ") if p}
        assert got == want, (r, want)


def test_site_layout_and_shards(site: Path, trace: mr.RoutingTrace) -> None:
    root = site.parent
    assert {p.name for p in root.iterdir()} >= {"index.html", "expert.html", "atlas.css", "data"}
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted(
        ["index.js", *(f"L{x}.js" for x in trace.layers)])
    shard = _payload(root / "data" / "L3.js")
    assert [r[0] for r in shard["experts"][2]["effect"]] == ["de"]
    text = " ".join(p.read_text() for p in root.rglob("*.html"))
    assert not re.search(r"(src|href)=\"https?://", text), "the atlas must work offline"


def test_bad_input_is_refused(trace: mr.RoutingTrace, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not in the trace"):
        mr.atlas(trace, tmp_path / "a", labels=["nope"])
    with pytest.raises(UsageError, match="lacks columns"):
        mr.atlas(trace, tmp_path / "b", ablation=pd.DataFrame({"layer": [1]}))
    with pytest.raises(UsageError, match="does not exist"):
        mr.atlas(trace, tmp_path / "c", ablation=tmp_path / "missing.csv")


def test_cli_builds_from_a_trace_directory(trace: mr.RoutingTrace, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    trace.save(tmp_path / "trace")
    assert cli_main(["atlas", str(tmp_path / "trace"), "--out", str(tmp_path / "site"), "--boot", "20"]) == 0
    assert "atlas:" in capsys.readouterr().out
    rows = _payload(tmp_path / "site" / "data" / "index.js")["rows"]
    assert len(rows) == len(trace.layers) * trace.num_experts


# ------------------------------------------------------------------------------------------ in Chromium
@pytest.fixture(scope="module")
def browser() -> str:
    try:
        return find_browser()
    except BrowserNotFoundError as exc:
        pytest.skip(str(exc))


def _body(dom: str) -> str:
    """The rendered DOM without its scripts (their source holds HTML templates)."""
    return re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)


def _hrefs(dom: str) -> list[str]:
    return re.findall(r'href="([^"]+)"', _body(dom))


def test_index_renders_links_resolve_and_search_works(site: Path, trace: mr.RoutingTrace, browser: str) -> None:
    dom = dump_dom(site, budget_ms=5000)
    rows = re.findall(r'<tr class="row">', _body(dom))
    assert len(rows) == len(trace.layers) * trace.num_experts
    layers, n_exp = set(trace.layers), trace.num_experts
    for href in set(_hrefs(dom)):
        page, _, frag = href.partition("#")
        assert (site.parent / page).is_file(), href
        if frag:
            m = re.fullmatch(r"L(\d+)-E(\d+)", frag)
            assert m and int(m.group(1)) in layers and int(m.group(2)) < n_exp, href
    # search: a layer and an expert give one row; a label gives the rows whose strongest label it is
    one = dump_dom(site, budget_ms=5000, fragment="q=L3 E5")
    assert re.findall(r'href="expert.html#(L\d+-E\d+)"', _body(one)) == ["L3-E5"]
    fr = dump_dom(site, budget_ms=5000, fragment="q=lang=fr")
    payload = _payload(site.parent / "data" / "index.js")
    cols = payload["columns"]
    expected = sum("lang=fr" in (r[cols.index("label")] + " " + r[cols.index("prefers")]) for r in payload["rows"])
    assert 0 < expected < len(rows) and len(re.findall(r'<tr class="row">', _body(fr))) == expected


def test_expert_page_renders_its_shard(site: Path, trace: mr.RoutingTrace, browser: str) -> None:
    load = M.expert_load(trace).set_index(["layer", "expert"])
    dom = _body(dump_dom(site.parent / "expert.html", budget_ms=5000, fragment="L3-E5"))
    assert "Layer 3, expert 5" in dom
    assert f"{int(load.loc[(3, 5), 'count'])} routing slots" in dom
    for section in ("Load", "lang", "Top tokens", "Co-activated experts", "Feeds, layer 5", "Fed by, layer 1",
                    "Causal effect of ablating it"):
        assert f"<h2>{section}" in dom, section
    assert dom.count('<tr class="tok">') == 8
    for href in set(_hrefs(dom)):
        page, _, frag = href.partition("#")
        assert (site.parent / page).is_file(), href
        assert not frag or re.fullmatch(r"L(\d+)-E(\d+)", frag), href
    assert 'href="expert.html#L3-E4"' in dom and 'href="expert.html#L3-E6"' in dom  # previous / next
    missing = dump_dom(site.parent / "expert.html", budget_ms=5000, fragment="L2-E0")
    assert "No expert L2 E0" in missing
