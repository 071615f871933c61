"""Counts, bootstrap intervals and too-few-slots marks on the coloured cells: lifts, JS pairs, specific experts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import moe_routing as mr
from moe_routing import RoutingTrace

from .conftest import make_trace, split_by_docs


def usage(trace: RoutingTrace, lang: str, li: int) -> np.ndarray:
    ids = trace.expert_ids[trace.labels["lang"] == lang, li]
    return np.bincount(ids[ids >= 0], minlength=trace.num_experts).astype(float)


def doc_resample_lift(trace: RoutingTrace, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, V, L, E] lifts from a classic bootstrap over documents (drawn with replacement), with loops."""
    docs = np.unique(trace.doc_ids)
    langs = sorted(set(trace.labels["lang"].tolist()))
    out = np.zeros((n, len(langs), trace.num_layers, trace.num_experts))
    per_doc = {}
    for d in docs:
        m = trace.doc_ids == d
        c = np.zeros((trace.num_layers, trace.num_experts))
        for li in range(trace.num_layers):
            ids = trace.expert_ids[m, li]
            c[li] = np.bincount(ids[ids >= 0], minlength=trace.num_experts)
        per_doc[d] = (trace.labels["lang"][m][0], c)
    for b in range(n):
        counts = np.zeros(out.shape[1:])
        for d in rng.choice(docs, size=len(docs), replace=True):
            lang, c = per_doc[d]
            counts[langs.index(lang)] += c
        share = counts / counts.sum(axis=2, keepdims=True)
        overall = counts.sum(axis=0)
        out[b] = share / (overall / overall.sum(axis=1, keepdims=True))[None]
    return out


def test_language_usage_keeps_label_usage_and_adds_intervals(skewed):
    df = mr.metrics.language_usage(skewed, n_boot=300, seed=1)
    base = mr.metrics.label_usage(skewed, "lang")
    pd.testing.assert_frame_equal(df[base.columns], base)
    assert (df.lift_ci_low <= df.lift + 1e-9).mean() > 0.9 and (df.lift <= df.lift_ci_high + 1e-9).mean() > 0.9
    for row in df.sample(20, random_state=0).itertuples():
        li = skewed.layer_index(row.layer)
        u = usage(skewed, row.lang, li)
        assert row.slots == u.sum()
        total = sum(usage(skewed, lang, li) for lang in ("de", "en", "ja"))
        assert row.expected == pytest.approx(u.sum() * total[row.expert] / total.sum())
    # the Poisson bootstrap over documents agrees with a classic one (drawn with replacement) on the interval
    ref = doc_resample_lift(skewed, np.random.default_rng(0), 300)
    lo, hi = np.quantile(ref, [0.025, 0.975], axis=0)
    width = df.lift_ci_high.to_numpy() - df.lift_ci_low.to_numpy()
    np.testing.assert_allclose(np.median(width), np.median(hi - lo), rtol=0.2)


@pytest.mark.filterwarnings("ignore:label 'lang' has values")
def test_too_few_marks_small_cells_not_reliable_zeros():
    # one language left with 6 documents of 6 tokens: every lift of it rests on a handful of slots
    t = make_trace(3, n_docs=20, doc_len=(30, 40), skew=2.0)
    small = t.select(~((t.labels["lang"] == "ja") & (t.positions >= 6)))
    with pytest.warns(UserWarning, match="fewer than"):
        df = mr.metrics.language_usage(small, n_boot=50, min_count=20)
    want = (df["count"] < 20) & (df["expected"] < 20)
    assert (df.too_few == want).all()
    assert df[df.lang == "ja"].too_few.mean() > df[df.lang != "ja"].too_few.mean()
    zero = df[(df["count"] == 0) & (df["expected"] >= 20)]
    assert not zero.too_few.any()  # many slots expected, none came: a reliable 0, not masked
    wide = df[df.lang == "ja"]
    narrow = df[df.lang == "en"]
    assert (wide.lift_ci_high - wide.lift_ci_low).median() > (narrow.lift_ci_high - narrow.lift_ci_low).median()
    assert (mr.metrics.language_usage(small, n_boot=0, min_count=1).too_few
            == (df["count"] < 1) & (df["expected"] < 1)).all()


def test_language_usage_streams_and_is_seeded():
    t = make_trace(4, n_docs=15, skew=1.0)
    a = mr.metrics.language_usage(t, n_boot=40, seed=3)
    b = mr.metrics.language_usage(split_by_docs(t, 3), n_boot=40, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = mr.metrics.language_usage(t, n_boot=40, seed=4)
    assert not np.allclose(a.lift_ci_high, c.lift_ci_high, equal_nan=True)
    top1 = mr.metrics.language_usage(t, top1=True, n_boot=0)
    pd.testing.assert_frame_equal(top1[mr.metrics.label_usage(t, "lang", top1=True).columns],
                                  mr.metrics.label_usage(t, "lang", top1=True))


def test_language_divergence_counts_and_too_few(skewed):
    df = mr.metrics.language_divergence(skewed, n_boot=20, min_count=150)
    for row in df.itertuples():
        li = skewed.layer_index(row.layer)
        assert row.slots_a == usage(skewed, row.a, li).sum()
        assert row.slots_b == usage(skewed, row.b, li).sum()
        assert row.tokens_a == (skewed.labels["lang"] == row.a).sum()
        assert row.too_few == (min(row.slots_a, row.slots_b) < 150)
    assert df.too_few.any() or (df[["slots_a", "slots_b"]].min(axis=1) >= 150).all()
    assert not mr.metrics.language_divergence(skewed, n_boot=0, min_count=1).too_few.any()


def test_language_experts_counts_intervals_and_stability():
    t = make_trace(23, skew=3.0, n_docs=18, num_experts=8, top_k=2)
    df = mr.metrics.language_experts(t, threshold=0.15, n_boot=100)
    old = mr.metrics.language_experts(t, threshold=0.15, n_boot=0)
    cols = ["layer", "expert", "kind", "lang", "margin", "min_freq", "max_freq", "top", "count", "tokens"]
    pd.testing.assert_frame_equal(df[cols], old[cols])
    langs = ["de", "en", "ja"]
    for row in df.itertuples():
        li = t.layer_index(row.layer)
        freq = {lang: usage(t, lang, li)[row.expert] / (t.labels["lang"] == lang).sum() for lang in langs}
        best = max(freq, key=freq.get)
        assert row.top == best
        assert row.count == usage(t, best, li)[row.expert]
        assert row.tokens == (t.labels["lang"] == best).sum()
        assert row.too_few == (row.count < 20)
        assert 0 <= row.stability <= 1
    spec = df[df.kind == "specific"]
    assert len(spec) and (spec.margin_ci_low <= spec.margin_ci_high).all()
    # a specific expert with a clear margin is stable; near the threshold it is not
    assert spec.loc[spec.margin.idxmax(), "stability"] > 0.9
    assert np.isnan(old.stability).all() and np.isnan(old.margin_ci_low).all()


@pytest.mark.filterwarnings("ignore:label 'lang' has values")
def test_specific_experts_of_a_language_blind_router_are_unstable():
    t = make_trace(31, n_docs=9, doc_len=(8, 12), num_experts=8, top_k=2)  # no language effect, few tokens
    df = mr.metrics.language_experts(t, threshold=0.1, n_boot=100, min_count=20)
    spec = df[df.kind == "specific"]
    assert len(spec)  # sampling noise makes "specific" experts out of a few tokens; they must not look solid
    assert spec.stability.mean() < 0.8
    assert (spec.margin_ci_low < 0.1).all()
    assert spec.too_few.all()
