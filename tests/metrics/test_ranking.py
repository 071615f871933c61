"""The one ranking rule: fast first / second choice and top-k views equal the RoutingTrace methods."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_routing import RoutingTrace
from moe_routing.metrics import _ranking as M


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), nan=st.booleans(), ties=st.booleans())
def test_fast_views_equal_trace_methods(seed, k, nan, ties):
    rng = np.random.default_rng(seed)
    n, n_layers, e = 40, 2, 9
    ids = np.argsort(rng.random((n, n_layers, e)), axis=2)[:, :, :k].astype(np.int16)
    w = rng.integers(0, 3, size=ids.shape).astype(np.float32) if ties else rng.random(ids.shape).astype(np.float32)
    empty = rng.random(ids.shape) < 0.2
    ids[empty] = -1
    if nan:
        w[rng.random(ids.shape) < 0.2] = np.nan
    t = RoutingTrace.from_arrays(ids, w, layers=[0, 5], num_experts=e)
    assert np.array_equal(M.top1(t), t.top1())
    ref = t.sorted_by_weight().expert_ids
    assert np.array_equal(M.sorted_ids(t), ref)
    for kk in range(1, k + 1):
        got = np.sort(M.topk_ids(t, kk), axis=2)
        assert np.array_equal(got, np.sort(ref[:, :, :kk], axis=2))
    if k >= 2:
        first, second = M.top2(t)
        assert np.array_equal(first, ref[:, :, 0]) and np.array_equal(second, ref[:, :, 1])
    ids_only = RoutingTrace.from_arrays(ids, num_experts=e)
    assert np.array_equal(M.top1(ids_only), ids_only.top1())
    assert np.array_equal(M.topk_ids(ids_only, 1)[:, :, 0], ids[:, :, 0])


def test_ranking_refuses_weights_that_were_not_read(tmp_path):
    """A metric that ranks by weight must ask chunks() for the weights column: the guard catches the omission."""
    from moe_routing.metrics._source import chunks

    from .conftest import make_trace

    t = make_trace(0, top_k=3)
    t.save(tmp_path / "t")
    chunk = next(chunks(tmp_path / "t", columns=()))
    assert chunk.meta["weights_read"] is False and not chunk.weights.any()
    with pytest.raises(RuntimeError, match="columns=WEIGHTS"):
        M.top1(chunk)
    full = next(chunks(tmp_path / "t", columns={"weights"}))
    assert np.array_equal(M.top1(full), t.top1())


def test_sorted_slots_equal_sorted_by_weight():
    from .conftest import make_trace

    t = make_trace(3, top_k=4, empty_frac=0.2)
    ids, w = M.sorted_slots(t, 3)
    ref = t.sorted_by_weight()
    assert np.array_equal(ids, ref.expert_ids[:, :, :3]) and np.array_equal(w, ref.weights[:, :, :3])
