"""Clear failures: unknown layers, missing weights or logits, tiny labels, empty traces, wrong inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import moe_routing as mr
from moe_routing import MetricError, RoutingTrace, TraceError

from .conftest import make_trace, write_sharded


def ids_only(trace: RoutingTrace) -> RoutingTrace:
    return RoutingTrace.from_arrays(trace.expert_ids, layers=trace.layers, num_experts=trace.num_experts,
                                    labels=trace.labels, doc_ids=trace.doc_ids, token_ids=trace.token_ids)


def test_metrics_are_reachable_from_the_package():
    import moe_routing

    assert moe_routing.metrics.expert_load is mr.metrics.load.expert_load
    for name in mr.metrics.__all__:
        assert callable(getattr(mr.metrics, name)) or name in ("TOKEN_TYPES", "VOCABULARY_PRESETS")


def test_unknown_layer_names_the_moe_layers(trace, tmp_path):
    with pytest.raises(TraceError, match=r"MoE layers are \[1, 3, 4\]"):
        mr.metrics.coactivation(trace, 0)
    with pytest.raises(TraceError, match="MoE layers are"):
        mr.metrics.label_probe(trace, "lang", layers=[7])
    with pytest.raises(TraceError, match="MoE layers are"):
        mr.metrics.top_tokens(trace, layers=[2])
    path = write_sharded(trace, tmp_path / "t", 2)
    with pytest.raises(TraceError, match="MoE layers are"):
        mr.metrics.coactivation(path, 0)


def test_weight_based_metrics_refuse_ids_only_imports(trace):
    t = ids_only(trace)
    with pytest.raises(MetricError, match="no weights"):
        mr.metrics.expert_load(t, weighted=True)
    with pytest.raises(MetricError, match="no weights"):
        mr.metrics.reference_divergence(t, source="weights")
    # count-based metrics work; top-1 falls back to the engine's first slot
    assert mr.metrics.expert_load(t)["count"].sum() == trace.expert_ids.size
    nmi = mr.metrics.label_nmi(t, "lang")
    assert nmi.nmi.notna().all()


def test_logit_metrics_refuse_traces_without_logits(trace):
    with pytest.raises(MetricError, match="logits=True"):
        mr.metrics.load_balancing_loss_by_layer(trace)


def test_small_labels_warn_with_the_token_count():
    t = make_trace(40, n_docs=3, doc_len=(20, 20))
    for fn in (mr.metrics.label_nmi, mr.metrics.label_usage, mr.metrics.domain_specialization):
        with pytest.warns(UserWarning, match=r"fewer than 50 tokens: 'de' \(20 tokens\)"):
            fn(t, "lang")
    with pytest.warns(UserWarning, match="20 tokens"):
        mr.metrics.language_divergence(t, n_boot=0)
    big = make_trace(41, n_docs=6, doc_len=(60, 60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.metrics.label_nmi(big, "lang")


def test_missing_label_lists_the_labels(trace):
    with pytest.raises(TraceError, match="its labels are"):
        mr.metrics.label_nmi(trace, "topic")


def test_empty_trace_and_wrong_inputs(trace):
    empty = trace.select(np.zeros(trace.num_tokens, dtype=bool))
    with pytest.raises(MetricError, match="no tokens"):
        mr.metrics.expert_load(empty)
    with pytest.raises(MetricError, match="expected a RoutingTrace"):
        mr.metrics.expert_load(42)
    with pytest.raises(MetricError, match="mode"):
        mr.metrics.coactivation(trace, 1, mode="pairs")
    with pytest.raises(MetricError, match="capacity factors"):
        mr.metrics.capacity_drop(trace, (0,))
    with pytest.raises(MetricError, match="depth"):
        mr.metrics.path_entropy(trace, depth=9)


def test_mismatched_chunks_are_refused(trace):
    other = make_trace(42, num_experts=6)
    with pytest.raises(TraceError, match="disagree"):
        mr.metrics.expert_load([trace, other])
