"""Contrast of two conditions: point estimates by hand, bootstrap behaviour on planted and null effects."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace

from .conftest import make_trace


def shares(trace: RoutingTrace, mask: np.ndarray, li: int) -> np.ndarray:
    ids = trace.expert_ids[mask, li]
    c = np.bincount(ids[ids >= 0], minlength=trace.num_experts).astype(float)
    return c / c.sum()


def test_contrast_point_estimates(trace):
    df = mr.metrics.contrast(trace, "phase", "think", "answer", n_boot=100)
    assert {"layer", "expert", "diff", "ci_low", "ci_high", "cohens_h", "share_a", "share_b"} <= set(df.columns)
    for layer in trace.layers:
        li = trace.layer_index(layer)
        a = shares(trace, trace.labels["phase"] == "think", li)
        b = shares(trace, trace.labels["phase"] == "answer", li)
        g = df[df.layer == layer]
        assert np.allclose(g.share_a, a) and np.allclose(g["diff"], a - b)
        assert np.allclose(g.cohens_h, 2 * np.arcsin(np.sqrt(a)) - 2 * np.arcsin(np.sqrt(b)))
    assert (df.ci_low <= df.ci_high).all()
    assert (df.a == "think").all() and (df.b == "answer").all()


def planted(effect: float, seed: int) -> RoutingTrace:
    """Documents whose second half ("answer") moves ``effect`` of its top-1 slots to expert 0."""
    rng = np.random.default_rng(seed)
    docs = np.repeat(np.arange(60), 40)
    pos = np.tile(np.arange(40), 60)
    phase = np.where(pos < 20, "think", "answer")
    ids = np.argsort(rng.random((len(docs), 1, 8)), axis=2)[:, :, :1]
    move = (phase == "answer") & (rng.random(len(docs)) < effect)
    ids[move, 0, 0] = 0
    return RoutingTrace.from_arrays(ids, np.ones(ids.shape), num_experts=8, doc_ids=docs, positions=pos,
                                    labels={"phase": phase})


def test_contrast_finds_a_planted_effect_and_not_a_null_one():
    hit = mr.metrics.contrast(planted(0.3, 0), "phase", "answer", "think", n_boot=300)
    row = hit[hit.expert == 0].iloc[0]
    assert row.significant and row.ci_low > 0.15 and row.cohens_h > 0.5
    null = mr.metrics.contrast(planted(0.0, 1), "phase", "answer", "think", n_boot=300)
    assert null.significant.sum() <= 2  # 8 experts at 95%: few false positives
    covered = (null.ci_low <= 0) & (null.ci_high >= 0)
    assert covered.mean() >= 0.75


def test_contrast_traces_equals_label_contrast(trace):
    by_label = mr.metrics.contrast(trace, "phase", "think", "answer", n_boot=200, seed=3)
    by_trace = mr.metrics.contrast_traces(trace.where(phase="think"), trace.where(phase="answer"), n_boot=200,
                                          seed=3, names=("think", "answer"))
    cols = ["diff", "ci_low", "ci_high", "cohens_h", "log2_ratio"]
    assert np.allclose(by_label[cols].to_numpy(float), by_trace[cols].to_numpy(float))


def test_contrast_summary(trace):
    s = mr.metrics.contrast_summary(trace, "phase", "think", "answer", n_boot=200)
    full = mr.metrics.contrast(trace, "phase", "think", "answer", n_boot=200)
    for row in s.itertuples():
        li = trace.layer_index(row.layer)
        a = shares(trace, trace.labels["phase"] == "think", li)
        b = shares(trace, trace.labels["phase"] == "answer", li)
        assert row.js == pytest.approx(jensenshannon(a, b, base=2) ** 2)
        assert row.tv == pytest.approx(0.5 * np.abs(a - b).sum())
        assert row.n_significant == full[full.layer == row.layer].significant.sum()
    other = mr.metrics.contrast_summary(trace.where(phase="think"), other=trace.where(phase="answer"), n_boot=200)
    assert np.allclose(other.js, s.js)
    with pytest.raises(MetricError, match="other="):
        mr.metrics.contrast_summary(trace)


def test_contrast_missing_value_and_small_groups(trace):
    with pytest.raises(MetricError, match="values present"):
        mr.metrics.contrast(trace, "phase", "think", "nope", n_boot=0)
    few = trace.select(np.arange(60))
    with pytest.warns(UserWarning, match="tokens"):
        mr.metrics.contrast(few, "phase", "think", "answer", n_boot=10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 3))
def test_contrast_sums_and_antisymmetry(seed, k):
    t = make_trace(seed, top_k=k, n_docs=8, empty_frac=0.1)
    ab = mr.metrics.contrast(t, "phase", "think", "answer", n_boot=0)
    ba = mr.metrics.contrast(t, "phase", "answer", "think", n_boot=0)
    assert np.allclose(ab.groupby("layer")["diff"].sum(), 0)
    assert np.allclose(ab["diff"], -ba["diff"]) and np.allclose(ab.cohens_h, -ba.cohens_h)
    assert ab.share_a.between(0, 1).all()
