"""Sequence figures (plots/sequence): consecutive-token rates and experts by position."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moe_routing import RoutingTrace, TraceError
from moe_routing.metrics import (
    consecutive_same_expert,
    load_by_position,
)
from moe_routing.plots import (
    consecutive_same_expert_plot,
    expert_by_position,
)

from ._synth import LAYERS


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
