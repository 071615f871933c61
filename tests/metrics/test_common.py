"""The shared primitives: fast top-1 / top-k views equal the RoutingTrace methods; hashing; permutation tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_routing import RoutingTrace
from moe_routing.metrics import _common as C


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
    assert np.array_equal(C.top1(t), t.top1())
    ref = t.sorted_by_weight().expert_ids
    assert np.array_equal(C.sorted_ids(t), ref)
    for kk in range(1, k + 1):
        got = np.sort(C.topk_ids(t, kk), axis=2)
        assert np.array_equal(got, np.sort(ref[:, :, :kk], axis=2))
    if k >= 2:
        first, second = C.top2(t)
        assert np.array_equal(first, ref[:, :, 0]) and np.array_equal(second, ref[:, :, 1])
    ids_only = RoutingTrace.from_arrays(ids, num_experts=e)
    assert np.array_equal(C.top1(ids_only), ids_only.top1())
    assert np.array_equal(C.topk_ids(ids_only, 1)[:, :, 0], ids[:, :, 0])


def test_counts_primitives_against_loops():
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 5, size=(300, 3, 2)).astype(np.int16)
    c = C.layer_expert_counts(ids, 5)
    for li in range(3):
        x = ids[:, li].ravel()
        assert np.array_equal(c[li], np.bincount(x[x >= 0], minlength=5))
    codes = rng.integers(0, 4, size=300)
    g = C.grouped_counts(codes, 4, ids, 5)
    for v in range(4):
        assert np.array_equal(g[v], C.layer_expert_counts(ids[codes == v], 5))


def test_hash_uniform_is_deterministic_and_uniform():
    a = C.hash_uniform(3, np.arange(100_000))
    assert np.array_equal(a, C.hash_uniform(3, np.arange(100_000)))
    assert not np.array_equal(a, C.hash_uniform(4, np.arange(100_000)))
    assert a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.01
    w = C.poisson_weights(0, np.arange(20_000), 3)
    assert w.shape == (3, 20_000) and abs(w.mean() - 1) < 0.03 and abs(w.var() - 1) < 0.05


def test_permutation_tables_keep_margins():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 30, size=(4, 7))
    for _ in range(10):
        p = C.permutation_tables(t, rng)
        assert np.array_equal(p.sum(axis=0), t.sum(axis=0)) and np.array_equal(p.sum(axis=1), t.sum(axis=1))


@pytest.mark.parametrize(("e", "m", "expect"), [(8, 2, 1 - (6 / 8) * (5 / 7)), (8, 5, 1.0), (8, 1, 1 / 8)])
def test_random_pair_overlap(e, m, expect):
    assert C.random_pair_overlap(e, m) == pytest.approx(expect)


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


def test_metrics_accept_the_reader_that_capture_corpus_returns(tmp_path, qwen3_moe, tokenizer):
    """capture_corpus returns a TraceReader: every metric takes it as it takes the directory's path."""
    import warnings

    import moe_routing as mr
    from moe_routing.pipeline import capture_corpus
    from moe_routing.store import TraceReader

    texts = ["The quick brown fox jumps.", "Der schnelle braune Fuchs.", "Le renard brun saute."] * 4
    reader = capture_corpus(qwen3_moe, tokenizer, texts, tmp_path / "t",
                            labels={"lang": ["en", "de", "fr"] * 4}, progress=False)
    assert isinstance(reader, TraceReader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few tokens per language
        for fn in (lambda t: mr.metrics.expert_load(t), lambda t: mr.metrics.label_nmi(t, "lang"),
                   lambda t: mr.metrics.coactivation_summary(t), lambda t: mr.metrics.transitions(t)):
            got, ref = fn(reader), fn(str(tmp_path / "t"))
            assert got.equals(ref)
    assert mr.metrics.read_all(reader).equals(reader.read())
    assert C.read_all(reader, layers=[reader.layers[0]]).layers == (reader.layers[0],)
