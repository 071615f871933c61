"""Divergence, differential usage, sequence figures, language names, theme."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from moe_routing import MetricError, RoutingTrace, TraceError
from moe_routing.metrics import (
    consecutive_same_expert,
    contrast,
    language_divergence,
    load_by_position,
    reference_divergence,
)
from moe_routing.plots import (
    DARK,
    LIGHT,
    consecutive_same_expert_plot,
    differential_usage,
    divergence_to_reference,
    expert_by_position,
    expert_colors,
    language_divergence_heatmap,
    language_name,
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


def test_language_divergence_matrix() -> None:
    m = pd.DataFrame([[0, 0.1], [0.1, 0]], index=["de", "pt-BR"], columns=["de", "pt-BR"])
    fig = language_divergence_heatmap(m, layer=5)
    assert list(fig.data[0].x) == ["German", "Portuguese (Brazil)"]
    assert "decoder layer 5" in fig.layout.title.text
    with pytest.raises(MetricError, match="square"):
        language_divergence_heatmap(np.zeros((2, 3)))


def test_language_divergence_pairs_frame(trace: RoutingTrace) -> None:
    pairs = language_divergence(trace, n_boot=10)
    fig = language_divergence_heatmap(pairs)
    assert len(fig.data) == len(LAYERS)
    assert [s.label for s in fig.layout.sliders[0].steps] == [str(x) for x in LAYERS]
    assert list(fig.data[0].x) == ["German", "English", "French"]
    z = np.asarray(fig.data[1].z, dtype=float)
    np.testing.assert_allclose(z, z.T)
    np.testing.assert_allclose(np.diag(z), 0.0)
    row = pairs[(pairs.layer == 3) & (pairs.a == "de") & (pairs.b == "fr")]
    assert z[0, 2] == pytest.approx(float(row["js"].iloc[0]))
    one = language_divergence_heatmap(trace, layer=7)
    assert len(one.data) == 1 and "decoder layer 7" in one.layout.title.text
    with pytest.raises(TraceError, match="layer 4 is not in this frame"):
        language_divergence_heatmap(pairs, layer=4)


def test_divergence_to_reference_lines() -> None:
    df = pd.DataFrame(
        [{"layer": la, "lang": g, "divergence": la * 0.01} for la in LAYERS for g in ("en", "de", "fr")]
    )
    fig = divergence_to_reference(df, reference="en")
    assert [t.name for t in fig.data] == ["German", "French"]
    assert list(fig.data[0].x) == list(LAYERS)
    assert "from English" in fig.layout.title.text


def test_divergence_to_reference_from_metric(trace: RoutingTrace) -> None:
    df = reference_divergence(trace, reference="fr", n_boot=20)
    fig = divergence_to_reference(df)  # the all-zero reference is found and left out
    assert [t.name for t in fig.data] == ["German", "English"]
    assert "from French" in fig.layout.title.text
    de = df[df.lang == "de"].sort_values("layer")
    np.testing.assert_allclose(fig.data[0].error_y.array, (de.ci_high - de.divergence).clip(lower=0))


def test_consecutive_same_expert(trace: RoutingTrace) -> None:
    df = pd.DataFrame({"layer": LAYERS, "first": 0.3, "first_or_second": 0.5, "random_first": 0.125})
    fig = consecutive_same_expert_plot(df)
    assert [t.type for t in fig.data] == ["bar", "scatter", "bar"]
    assert list(fig.data[0].x) == [str(x) for x in LAYERS]
    grouped = pd.concat([df.assign(domain="code"), df.assign(domain="prose")])
    fig2 = consecutive_same_expert_plot(grouped, group="domain")
    assert {t.name for t in fig2.data} == {"code", "prose", "random router"}
    real = consecutive_same_expert(trace, n_boot=20)
    fig3 = consecutive_same_expert_plot(real)
    assert [t.name for t in fig3.data] == [
        "first choice repeated", "random router: first choice repeated",
        "first or second choice shared", "random router: first or second choice shared",
    ]  # fmt: skip
    np.testing.assert_allclose(fig3.data[0].error_y.array, real.first_high - real["first"])
    fig4 = consecutive_same_expert_plot(trace, group="lang")
    assert {t.name for t in fig4.data} >= {"de", "en", "fr"}


def test_expert_by_position(trace: RoutingTrace) -> None:
    fig = expert_by_position(trace, 5)
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(np.nansum(z, axis=1), 1.0)
    assert np.asarray(fig.data[0].customdata).sum() == trace.num_tokens  # first choices only
    assert list(fig.data[0].y[:3]) == ["0", "1", "2–3"]
    with pytest.raises(TraceError, match="layer 6 is not a MoE layer"):
        expert_by_position(trace, 6)
    frame = load_by_position(trace, bins=5)
    assert list(expert_by_position(frame, 1).data[0].y) == ["0–4", "5–9", "10–14", "15–19"]


def test_language_names() -> None:
    assert language_name("de") == "German"
    assert language_name("zh-Hans") == "Chinese (Simplified)"
    assert language_name("yo") == "Yoruba"  # from gflanguages, not the small table
    assert language_name("qqq") == "qqq"


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
    from moe_routing.plots import differential_usage, divergence_over_depth, divergence_to_reference

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
