"""Figures of causal checks (moe_routing.plots.causal) on hand-made metric frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from moe_routing import MetricError
from moe_routing.metrics.causal import CausalClaim, Effect
from moe_routing.plots import causal as mpc

LANGS = ["en", "ru", "ja"]


def matrix_frame(modes=("reroute", "zero")) -> pd.DataFrame:
    rows = []
    for mode in modes:
        for s in LANGS:
            for v in LANGS:
                d = 0.3 if s == v else 0.01
                d *= 2 if mode == "zero" else 1
                first = mode == modes[0]
                rows.append({"set": s, "mode": mode, "lang": v, "delta": d, "ci_low": d - 0.05, "ci_high": d + 0.05,
                             "random": 0.02 if first else np.nan, "random_low": 0.0 if first else np.nan,
                             "random_high": 0.04 if first else np.nan, "noise": 0.0})
    return pd.DataFrame(rows)


def test_ablation_matrix_heatmap_marks_cells_above_random_sets() -> None:
    fig = mpc.ablation_matrix_heatmap(matrix_frame())
    assert isinstance(fig, go.Figure)
    hm = fig.data[0]
    z = np.array(hm.z, dtype=float)
    assert z.shape == (3, 3) and np.allclose(np.diag(z), 0.3)
    text = np.array(hm.text)
    assert (text == "★").sum() == 3 and all(text[i, i] == "★" for i in range(3))  # only the diagonal beats random
    assert list(hm.x) == ["English", "Russian", "Japanese"]
    zero = mpc.ablation_matrix_heatmap(matrix_frame(), mode="zero")
    assert np.allclose(np.diag(np.array(zero.data[0].z, dtype=float)), 0.6)
    assert (np.array(zero.data[0].text) == "★").sum() == 0  # no random sets under the other modes
    with pytest.raises(MetricError, match="no rows for mode"):
        mpc.ablation_matrix_heatmap(matrix_frame(), mode="renormalize")
    with pytest.raises(MetricError, match="needs columns"):
        mpc.ablation_matrix_heatmap(matrix_frame().drop(columns="random"))


def claim(value: str, own: float, holds: bool) -> CausalClaim:
    e = Effect(own, own - 0.1, own + 0.1)
    z = Effect(0.0, 0.0, 0.0)
    return CausalClaim(experts={0: [1]}, by="lang", value=value, mode="reroute", target=e, others=Effect(0.02, 0, 0.04),
                       random=Effect(0.01, 0, 0.03), noise=z, noise_fp32=None, beats_random=1.0, n_random=3,
                       holds=holds)


def test_claims_plot_has_three_series_with_intervals() -> None:
    fig = mpc.claims_plot({"en": claim("en", 0.5, True), "ru": claim("ru", 0.05, False)})
    assert [t.name for t in fig.data] == ["own", "others", "random sets"]
    own = fig.data[0]
    assert list(own.x) == [0.5, 0.05] and list(own.y) == ["English", "Russian"]
    np.testing.assert_allclose(own.error_x.array, [0.1, 0.1])
    assert "1 of 2 claims hold" in fig.layout.title.text
    with pytest.raises(MetricError):
        mpc.claims_plot({})


def test_importance_heatmap_outlines_marked_cells() -> None:
    rows = [{"layer": 2, "expert": e, "lang": v, "delta": 0.1 * e, "ci_low": 0.0, "ci_high": 0.2}
            for e in range(4) for v in LANGS]
    fig = mpc.importance_heatmap(pd.DataFrame(rows), marks={3: "ru", 9: "en"})
    assert np.array(fig.data[0].z, dtype=float).shape == (4, 3)
    assert len(fig.layout.shapes) == 1  # expert 9 is not in the frame
    s = fig.layout.shapes[0]
    assert (s.x0, s.y0) == (0.5, 2.5)
    with pytest.raises(MetricError, match="one layer"):
        mpc.importance_heatmap(pd.DataFrame([*rows, {**rows[0], "layer": 3}]))


def test_modes_plot_shows_the_diagonal_per_mode() -> None:
    fig = mpc.modes_plot(matrix_frame())
    assert [t.name for t in fig.data] == ["reroute", "zero"]
    np.testing.assert_allclose(fig.data[0].y, [0.3] * 3)
    np.testing.assert_allclose(fig.data[1].y, [0.6] * 3)
    bad = matrix_frame().assign(set="other")
    with pytest.raises(MetricError, match="diagonal"):
        mpc.modes_plot(bad)


def test_steering_plot_band_and_line() -> None:
    rows = [{"delta": d, "control": "steering set", "set": -1, "share": d / 10, "share_low": 0, "share_high": 1}
            for d in (0, 2, 4)]
    rows += [{"delta": d, "control": "random set", "set": s, "share": s / 100} for d in (0, 2, 4) for s in range(3)]
    fig = mpc.steering_plot(pd.DataFrame(rows), target="Cyrillic script")
    assert [t.name for t in fig.data] == ["random sets (range)", "random sets (mean)", "steering set"]
    np.testing.assert_allclose(fig.data[2].y, [0, 0.2, 0.4])
    np.testing.assert_allclose(fig.data[1].y, [0.01] * 3)
    assert "Cyrillic" in fig.layout.title.text
    with pytest.raises(MetricError):
        mpc.steering_plot(pd.DataFrame({"delta": [0]}))
