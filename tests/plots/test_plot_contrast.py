"""Contrast figures (plots/contrast): differential usage, usage differences; theme, role names, metric functions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from moe_routing import RoutingTrace, TraceError
from moe_routing.metrics import (
    contrast,
)
from moe_routing.plots import (
    DARK,
    LIGHT,
    differential_usage,
    divergence_to_reference,
    expert_colors,
    usage_difference_heatmap,
    use_theme,
)
from moe_routing.plots.theme import text_color_on

from ._synth import LAYERS


def _diff_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer in LAYERS:
        for e, d in enumerate(rng.normal(0, 0.05, 8)):
            rows.append({"layer": layer, "expert": e, "diff": d, "ci_low": d - 0.03, "ci_high": d + 0.03,
                         "a": "en", "b": "de"})  # fmt: skip
    return pd.DataFrame(rows)


def test_differential_usage_top_n_with_ci() -> None:
    df = _diff_frame()
    fig = differential_usage(df, top_n=5, label="lang")
    assert len(fig.data) == len(LAYERS)
    assert [s.label for s in fig.layout.sliders[0].steps] == [str(x) for x in LAYERS]
    bars = fig.data[0]
    sub = df[df.layer == LAYERS[0]]
    top = sub.reindex(sub["diff"].abs().sort_values(ascending=False).index).head(5)
    assert sorted(bars.y) == sorted(f"e{e}" for e in top.expert)
    assert bars.y[-1] == f"e{top.expert.iloc[0]}"  # largest difference on top
    np.testing.assert_allclose(bars.error_x.array, 0.03)
    np.testing.assert_allclose(bars.error_x.arrayminus, 0.03)
    sig = [(lo > 0 or hi < 0) for lo, hi in np.asarray(bars.customdata)]
    assert [o == 1.0 for o in bars.marker.opacity] == sig
    assert "English − German" in fig.layout.xaxis.title.text  # diff = share_a - share_b, names from a, b
    assert "used more by English (right)" in fig.layout.title.text
    with pytest.raises(TraceError, match="layer 2 is not in this frame"):
        differential_usage(df, layers=[2])


def test_differential_usage_from_contrast(trace: RoutingTrace) -> None:
    df = contrast(trace, "lang", "de", "en", n_boot=50)
    fig = differential_usage(df, layers=[5], top_n=3)
    assert len(fig.data) == 1 and not fig.layout.sliders
    sub = df[df.layer == 5]
    best = sub.loc[sub["diff"].abs().idxmax()]
    assert fig.data[0].y[-1] == f"e{int(best.expert)}"
    sig = sub.set_index("expert").loc[[int(y[1:]) for y in fig.data[0].y], "significant"].tolist()
    assert [o == 1.0 for o in fig.data[0].marker.opacity] == sig


def test_theme_and_colours() -> None:
    old = pio.templates.default
    try:
        assert use_theme(dark=True, seaborn=False) == DARK and pio.templates.default == DARK
        assert use_theme(seaborn=False) == LIGHT
    finally:
        pio.templates.default = old
    for n in (8, 20, 64, 128):
        cols = expert_colors(n)
        assert len(cols) == n == len(set(cols))
    assert expert_colors(64)[:8] != expert_colors(8)  # palettes switch by size, stable per size
    assert text_color_on("#ffffff") == "#111111" and text_color_on("#000000") == "#ffffff"


def test_usage_difference_heatmap_is_centred_on_zero() -> None:
    df = _diff_frame()
    fig = usage_difference_heatmap(df)
    heat = fig.data[0]
    assert list(heat.y) == [str(x) for x in LAYERS]
    z = np.asarray(heat.z)
    np.testing.assert_allclose(z, df.pivot(index="layer", columns="expert", values="diff").to_numpy())
    assert heat.zmid == 0 and heat.zmin == -heat.zmax


def test_role_names_are_aliases_of_the_old_keywords() -> None:
    """x / y / color / low / high mean the same in every plot; the older keywords keep working."""
    from moe_routing.plots import differential_usage, divergence_over_depth

    depth = pd.DataFrame({"layer": [1, 3, 1, 3], "g": ["en", "en", "de", "de"], "js": [0.1, 0.2, 0.3, 0.4]})
    old = divergence_over_depth(depth, value="js", color="g", low=None, high=None)
    new = divergence_over_depth(depth, y="js", color="g", low=None, high=None)
    assert [list(t.y) for t in old.data] == [list(t.y) for t in new.data]
    ref = divergence_to_reference(depth.rename(columns={"g": "lang"}), y="js", color="lang", reference="en")
    assert [t.name for t in ref.data] == ["German"]
    diff = pd.DataFrame({"layer": 1, "expert": [0, 1], "d": [0.2, -0.1], "ci_low": [0.1, -0.2], "ci_high": [0.3, 0.0]})
    a, b = differential_usage(diff, value="d"), differential_usage(diff, x="d")
    assert [list(t.x) for t in a.data] == [list(t.x) for t in b.data]


def test_plots_take_metric_functions() -> None:
    from moe_routing import metrics
    from moe_routing.plots._common import metric_frame

    from ._synth import make_trace

    trace = make_trace()
    by_fn = metric_frame(trace, metrics.expert_load)
    by_name = metric_frame(trace, "expert_load")
    assert by_fn.equals(by_name)
    assert metric_frame(trace, lambda t: metrics.expert_load(t, top1=True))["count"].sum() == trace.num_tokens * len(trace.layers)


def test_many_lines_highlight_a_few() -> None:
    from moe_routing.plots import divergence_over_depth
    from moe_routing.plots.contrast import MAX_HIGHLIGHT

    langs = ["en", "de", "fr", "es", "it", "pt", "nl", "pl", "cs", "ru", "uk", "el", "tr", "ja", "zh"]
    frame = pd.DataFrame([{"layer": la, "lang": g, "d": 0.01 * i + 0.001 * la} for i, g in enumerate(langs)
                          for la in (0, 1, 2)])
    fig = divergence_over_depth(frame, y="d", color="lang", low=None, high=None)
    shown = [t for t in fig.data if t.showlegend is not False]
    assert len(fig.data) == len(langs) and len(shown) == MAX_HIGHLIGHT
    assert {t.name for t in shown} == {"Turkish", "Japanese", "Chinese", "Greek", "Ukrainian"}  # highest means
    assert [a.text for a in fig.layout.annotations] == [t.name for t in shown]  # labelled at their line ends
    assert all(t.line.color == "#c8c8c8" for t in fig.data[: len(langs) - MAX_HIGHLIGHT])  # grey context first
    chosen = divergence_over_depth(frame, y="d", color="lang", low=None, high=None, highlight=["en", "de"])
    assert {t.name for t in chosen.data if t.showlegend is not False} == {"English", "German"}
    few = divergence_over_depth(frame[frame["lang"].isin(langs[:4])], y="d", color="lang", low=None, high=None)
    assert all(t.showlegend is not False for t in few.data) and not few.layout.annotations
