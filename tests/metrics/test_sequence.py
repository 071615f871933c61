"""Cross-layer and sequence metrics against brute-force loops and scipy."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import mutual_info_score

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace, TraceError

from .conftest import make_trace, split_by_docs


def test_transitions_match_a_loop(skewed):
    p = mr.metrics.transitions(skewed)
    c = mr.metrics.transitions(skewed, normalize=False)
    assert p.dims == ("layer", "expert", "next_expert")
    assert list(p.coords["layer"].values) == list(skewed.layers[:-1])
    assert list(p.coords["next_layer"].values) == list(skewed.layers[1:])
    t1 = skewed.top1()
    brute = Counter(zip(t1[:, 1].tolist(), t1[:, 2].tolist(), strict=True))
    for (a, b), n in brute.items():
        assert int(c.sel(layer=skewed.layers[1]).values[a, b]) == n
    rows = p.values.sum(axis=2)
    assert np.allclose(rows[~np.isnan(rows)], 1)


def test_transition_summary_matches_sklearn(skewed):
    df = mr.metrics.transition_summary(skewed)
    t1 = skewed.top1()
    for i, row in enumerate(df.itertuples()):
        mi = mutual_info_score(t1[:, i], t1[:, i + 1])
        h_next = scipy.stats.entropy(np.bincount(t1[:, i + 1]))
        assert row.nmi == pytest.approx(mi / h_next)
        assert row.cond_entropy_bits == pytest.approx((h_next - mi) / math.log(2))
        assert (row.layer, row.next_layer) == (skewed.layers[i], skewed.layers[i + 1])


def test_transitions_need_two_layers(trace):
    with pytest.raises(MetricError, match="two MoE layers"):
        mr.metrics.transitions(trace.select(layers=[3]))


def test_path_entropy_matches_scipy(skewed):
    t1 = skewed.top1()
    full = mr.metrics.path_entropy(skewed)
    paths = Counter(map(tuple, t1.tolist()))
    assert full.entropy_bits.iloc[0] == pytest.approx(scipy.stats.entropy(list(paths.values()), base=2))
    assert full.distinct_paths.iloc[0] == len(paths)
    indep = sum(scipy.stats.entropy(np.bincount(t1[:, i]), base=2) for i in range(3))
    assert full.independent_bits.iloc[0] == pytest.approx(indep)
    two = mr.metrics.path_entropy(skewed, depth=2)
    assert len(two) == 2
    pairs = Counter(zip(t1[:, 1].tolist(), t1[:, 2].tolist(), strict=True))
    assert two.entropy_bits.iloc[1] == pytest.approx(scipy.stats.entropy(list(pairs.values()), base=2))
    # hashed keys (too many layers for an exact integer key) give the same numbers
    deep = RoutingTrace.from_arrays(np.repeat(skewed.expert_ids, 8, axis=1), np.repeat(skewed.weights, 8, axis=1),
                                    num_experts=8, doc_ids=skewed.doc_ids)
    d = mr.metrics.path_entropy(deep)
    assert d.entropy_bits.iloc[0] == pytest.approx(full.entropy_bits.iloc[0])


# ---------------------------------------------------------------------------------------------- Mixtral Table 5
def brute_consecutive(trace: RoutingTrace, li: int) -> tuple[float, float]:
    st_ = trace.sorted_by_weight()
    same1 = same2 = pairs = 0
    for t in range(trace.num_tokens - 1):
        if trace.doc_ids[t] != trace.doc_ids[t + 1] or trace.positions[t + 1] != trace.positions[t] + 1:
            continue
        a = [int(x) for x in st_.expert_ids[t, li, :2] if x >= 0]
        b = [int(x) for x in st_.expert_ids[t + 1, li, :2] if x >= 0]
        if not a or not b:
            continue
        pairs += 1
        same1 += a[0] == b[0]
        same2 += bool(set(a) & set(b))
    return same1 / pairs, same2 / pairs


def test_consecutive_same_expert_matches_mixtral_definitions():
    t = make_trace(11, top_k=3, num_experts=8, empty_frac=0.05)
    df = mr.metrics.consecutive_same_expert(t, n_boot=50)
    assert list(df.columns[:4]) == ["layer", "first", "first_or_second", "random_first"]
    for li, row in enumerate(df.itertuples()):
        first, first2 = brute_consecutive(t, li)
        assert row.first == pytest.approx(first)
        assert row.first_or_second == pytest.approx(first2)
        assert row.random_first == pytest.approx(1 / 8)
        assert row.random_first_or_second == pytest.approx(1 - (6 / 8) * (5 / 7))  # Mixtral: about 46%
        assert row.first_low <= row.first <= row.first_high


def test_consecutive_random_routing_hits_the_baseline():
    rng = np.random.default_rng(0)
    n, e = 20_000, 8
    ids = np.argsort(rng.random((n, 1, e)), axis=2)[:, :, :2]
    w = np.sort(rng.random((n, 1, 2)), axis=2)[:, :, ::-1]
    t = RoutingTrace.from_arrays(ids, w, num_experts=e, doc_ids=np.arange(n) // 500)
    row = mr.metrics.consecutive_same_expert(t, n_boot=100).iloc[0]
    assert row.first == pytest.approx(row.random_first, abs=0.01)
    assert row.first_or_second == pytest.approx(row.random_first_or_second, abs=0.015)
    assert row.first_low < row.random_first < row.first_high


def test_consecutive_by_label_and_k1():
    t = make_trace(12, n_docs=9)
    df = mr.metrics.consecutive_same_expert(t, by="lang", n_boot=0)
    assert set(df.lang) == {"en", "de", "ja"} and len(df) == 9
    sub = t.where(lang="de")
    alone = mr.metrics.consecutive_same_expert(sub, n_boot=0)
    assert np.allclose(df[df.lang == "de"]["first"].to_numpy(), alone["first"].to_numpy())
    k1 = mr.metrics.consecutive_same_expert(RoutingTrace.from_arrays(t.expert_ids[:, :, :1], num_experts=8,
                                                                     doc_ids=t.doc_ids), n_boot=0)
    assert k1.first_or_second.isna().all()


def test_consecutive_ignores_document_boundaries():
    # every document routes all its tokens to one expert, different per document
    docs = np.repeat(np.arange(10), 5)
    ids = (docs % 4)[:, None, None].repeat(2, axis=2)
    ids[:, :, 1] = 4 + docs[:, None] % 4
    t = RoutingTrace.from_arrays(ids, np.tile([0.9, 0.1], (50, 1, 1)), num_experts=8, doc_ids=docs)
    row = mr.metrics.consecutive_same_expert(t, n_boot=0).iloc[0]
    assert row.first == 1.0 and row.pairs == 40


# ---------------------------------------------------------------------------------------------- agreement
def brute_agreement(a: RoutingTrace, b: RoutingTrace, li: int, k: int) -> float:
    sa, sb = a.sorted_by_weight(), b.sorted_by_weight()
    vals = []
    for t in range(a.num_tokens):
        x = {int(v) for v in sa.expert_ids[t, li, :k] if v >= 0}
        y = {int(v) for v in sb.expert_ids[t, li, :k] if v >= 0}
        vals.append(len(x & y) / k)
    return float(np.mean(vals))


def perturbed(a: RoutingTrace, seed: int) -> RoutingTrace:
    """The same tokens routed differently: half of the (token, layer) rows get a relabelled expert set."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(a.num_experts)
    mask = rng.random(a.expert_ids.shape[:2]) < 0.5
    ids = np.where(mask[:, :, None] & (a.expert_ids >= 0), perm[np.maximum(a.expert_ids, 0)], a.expert_ids)
    w = rng.random(a.weights.shape).astype(np.float32)
    return RoutingTrace.from_arrays(ids, w, layers=a.layers, num_experts=a.num_experts, token_ids=a.token_ids,
                                    doc_ids=a.doc_ids, positions=a.positions)


def test_router_agreement_matches_set_intersection():
    a = make_trace(13, top_k=4, empty_frac=0.1)
    b = perturbed(a, 14)
    df = mr.metrics.router_agreement(a, b)
    for li, row in enumerate(df.itertuples()):
        assert row.agreement == pytest.approx(brute_agreement(a, b, li, 4))
        assert row.top1 == pytest.approx(np.mean(a.top1()[:, li] == b.top1()[:, li]))
        assert row.random == pytest.approx(4 / 8)
    k2 = mr.metrics.router_agreement(a, b, k=2)
    assert k2.agreement.iloc[0] == pytest.approx(brute_agreement(a, b, 0, 2))
    assert (mr.metrics.router_agreement(a, a).agreement > 0.85).all()  # empty slots count as misses


def test_router_agreement_streams_differently_sharded_traces():
    a = make_trace(15, top_k=2)
    b = perturbed(a, 16)
    whole = mr.metrics.router_agreement(a, b)
    pieces = mr.metrics.router_agreement(split_by_docs(a, 3), split_by_docs(b, 5))
    assert np.allclose(whole.agreement, pieces.agreement) and np.allclose(whole.top1, pieces.top1)


def test_router_agreement_refuses_different_tokens(trace):
    other = trace.with_labels()
    other.token_ids = (other.token_ids + 1).astype(np.int32)
    with pytest.raises(TraceError, match="different token ids"):
        mr.metrics.router_agreement(trace, other)
    with pytest.raises(TraceError, match="different numbers of tokens"):
        mr.metrics.router_agreement(trace, trace.select(np.arange(10)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4))
def test_agreement_and_consecutive_bounds(seed, k):
    t = make_trace(seed, top_k=k, n_docs=4, empty_frac=0.1)
    agr = mr.metrics.router_agreement(t, t)
    assert agr.agreement.between(0, 1).all() and (agr.top1 == 1).all()
    cons = mr.metrics.consecutive_same_expert(t, n_boot=0)
    assert cons["first"].between(0, 1).all()
    if k >= 2:
        assert (cons.first_or_second >= cons["first"] - 1e-12).all()
