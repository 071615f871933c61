"""Load metrics against brute-force loops, scipy and transformers' own auxiliary loss."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace

from .conftest import make_trace


def brute_counts(trace: RoutingTrace) -> dict[tuple[int, int], int]:
    counts: Counter = Counter()
    for t in range(trace.num_tokens):
        for li, layer in enumerate(trace.layers):
            for s in range(trace.top_k):
                e = int(trace.expert_ids[t, li, s])
                if e >= 0:
                    counts[(layer, e)] += 1
    return counts


def test_expert_load_matches_a_loop():
    t = make_trace(2, empty_frac=0.2)
    df = mr.metrics.expert_load(t)
    assert list(df.columns[:4]) == ["layer", "expert", "count", "share"]
    assert len(df) == t.num_layers * t.num_experts
    brute = brute_counts(t)
    for row in df.itertuples():
        assert row.count == brute.get((row.layer, row.expert), 0)
    for _, g in df.groupby("layer"):
        assert g["share"].sum() == pytest.approx(1.0)
        assert g["load_ratio"].mean() == pytest.approx(1.0)


def test_expert_load_top1_and_weighted(trace):
    top = mr.metrics.expert_load(trace, top1=True)
    t1 = trace.top1()
    for li, layer in enumerate(trace.layers):
        got = top[top.layer == layer]["count"].to_numpy()
        assert np.array_equal(got, np.bincount(t1[:, li], minlength=trace.num_experts))
    wdf = mr.metrics.expert_load(trace, weighted=True)
    li = 1
    expect = np.zeros(trace.num_experts)
    for t in range(trace.num_tokens):
        for s in range(trace.top_k):
            expect[trace.expert_ids[t, li, s]] += trace.weights[t, li, s]
    assert np.allclose(wdf[wdf.layer == trace.layers[li]]["weight"], expect, rtol=1e-6)


def test_load_balance_definitions():
    t = make_trace(3, num_experts=6, top_k=2, skew=1.5)
    lb = mr.metrics.load_balance(t)
    assert {"layer", "cv", "max_over_mean", "entropy_norm", "gini"} <= set(lb.columns)
    assert list(lb["layer"]) == list(t.layers)
    brute = brute_counts(t)
    for row in lb.itertuples():
        c = np.array([brute.get((row.layer, e), 0) for e in range(t.num_experts)], dtype=float)
        assert row.cv == pytest.approx(np.std(c) / np.mean(c))
        assert row.max_over_mean == pytest.approx(c.max() / c.mean())
        assert row.entropy_norm == pytest.approx(scipy.stats.entropy(c) / math.log(t.num_experts))
        gini = sum(abs(a - b) for a in c for b in c) / (2 * len(c) ** 2 * c.mean())
        assert row.gini == pytest.approx(gini)
        assert row.dead == int((c == 0).sum())


def test_load_balance_baselines():
    # perfectly balanced: every expert the same count
    ids = np.tile(np.arange(8, dtype=np.int16).reshape(4, 2), (10, 1))[:, None, :]
    t = RoutingTrace.from_arrays(ids, np.ones(ids.shape), num_experts=8)
    row = mr.metrics.load_balance(t).iloc[0]
    assert row.cv == pytest.approx(0) and row.gini == pytest.approx(0)
    assert row.entropy_norm == pytest.approx(1) and row.max_over_mean == pytest.approx(1)
    # one expert takes everything (k = 1)
    t = RoutingTrace.from_arrays(np.zeros((20, 1, 1)), np.ones((20, 1, 1)), num_experts=4)
    row = mr.metrics.load_balance(t).iloc[0]
    assert row.gini == pytest.approx(3 / 4) and row.entropy_norm == pytest.approx(0)
    assert row.dead == 3 and row.max_over_mean == pytest.approx(4)


def test_cv_random_matches_simulated_random_routing():
    rng = np.random.default_rng(0)
    n, e, k = 4000, 16, 4
    cvs = []
    for _ in range(30):
        ids = np.argsort(rng.random((n, 1, e)), axis=2)[:, :, :k]
        cvs.append(mr.metrics.load_balance(RoutingTrace.from_arrays(ids, num_experts=e)).cv.iloc[0])
    expect = mr.metrics.load_balance(RoutingTrace.from_arrays(ids, num_experts=e)).cv_random.iloc[0]
    assert np.mean(cvs) == pytest.approx(expect, rel=0.15)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), e=st.integers(4, 12))
def test_load_balance_bounds_and_relabelling(seed, k, e):
    t = make_trace(seed, num_experts=e, top_k=k, n_docs=3, empty_frac=0.1, skew=float(seed % 3))
    lb = mr.metrics.load_balance(t)
    assert ((lb.gini >= -1e-12) & (lb.gini <= (e - 1) / e + 1e-12)).all()
    assert ((lb.entropy_norm >= -1e-12) & (lb.entropy_norm <= 1 + 1e-12)).all()
    assert (lb.max_over_mean >= 1 - 1e-12).all() and (lb.cv >= 0).all()
    perm = np.random.default_rng(seed).permutation(e)
    ids = np.where(t.expert_ids >= 0, perm[np.maximum(t.expert_ids, 0)], -1)
    relabelled = RoutingTrace.from_arrays(ids, t.weights, layers=t.layers, num_experts=e, doc_ids=t.doc_ids)
    lb2 = mr.metrics.load_balance(relabelled)
    cols = ["cv", "max_over_mean", "entropy_norm", "gini", "dead"]
    assert np.allclose(lb[cols].to_numpy(float), lb2[cols].to_numpy(float))
    load = mr.metrics.expert_load(t)
    assert load.groupby("layer")["count"].sum().to_numpy().tolist() == [
        int((t.expert_ids[:, i] >= 0).sum()) for i in range(t.num_layers)
    ]


# ---------------------------------------------------------------------------------------------- aux loss
def _transformers_loss(logits: np.ndarray, e: int, k: int) -> float:
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gate = tuple(torch.tensor(logits[:, i].astype(np.float32)) for i in range(logits.shape[1]))
    return float(load_balancing_loss_func(gate, e, k))


@pytest.mark.parametrize(("e", "k", "skew"), [(8, 2, 0.0), (16, 4, 2.1), (6, 1, 1.1)])
def test_load_balancing_loss_equals_transformers(e, k, skew):
    rng = np.random.default_rng(e * 10 + k)
    n, n_layers = 300, 3
    # distinct float16 logits per row (no ties at the top-k boundary)
    base = np.argsort(rng.random((n, n_layers, e)), axis=2).astype(np.float32) * 0.25
    base[:, :, 0] += skew
    logits = base.astype(np.float16)
    ids = np.argsort(-logits.astype(np.float32), axis=2)[:, :, :k]
    t = RoutingTrace.from_arrays(ids, np.ones(ids.shape), num_experts=e, router_logits=logits)
    ours = mr.metrics.load_balancing_loss(t)
    assert ours == pytest.approx(_transformers_loss(logits, e, k), rel=1e-5)
    assert mr.metrics.load_balancing_loss(t, selection="trace") == pytest.approx(ours, rel=1e-6)
    per_layer = mr.metrics.load_balancing_loss_by_layer(t)
    for li in range(n_layers):
        single = _transformers_loss(logits[:, li:li + 1], e, k)
        assert per_layer.aux_loss.iloc[li] == pytest.approx(single, rel=1e-5)
    assert (per_layer.balanced == k).all()


def test_load_balancing_loss_needs_logits(trace):
    with pytest.raises(MetricError, match="logits=True"):
        mr.metrics.load_balancing_loss(trace)


# ---------------------------------------------------------------------------------------------- position
def test_load_by_position_matches_a_loop(trace):
    df = mr.metrics.load_by_position(trace, bins=[0, 5, 20])
    for (layer, start), g in df.groupby(["layer", "pos_start"]):
        li = trace.layer_index(layer)
        end = {0: 5, 5: 20, 20: None}[start]
        mask = (trace.positions >= start) & (True if end is None else trace.positions < end)
        c = np.bincount(trace.expert_ids[mask, li].ravel(), minlength=trace.num_experts)
        assert np.array_equal(g["count"].to_numpy(), c)
        assert g["pos_end"].iloc[0] == (-1 if end is None else end)
        assert g["share"].sum() == pytest.approx(1)
    default = mr.metrics.load_by_position(trace)
    assert sorted(default.pos_start.unique())[:4] == [0, 1, 2, 4]
    width = mr.metrics.load_by_position(trace, bins=10)
    assert set(width.pos_start) == {0, 10, 20, 30, 40, 50}


# ---------------------------------------------------------------------------------------------- capacity
def brute_capacity(trace: RoutingTrace, c: float, priority: str, group_size: int | None = None
                   ) -> dict[int, tuple[int, int]]:
    """Switch-style queues per (group, layer, expert), simulated with Python loops; group = doc (or window)."""
    e, k = trace.num_experts, trace.top_k
    st_ = trace.sorted_by_weight()
    window = np.zeros(trace.num_tokens, int) if group_size is None else trace.positions // group_size
    groups = sorted(set(zip(trace.doc_ids.tolist(), window.tolist(), strict=True)))
    out = {}
    for li, layer in enumerate(trace.layers):
        dropped = routed = 0
        for doc, win in groups:
            toks = np.flatnonzero((trace.doc_ids == doc) & (window == win))
            cap = max(1, math.floor(c * len(toks) * k / e))
            order = ([(s, t) for s in range(k) for t in toks] if priority == "slot"
                     else [(s, t) for t in toks for s in range(k)])
            fill: Counter = Counter()
            for s, t in order:
                x = int(st_.expert_ids[t, li, s])
                if x < 0:
                    continue
                routed += 1
                if fill[x] >= cap:
                    dropped += 1
                else:
                    fill[x] += 1
        out[layer] = (dropped, routed)
    return out


@pytest.mark.parametrize("priority", ["slot", "token"])
def test_capacity_drop_matches_a_queue_simulation(priority):
    t = make_trace(4, n_docs=5, top_k=2, num_experts=4, empty_frac=0.1, skew=1.0)
    df = mr.metrics.capacity_drop(t, (0.5, 1.0, 1.25), priority=priority)
    for c in (0.5, 1.0, 1.25):
        brute = brute_capacity(t, c, priority)
        for layer, (dropped, routed) in brute.items():
            row = df[(df.capacity_factor == c) & (df.layer == layer)].iloc[0]
            assert row.slots == routed
            assert row.drop_rate == pytest.approx(dropped / routed)
    assert (df.groupby("layer").drop_rate.apply(lambda s: s.is_monotonic_decreasing)).all()
    assert df.drop_rate_random.between(0, 1).all()
    windows = mr.metrics.capacity_drop(t, (1.0,), priority=priority, group_size=16)
    for layer, (dropped, routed) in brute_capacity(t, 1.0, priority, group_size=16).items():
        assert windows[windows.layer == layer].drop_rate.iloc[0] == pytest.approx(dropped / routed)


def test_capacity_drops_towards_the_end():
    t = make_trace(5, n_docs=20, doc_len=(64, 64), top_k=1, num_experts=4, skew=3.0)
    df = mr.metrics.capacity_drop(t, (1.0,), by_position=True, bins=[0, 16, 32, 48])
    g = df[df.layer == t.layers[0]].sort_values("pos_start")
    assert g.drop_rate.iloc[-1] > g.drop_rate.iloc[0]
    whole = mr.metrics.capacity_drop(t, (1.0,))
    # position rows add up to the overall rate
    sub = df[df.layer == t.layers[0]]
    overall = whole[whole.layer == t.layers[0]].iloc[0]
    assert (sub.drop_rate * sub.slots).sum() / sub.slots.sum() == pytest.approx(overall.drop_rate)


# ---------------------------------------------------------------------------------------------- placement
def test_greedy_placement_is_near_optimal():
    rng = np.random.default_rng(0)
    for _ in range(20):
        load = rng.integers(1, 100, size=8).astype(float)
        dev = mr.metrics.greedy_placement(load, 2)
        assert np.bincount(dev, minlength=2).tolist() == [4, 4]
        greedy_max = np.bincount(dev, weights=load, minlength=2).max()
        best = min(max(load[list(s)].sum(), load.sum() - load[list(s)].sum())
                   for s in itertools.combinations(range(8), 4))
        assert best <= greedy_max <= 4 / 3 * best + 1e-9
    free = mr.metrics.greedy_placement(np.array([10.0, 1, 1, 1]), 2, balanced=False)
    assert np.bincount(free, minlength=2).tolist() in ([1, 3], [3, 1])


def test_expert_placement_frame():
    t = make_trace(6, skew=2.0, num_experts=8)
    df = mr.metrics.expert_placement(t, 4)
    assert list(df.layer) == list(t.layers)
    assert (df.max_over_mean_greedy >= 1 - 1e-12).all()
    assert (df.max_over_mean_greedy <= df.max_over_mean_contiguous + 1e-12).all()
    assert np.allclose(df.balancedness_greedy, 1 / df.max_over_mean_greedy)
    with pytest.raises(MetricError):
        mr.metrics.expert_placement(t, 0)


def test_usage_counts_is_an_xarray_with_named_dims(trace):
    c = mr.metrics.usage_counts(trace, "lang")
    # issue 15: the label dimension is named after the label; ``value`` stays as a deprecated coordinate
    assert c.dims == ("lang", "layer", "expert")
    assert list(c.coords["layer"].values) == list(trace.layers)
    assert sorted(c.coords["lang"].values.tolist()) == ["de", "en", "ja"]
    assert c.coords["value"].values.tolist() == c.coords["lang"].values.tolist()
    assert int(c.sum()) == int((trace.expert_ids >= 0).sum())
    assert c.attrs["tokens"].sum() == trace.num_tokens


def _queue_rank_by_sort(group, ids, num_experts, priority):
    """The former implementation (one stable sort of tokens x layers x k keys): the reference."""
    n_layers = ids.shape[1]
    if priority == "slot":
        arr, g, layer = ids.transpose(2, 0, 1), group[None, :, None], np.arange(n_layers)[None, None, :]
    else:
        arr, g, layer = ids, group[:, None, None], np.arange(n_layers)[None, :, None]
    flat = arr.astype(np.int64)
    key = ((g.astype(np.int64) * n_layers + layer) * (num_experts + 1) + flat + 1).reshape(-1)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    starts = np.r_[True, sk[1:] != sk[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(sk)), 0))
    rank = np.empty(len(sk), dtype=np.int64)
    rank[order] = np.arange(len(sk)) - first
    rank = rank.reshape(arr.shape)
    rank[flat < 0] = -1
    return rank.transpose(1, 2, 0) if priority == "slot" else rank


@pytest.mark.parametrize("priority", ["slot", "token"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_queue_rank_equals_the_sort_reference(priority, contiguous):
    from moe_routing.metrics.load import _queue_rank

    rng = np.random.default_rng(5)
    n, n_layers, k, e = 400, 3, 4, 6
    ids = np.argsort(rng.random((n, n_layers, e)), axis=2)[:, :, :k].astype(np.int16)
    ids[rng.random(ids.shape) < 0.1] = -1
    group = np.sort(rng.integers(0, 9, n)) if contiguous else rng.integers(0, 9, n)
    assert np.array_equal(_queue_rank(group, ids, e, priority), _queue_rank_by_sort(group, ids, e, priority))


def test_random_topk_equals_the_per_slot_hash_definition():
    """The shared-chain draw gives exactly hash_uniform(seed, doc, pos, layer, slot, attempt) per slot."""
    from moe_routing.metrics._bootstrap import hash_uniform
    from moe_routing.metrics.load import _random_topk

    n, n_layers, e, k = 300, 3, 5, 4
    docs, pos = np.arange(n) // 7, np.arange(n) % 7
    got = _random_topk((n, n_layers), e, k, 11, (docs, pos))
    ref = np.empty((n, n_layers, k), dtype=np.int64)
    layer = np.arange(n_layers)[None, :]
    for s in range(k):
        cur, todo, attempt = np.zeros((n, n_layers), np.int64), np.ones((n, n_layers), bool), 0
        while todo.any():
            u = hash_uniform(11, docs[:, None], pos[:, None], layer, s, attempt)
            cur = np.where(todo, np.minimum((u * e).astype(np.int64), e - 1), cur)
            todo = np.zeros_like(todo)
            for prev in range(s):
                todo |= cur == ref[:, :, prev]
            attempt += 1
        ref[:, :, s] = cur
    assert np.array_equal(got, ref)
    assert all(len(set(row)) == k for row in got.reshape(-1, k).tolist())


def test_random_topk_is_distinct_uniform_and_chunk_free():
    from moe_routing.metrics.load import _random_topk

    docs = np.repeat(np.arange(200), 50)
    pos = np.tile(np.arange(50), 200)
    r = _random_topk((len(docs), 3), 8, 3, 0, (docs, pos))
    assert r.shape == (10_000, 3, 3)
    s = np.sort(r, axis=2)
    assert (np.diff(s, axis=2) > 0).all()  # k distinct experts per (token, layer)
    freq = np.bincount(r.ravel(), minlength=8) / r.size
    assert np.allclose(freq, 1 / 8, atol=0.01)
    half = _random_topk((5000, 3), 8, 3, 0, (docs[5000:], pos[5000:]))
    assert np.array_equal(half, r[5000:])  # depends on (doc, position), not on the chunk
