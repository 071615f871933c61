"""Co-activation: P(E_j | E_i) against brute force, its random baselines in both modes, relabelling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_routing as mr
from moe_routing import RoutingTrace, TraceError

from .conftest import make_trace


def brute_coactivation(trace: RoutingTrace, li: int, adjacent: bool) -> np.ndarray:
    e = trace.num_experts
    st_ = trace.sorted_by_weight()
    pair = np.zeros((e, e))
    single = np.zeros(e)
    for t in range(trace.num_tokens):
        experts = [int(x) for x in st_.expert_ids[t, li]]
        for x in experts:
            if x >= 0:
                single[x] += 1
        pairs = itertools.pairwise(experts) if adjacent else itertools.combinations(experts, 2)
        for a, b in pairs:
            if a >= 0 and b >= 0:
                pair[a, b] += 1
                pair[b, a] += 1
    out = pair / np.maximum(single, 1)[:, None]
    np.fill_diagonal(out, 0)
    return out


@pytest.mark.parametrize("mode", ["all", "adjacent"])
def test_coactivation_matches_brute_force(mode):
    t = make_trace(10, top_k=4, num_experts=9, empty_frac=0.1, skew=1.0)
    for li, layer in enumerate(t.layers):
        got = mr.metrics.coactivation(t, layer, mode=mode)
        assert got.shape == (9, 9)
        assert np.allclose(got, brute_coactivation(t, li, mode == "adjacent"))
        assert np.all(np.diag(got) == 0)
    # an expert never chosen has a zero row
    ids = np.array([[[0, 1]], [[1, 2]], [[0, 2]]])
    m = mr.metrics.coactivation(RoutingTrace.from_arrays(ids, num_experts=4), 0)
    assert np.array_equal(m[3], np.zeros(4)) and m[0, 1] == 0.5 and m[1, 2] == 0.5


def test_coactivation_rows_and_random_baseline():
    rng = np.random.default_rng(0)
    n, e, k = 5000, 10, 3
    ids = np.argsort(rng.random((n, 1, e)), axis=2)[:, :, :k]
    t = RoutingTrace.from_arrays(ids, num_experts=e)
    m = mr.metrics.coactivation(t, 0)
    assert np.allclose(m.sum(axis=1), k - 1)
    off = m[~np.eye(e, dtype=bool)]
    assert off.mean() == pytest.approx((k - 1) / (e - 1), rel=0.01)
    s = mr.metrics.coactivation_summary(t)
    assert s.random.iloc[0] == pytest.approx((k - 1) / (e - 1))
    allm = mr.metrics.coactivation_matrices(t)
    assert allm.dims == ("layer", "expert", "other")
    assert np.allclose(allm.sel(layer=0).values, m)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 4))
def test_coactivation_relabelling_permutes_the_matrix(seed, k):
    e = 7
    t = make_trace(seed, num_experts=e, top_k=k, n_docs=3, skew=1.0)
    perm = np.random.default_rng(seed).permutation(e)
    t2 = RoutingTrace.from_arrays(perm[t.expert_ids], t.weights, layers=t.layers, num_experts=e)
    a = mr.metrics.coactivation(t, t.layers[0])
    b = mr.metrics.coactivation(t2, t.layers[0])
    assert np.allclose(b[np.ix_(perm, perm)], a)


def test_coactivation_unknown_layer(trace):
    with pytest.raises(TraceError, match="MoE layers are"):
        mr.metrics.coactivation(trace, 2)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_coactivation_random_baseline_matches_simulated_random_routing_in_both_modes(k):
    """Random routing with random weights: the mean off-diagonal P(E_j | E_i) is the stated ``random`` in the
    all-pairs mode and in OLMoE's adjacent mode (where it is 2(k-1)/(k(E-1)), not (k-1)/(E-1))."""
    rng = np.random.default_rng(k)
    n, e = 20_000, 16
    ids = np.argsort(rng.random((n, 2, e)), axis=2)[:, :, :k]
    w = rng.random((n, 2, k)).astype(np.float32)
    t = RoutingTrace.from_arrays(ids, w, num_experts=e)
    off = ~np.eye(e, dtype=bool)
    for mode in ("all", "adjacent"):
        m = mr.metrics.coactivation_matrices(t, mode=mode)
        simulated = m.values[:, off].mean()
        assert m.attrs["random"] == pytest.approx(simulated, rel=0.02), mode
        s = mr.metrics.coactivation_summary(t, mode=mode)
        assert np.allclose(s.random, simulated, rtol=0.02), mode
        assert s.random.iloc[0] == pytest.approx(mr.metrics.coactivation_random(e, k, mode))
    assert mr.metrics.coactivation_random(e, k, "adjacent") == pytest.approx(2 * (k - 1) / (k * (e - 1)))
    with pytest.raises(mr.errors.MetricError, match="mode"):
        mr.metrics.coactivation_random(e, k, "pairs")


def test_coactivation_docstring_names_olmoes_function():
    assert "do_coactivation_analysis" in mr.metrics.coactivation.__doc__
    assert "do_correlation_analysis" not in mr.metrics.coactivation.__doc__
