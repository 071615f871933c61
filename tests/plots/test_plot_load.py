"""Load figures: heatmap, balance lines, distribution, capacity curves, placement bars, static heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_routing import MetricError, RoutingTrace
from moe_routing.metrics import capacity_drop, expert_placement, load_balance
from moe_routing.plots import (
    capacity_drop_curves,
    expert_load_heatmap,
    expert_load_heatmap_static,
    load_balance_lines,
    load_distribution,
    placement_bars,
)

from ._synth import LAYERS, NUM_EXPERTS, balance_frame, load_frame


def test_load_heatmap_rows_are_decoder_layers(trace: RoutingTrace) -> None:
    load = load_frame(trace)
    fig = expert_load_heatmap(load)
    heat = fig.data[0]
    assert list(heat.y) == [str(x) for x in LAYERS]
    assert list(fig.layout.yaxis.categoryarray) == [str(x) for x in LAYERS]
    assert list(heat.x) == list(range(NUM_EXPERTS))
    z = np.asarray(heat.z)
    expected = load.pivot(index="layer", columns="expert", values="share").to_numpy()
    np.testing.assert_allclose(z, expected)
    np.testing.assert_allclose(z.sum(axis=1), 1.0)
    assert fig.layout.yaxis.title.text == "decoder layer"
    counts = np.asarray(heat.customdata)[..., 1]
    assert counts.sum() == trace.num_tokens * trace.top_k * trace.num_layers


def test_load_heatmap_relative_is_centred_on_fair_share(trace: RoutingTrace) -> None:
    fig = expert_load_heatmap(load_frame(trace), relative=True)
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(z.mean(axis=1), 1.0)
    heat = fig.data[0]
    assert heat.zmin == 0.0 and heat.zmax >= max(2.0, z.max())  # loads are >= 0: no negative part of the scale
    white = [pos for pos, color in heat.colorscale if color == "#f7f7f7"]
    assert white == [pytest.approx(1.0 / heat.zmax)]  # white exactly at the fair share
    shared = expert_load_heatmap(load_frame(trace), relative=True, zmax=5.0).data[0]
    assert shared.zmax == 5.0  # a common scale for side-by-side figures


def test_missing_expert_rows_count_as_zero() -> None:
    load = pd.DataFrame(
        {"layer": [2, 2, 4], "expert": [0, 3, 1], "count": [5, 5, 10], "share": [0.5, 0.5, 1.0]}
    )
    z = np.asarray(expert_load_heatmap(load).data[0].z)
    assert z.shape == (2, 4)
    np.testing.assert_allclose(z, [[0.5, 0, 0, 0.5], [0, 1.0, 0, 0]])


def test_balance_lines_one_panel_per_metric(trace: RoutingTrace) -> None:
    bal = balance_frame(trace)
    fig = load_balance_lines(bal)
    assert len(fig.data) == 4
    for tr in fig.data:
        assert list(tr.x) == list(LAYERS)
    assert [a.text for a in fig.layout.annotations][:4] == [
        "coefficient of variation", "max load / mean load", "normalised entropy", "Gini coefficient"
    ]  # fmt: skip
    two = pd.concat([bal.assign(model="a"), bal.assign(model="b")])
    fig2 = load_balance_lines(two, metrics=("cv", "gini"), color="model")
    assert len(fig2.data) == 4 and {t.name for t in fig2.data} == {"a", "b"}
    with pytest.raises(MetricError, match="needs columns"):
        load_balance_lines(bal.drop(columns="gini"))


def test_distribution_has_every_expert_per_layer(trace: RoutingTrace) -> None:
    fig = load_distribution(load_frame(trace))
    box = fig.data[0]
    x = np.asarray(box.x)
    assert sorted(set(x), key=int) == [str(x) for x in LAYERS]
    for layer in LAYERS:
        sel = x == str(layer)
        assert sel.sum() == NUM_EXPERTS
        assert np.asarray(box.y)[sel].mean() == pytest.approx(1.0)
        assert sorted(np.asarray(box.customdata)[sel]) == list(range(NUM_EXPERTS))


def test_capacity_curves_one_per_layer(trace: RoutingTrace) -> None:
    cap = capacity_drop(trace, (0.5, 1.0, 2.0))
    fig = capacity_drop_curves(cap)
    assert [t.name for t in fig.data] == [*[f"layer {x}" for x in LAYERS], "random routing"]
    assert list(fig.data[0].x) == [0.5, 1.0, 2.0]
    np.testing.assert_allclose(fig.data[1].y, cap[cap.layer == 3].sort_values("capacity_factor")["drop_rate"])
    assert fig.data[-1].line.dash == "dash"
    assert fig.data[0].y[0] >= fig.data[0].y[-1]  # more capacity, fewer drops
    # split by position: summed back to one point per (factor, layer), weighted by slots
    by_pos = capacity_drop(trace, (0.5, 1.0, 2.0), by_position=True)
    again = capacity_drop_curves(by_pos)
    np.testing.assert_allclose(again.data[1].y, fig.data[1].y)
    direct = capacity_drop_curves(trace, capacity_factors=(1.0, 1.5))
    assert list(direct.data[0].x) == [1.0, 1.5]
    with pytest.raises(MetricError):
        capacity_drop_curves(cap.rename(columns={"drop_rate": "lost"}))


def test_placement_bars(trace: RoutingTrace) -> None:
    df = pd.concat([expert_placement(trace, 2), expert_placement(trace, 4)])
    fig = placement_bars(df)
    assert len(fig.data) == 4  # 2 strategies x 2 device counts
    assert [t.name for t in fig.data[:2]] == ["contiguous", "greedy"]
    assert list(fig.data[0].x) == [str(x) for x in LAYERS]
    two = df[df.devices == 2]
    np.testing.assert_allclose(fig.data[1].y, two["max_over_mean_greedy"])
    assert [a.text for a in fig.layout.annotations] == ["2 devices", "4 devices"]
    with pytest.raises(MetricError):
        placement_bars(df, strategies=("random",))


def test_plots_from_trace_use_the_metrics(trace: RoutingTrace) -> None:
    bal = load_balance(trace)
    fig = load_balance_lines(trace)
    assert list(fig.data[0].x) == list(LAYERS)
    np.testing.assert_allclose(fig.data[0].y, bal["cv"])
    assert any(t.name == "random routing" for t in fig.data)  # cv_random baseline
    heat = expert_load_heatmap(trace)
    np.testing.assert_allclose(
        np.asarray(heat.data[0].z), np.asarray(expert_load_heatmap(load_frame(trace)).data[0].z)
    )


def test_static_heatmap_is_matplotlib(trace: RoutingTrace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    fig = expert_load_heatmap_static(load_frame(trace))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "decoder layer"
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(x) for x in LAYERS]
