"""Label usage heatmaps, NMI lines, co-activation heatmap and the top-1 Sankey."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from moe_routing import MetricError, RoutingTrace, TraceError
from moe_routing.metrics import coactivation, label_nmi, label_usage
from moe_routing.plots import (
    coactivation_heatmap,
    label_usage_heatmap,
    label_usage_heatmap_static,
    language_usage_heatmap,
    nmi_by_layer,
    top1_sankey,
)
from moe_routing.plots.specialization import usage_matrices

from ._synth import LAYERS, NUM_EXPERTS, make_trace


def test_usage_matrices_match_a_direct_count(trace: RoutingTrace) -> None:
    frame = label_usage(trace, "lang")
    values, shares, counts = usage_matrices(frame, "lang", [5, 1], "label")
    assert list(values) == ["de", "en", "fr"]
    assert counts.shape == shares.shape == (2, 3, NUM_EXPERTS)
    li = trace.layer_index(5)
    de = trace.expert_ids[trace.labels["lang"] == "de", li].ravel()
    np.testing.assert_array_equal(counts[0, 0], np.bincount(de, minlength=NUM_EXPERTS))
    np.testing.assert_allclose(shares.sum(axis=2), 1.0)
    _, _, top1 = usage_matrices(label_usage(trace, "lang", top1=True), "lang", [3], "count")
    assert top1.sum() == trace.num_tokens


def test_usage_heatmap_slider_and_language_names(trace: RoutingTrace) -> None:
    fig = label_usage_heatmap(trace, "lang")
    same = label_usage_heatmap(label_usage(trace, "lang"), "lang")  # from the metric frame: same figure
    np.testing.assert_allclose(np.asarray(fig.data[2].z), np.asarray(same.data[2].z))
    assert len(fig.data) == len(LAYERS)
    assert [s.label for s in fig.layout.sliders[0].steps] == [str(x) for x in LAYERS]
    assert list(fig.data[0].y) == ["German", "English", "French"]
    for heat in fig.data:
        np.testing.assert_allclose(np.asarray(heat.z).sum(axis=1), 1.0)
        assert heat.coloraxis == "coloraxis"  # one scale for all layers


def test_lift_shows_the_planted_preference(trace: RoutingTrace) -> None:
    fig = language_usage_heatmap(trace, languages=["fr", "de"])
    assert list(fig.data[0].y) == ["French", "German"]
    lift = np.asarray(fig.data[0].customdata)[..., 1]  # the lift itself (hover); colour is log2(lift)
    assert lift[0, 0] > 1.5  # French was pushed to expert 0
    assert lift[1, NUM_EXPERTS // 2 :].mean() > 1.0 > lift[1, : NUM_EXPERTS // 2].mean()  # German: upper half
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(z, np.clip(np.log2(lift), fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax))
    ax = fig.layout.coloraxis
    assert ax.cmid == 0.0 and ax.cmin == -ax.cmax  # log scale centred at lift 1: 2 and 1/2 equally strong
    assert dict(zip(ax.colorbar.tickvals, ax.colorbar.ticktext, strict=True))[0.0] == "1"


def test_lift_masks_cells_with_too_few_slots(trace: RoutingTrace) -> None:
    frame = label_usage(trace, "lang")
    fig = language_usage_heatmap(frame, min_count=10)
    _, _, counts = usage_matrices(frame, "lang", [1], "count")
    z = np.asarray(fig.data[0].z, dtype=float)
    totals = counts[0].sum(axis=1, keepdims=True)
    expected = totals * counts[0].sum(axis=0) / counts[0].sum()
    few = (counts[0] < 10) & (expected < 10)
    assert few.any() and (~few).any()
    assert np.isnan(z[few]).all() and np.isfinite(z[~few]).all()
    assert "grey: fewer than 10 slots" in fig.layout.title.text and fig.layout.plot_bgcolor == "#d0d0d0"
    flagged = frame.assign(too_few=frame["count"] < 3)  # a metric's own too_few column is honoured too
    z2 = np.asarray(language_usage_heatmap(flagged).data[0].z, dtype=float)
    assert np.isnan(z2).sum() == int(flagged[flagged["layer"] == 1]["too_few"].sum())


def test_usage_errors(trace: RoutingTrace) -> None:
    with pytest.raises(TraceError, match="no label 'domain'"):
        label_usage_heatmap(trace, "domain")
    with pytest.raises(TraceError, match=r"layer 4 is not in this frame; its MoE layers are \[1, 3, 5, 7\]"):
        label_usage_heatmap(trace, "lang", layers=[4])
    with pytest.raises(TraceError, match="no values"):
        label_usage_heatmap(trace, "lang", values=["it"])


def test_usage_static(trace: RoutingTrace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    fig = label_usage_heatmap_static(trace, "lang", 7)
    assert "decoder layer 7" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["German", "English", "French"]


def test_nmi_lines_and_floor() -> None:
    nmi = pd.DataFrame({"layer": [1, 3, 5] * 2, "nmi": [0.1, 0.2, 0.3, 0.0, 0.1, 0.1], "floor": 0.01,
                        "label": ["lang"] * 3 + ["domain"] * 3})  # fmt: skip
    fig = nmi_by_layer(nmi)
    assert len(fig.data) == 4
    assert [t.name for t in fig.data] == ["lang", "lang: floor", "domain", "domain: floor"]
    assert fig.data[1].line.dash == "dash" and fig.data[1].line.color == fig.data[0].line.color
    assert list(fig.data[0].x) == [1, 3, 5] and list(fig.layout.xaxis.tickvals) == [1, 3, 5]
    one = nmi_by_layer(nmi[nmi.label == "lang"].drop(columns="label"))
    assert [t.name for t in one.data] == ["NMI", "floor"]
    from_trace = nmi_by_layer(make_trace(n_docs=9), "lang")
    expected = label_nmi(make_trace(n_docs=9), "lang")
    assert list(from_trace.data[0].x) == list(LAYERS)
    np.testing.assert_allclose(from_trace.data[0].y, expected["nmi"])
    with pytest.raises(MetricError):
        nmi_by_layer(nmi.drop(columns="floor"))


def test_coactivation_heatmap() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((6, 6))
    m = m + m.T
    fig = coactivation_heatmap(m, layer=3)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.all(np.isnan(np.diag(z)))
    assert list(fig.data[0].x) == [str(i) for i in range(6)]
    assert "decoder layer 3" in fig.layout.title.text
    fc = coactivation_heatmap(m, order="cluster", hide_diagonal=False)
    order = [int(i) for i in fc.data[0].x]
    assert sorted(order) == list(range(6))
    np.testing.assert_allclose(np.asarray(fc.data[0].z), m[np.ix_(order, order)])
    with pytest.raises(MetricError, match="square"):
        coactivation_heatmap(np.zeros((3, 4)))


def test_coactivation_from_trace_checks_layer(trace: RoutingTrace) -> None:
    with pytest.raises(TraceError, match="pass layer="):
        coactivation_heatmap(trace)
    with pytest.raises(TraceError, match="layer 2 is not a MoE layer"):
        coactivation_heatmap(trace, layer=2)
    fig = coactivation_heatmap(trace, layer=5)
    expected = coactivation(trace, 5)
    np.fill_diagonal(expected, np.nan)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), expected)


def test_sankey_flow_is_conserved(trace: RoutingTrace) -> None:
    fig = top1_sankey(trace, top_n=3)
    sk = fig.data[0]
    labels = list(sk.node.label)
    for layer in LAYERS:
        mine = [lab for lab in labels if lab.startswith(f"L{layer} ")]
        assert 2 <= len(mine) <= 4 and f"L{layer} other" in mine
    src, dst, val = np.asarray(sk.link.source), np.asarray(sk.link.target), np.asarray(sk.link.value)
    layer_of = np.array([int(lab.split()[0][1:]) for lab in labels])
    for a, b in itertools.pairwise(LAYERS):
        sel = layer_of[src] == a
        assert np.all(layer_of[dst[sel]] == b)
        assert val[sel].sum() == trace.num_tokens
    # the biggest non-"other" node of layer 1 really is the most frequent first choice
    top1 = trace.top1()[:, 0]
    best = int(np.bincount(top1).argmax())
    assert f"L1 e{best}" in labels


def test_sankey_all_experts_and_errors() -> None:
    tr = make_trace()
    fig = top1_sankey(tr, layers=[3, 7], top_n=NUM_EXPERTS)
    assert not any("other" in lab for lab in fig.data[0].node.label)
    with pytest.raises(TraceError, match="at least two"):
        top1_sankey(tr, layers=[3])
    with pytest.raises(TraceError, match="layer 8"):
        top1_sankey(tr, layers=[3, 8])


def test_coactivation_heatmap_from_a_trace_directory_or_reader(trace: RoutingTrace, tmp_path) -> None:
    """A saved trace (path or the TraceReader capture_corpus returns) draws the same heatmap as the trace."""
    from moe_routing.store import TraceReader

    trace.save(tmp_path / "t")
    layer = trace.layers[-1]
    ref = np.asarray(coactivation_heatmap(trace, layer).data[0].z, dtype=float)
    for source in (str(tmp_path / "t"), TraceReader(tmp_path / "t")):
        z = np.asarray(coactivation_heatmap(source, layer).data[0].z, dtype=float)
        np.testing.assert_array_equal(z, ref)
    with pytest.raises(TraceError, match="pass layer="):
        coactivation_heatmap(TraceReader(tmp_path / "t"))


def test_bad_plot_options_raise_project_errors(trace: RoutingTrace) -> None:
    """Options a user gets wrong raise PlotError / PlotInputError (MoERoutingError), still ValueError / TypeError."""
    from moe_routing.errors import MoERoutingError, PlotError, PlotInputError
    from moe_routing.plots import expert_colors, nmi_by_layer
    from moe_routing.plots._common import metric_frame, token_strings

    cases = [
        (PlotError, ValueError, lambda: label_usage_heatmap(trace, "lang", normalize="share")),
        (PlotError, ValueError, lambda: top1_sankey(trace, top_n=0)),
        (PlotError, ValueError, lambda: expert_colors(0)),
        (PlotInputError, TypeError, lambda: nmi_by_layer(trace)),
        (PlotInputError, TypeError, lambda: metric_frame(None, "label_usage")),
        (PlotInputError, TypeError, lambda: token_strings(trace, tokenizer=object())),
    ]
    for kind, builtin, call in cases:
        with pytest.raises(kind) as err:
            call()
        assert isinstance(err.value, MoERoutingError) and isinstance(err.value, builtin)
