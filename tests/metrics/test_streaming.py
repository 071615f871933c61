"""Streaming (trace directory shard by shard, or a list of chunks) gives exactly the in-memory results."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import moe_routing as mr
from moe_routing.store import TraceReader

from .conftest import make_trace, split_by_docs, write_sharded

M = mr.metrics
VOCAB = {i: ["7", ",", " ", "word", "字", "слово"][i % 6] for i in range(40)}

CASES: dict[str, Callable[[Any], Any]] = {
    "expert_load": lambda t: M.expert_load(t),
    "expert_load_weighted": lambda t: M.expert_load(t, weighted=True, top1=True),
    "load_balance": lambda t: M.load_balance(t),
    "usage_counts": lambda t: M.usage_counts(t, "lang"),
    "aux_loss": lambda t: M.load_balancing_loss(t),
    "aux_loss_by_layer": lambda t: M.load_balancing_loss_by_layer(t),
    "load_by_position": lambda t: M.load_by_position(t),
    "capacity_drop": lambda t: M.capacity_drop(t, (1.0, 1.5), by_position=True, group_size=16),
    "placement": lambda t: M.expert_placement(t, 2),
    "label_usage": lambda t: M.label_usage(t, "domain"),
    "domain_specialization": lambda t: M.domain_specialization(t),
    "label_nmi": lambda t: M.label_nmi(t, "lang", n_boot=20),
    "vocabulary": lambda t: M.vocabulary_specialization(t, k=2),
    "vocabulary_next": lambda t: M.vocabulary_specialization(t, target="next", per_token=True),
    "top_tokens": lambda t: M.top_tokens(t, n=4),
    "token_types": lambda t: M.token_type_specialization(t, VOCAB),
    "probe": lambda t: M.label_probe(t, "lang"),
    "coactivation": lambda t: M.coactivation(t, 3),
    "coactivation_adjacent": lambda t: M.coactivation_matrices(t, mode="adjacent"),
    "coactivation_summary": lambda t: M.coactivation_summary(t),
    "transitions": lambda t: M.transitions(t),
    "transition_summary": lambda t: M.transition_summary(t),
    "path_entropy": lambda t: M.path_entropy(t, depth=2),
    "consecutive": lambda t: M.consecutive_same_expert(t, n_boot=30),
    "consecutive_by": lambda t: M.consecutive_same_expert(t, by="domain", n_boot=30),
    "router_agreement": lambda t: M.router_agreement(t, t),
    "language_divergence": lambda t: M.language_divergence(t, n_boot=20),
    "reference_divergence": lambda t: M.reference_divergence(t, n_boot=20),
    "reference_divergence_pairs": lambda t: M.reference_divergence(t, pair_label="pair", n_boot=20),
    "top_expert_overlap": lambda t: M.top_expert_overlap(t),
    "language_experts": lambda t: M.language_experts(t),
    "contrast": lambda t: M.contrast(t, "phase", "think", "answer", n_boot=50),
    "contrast_summary": lambda t: M.contrast_summary(t, "phase", "think", "answer", n_boot=50),
}


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False,
                                      rtol=1e-9, atol=1e-12)
    elif isinstance(a, xr.DataArray):
        xr.testing.assert_allclose(a, b)
        for key, value in a.attrs.items():
            assert np.all(np.asarray(value) == np.asarray(b.attrs[key]))
    else:
        assert np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True, rtol=1e-9)


@pytest.fixture(scope="module")
def big():
    return make_trace(30, n_docs=24, logits=True, empty_frac=0.05, skew=1.0, vocab=40)


@pytest.fixture(scope="module")
def trace_dir(big, tmp_path_factory):
    return write_sharded(big, tmp_path_factory.mktemp("trace") / "t", 4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_equals_in_memory(name, big, trace_dir):
    fn = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = fn(big)
        chunked = fn(split_by_docs(big, 5))
        from_dir = fn(str(trace_dir))
        from_reader = fn(TraceReader(trace_dir))  # what capture_corpus returns
    assert_same(whole, chunked)
    assert_same(whole, from_dir)
    assert_same(whole, from_reader)


def test_directory_really_has_several_shards(trace_dir, big):
    from moe_routing.store import TraceReader

    reader = TraceReader(trace_dir)
    parts = list(reader.iter_traces())
    assert len(parts) == 4
    assert sum(p.num_tokens for p in parts) == big.num_tokens
    assert reader.read().equals(big)


def test_contrast_traces_from_directories(big, tmp_path):
    a = write_sharded(big.where(phase="think"), tmp_path / "a", 3)
    b = write_sharded(big.where(phase="answer"), tmp_path / "b", 2)
    mem = M.contrast_traces(big.where(phase="think"), big.where(phase="answer"), n_boot=50)
    disk = M.contrast_traces(a, b, n_boot=50)
    assert_same(mem, disk)
