"""expert_placement(holdout=True): fit the placement on half of the documents, score it on the other half."""

from __future__ import annotations

import numpy as np
import pytest

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace
from moe_routing.metrics._common import hash_uniform

from .conftest import make_trace, split_by_docs


def loads(trace: RoutingTrace, mask: np.ndarray, li: int) -> np.ndarray:
    out = np.zeros(trace.num_experts)
    for t in np.flatnonzero(mask):
        for x in trace.expert_ids[t, li]:
            if x >= 0:
                out[x] += 1
    return out


def max_over_mean(load: np.ndarray, placement: np.ndarray, g: int) -> float:
    dev = [sum(load[e] for e in range(len(load)) if placement[e] == d) for d in range(g)]
    return max(dev) / (sum(load) / g)


@pytest.mark.parametrize("seed", [0, 1])
def test_holdout_matches_a_loop(seed):
    t = make_trace(2, n_docs=30, num_experts=8, skew=1.5, empty_frac=0.05)
    df = mr.metrics.expert_placement(t, 4, holdout=True, seed=seed)
    fit = hash_uniform(seed, t.doc_ids) < 0.5
    assert 0 < fit.mean() < 1
    contiguous = np.repeat(np.arange(4), 2)
    for li, row in enumerate(df.itertuples()):
        lf, lh = loads(t, fit, li), loads(t, ~fit, li)
        placed = mr.metrics.greedy_placement(lf, 4)
        assert row.max_over_mean_in_sample == pytest.approx(max_over_mean(lf, placed, 4))
        assert row.max_over_mean_heldout == pytest.approx(max_over_mean(lh, placed, 4))
        assert row.max_over_mean_oracle == pytest.approx(max_over_mean(lh, mr.metrics.greedy_placement(lh, 4), 4))
        assert row.max_over_mean_contiguous == pytest.approx(max_over_mean(lh, contiguous, 4))
        assert row.balancedness_heldout == pytest.approx(1 / row.max_over_mean_heldout)
        assert row.gain_heldout == pytest.approx(row.max_over_mean_contiguous / row.max_over_mean_heldout)
        assert row.fit_tokens == fit.sum() and row.heldout_tokens == (~fit).sum()
    pd_default = mr.metrics.expert_placement(t, 4)
    assert "max_over_mean_greedy" in pd_default.columns  # holdout=False keeps the old frame


def test_holdout_exposes_a_placement_fitted_to_noise():
    """Each document sends all its tokens to one random expert: the fit half's loads are noise, so its
    placement is much better in sample than on the other half."""
    rng = np.random.default_rng(5)
    n_docs, e = 16, 8
    lens = rng.integers(50, 200, size=n_docs)
    ids = np.repeat(rng.integers(0, e, size=n_docs), lens)[:, None, None].astype(np.int16)
    t = RoutingTrace.from_arrays(ids, np.ones(ids.shape, np.float32), num_experts=e,
                                 doc_ids=np.repeat(np.arange(n_docs), lens))
    df = mr.metrics.expert_placement(t, 4, holdout=True)
    row = df.iloc[0]
    assert row.max_over_mean_in_sample < row.max_over_mean_heldout


def test_holdout_streams_and_checks_inputs():
    t = make_trace(3, n_docs=20, skew=1.0)
    a = mr.metrics.expert_placement(t, 2, holdout=True, seed=7)
    b = mr.metrics.expert_placement(split_by_docs(t, 4), 2, holdout=True, seed=7)
    np.testing.assert_allclose(a.drop(columns=["layer"]).to_numpy(float), b.drop(columns=["layer"]).to_numpy(float))
    one = t.select(t.doc_ids == t.doc_ids[0])
    with pytest.raises(MetricError, match="both halves"):
        mr.metrics.expert_placement(one, 2, holdout=True)
    with pytest.raises(MetricError, match="num_devices"):
        mr.metrics.expert_placement(t, 0, holdout=True)
