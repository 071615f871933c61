"""Small synthetic traces for the metric tests (no model needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from moe_routing import RoutingTrace


def make_trace(
    seed: int = 0,
    *,
    n_docs: int = 12,
    doc_len: tuple[int, int] = (20, 60),
    layers: tuple[int, ...] = (1, 3, 4),
    num_experts: int = 8,
    top_k: int = 2,
    empty_frac: float = 0.0,
    logits: bool = False,
    weights: bool = True,
    vocab: int = 30,
    langs: tuple[str, ...] = ("en", "de", "ja"),
    skew: float = 0.0,
) -> RoutingTrace:
    """A random trace: documents of random length, distinct experts per token sorted by a random weight.

    ``skew`` > 0 makes routing depend on the language and the token id (so specialization metrics see signal).
    Labels: ``lang`` (per document), ``domain`` (per document), ``phase`` (first half / second half of a doc),
    ``pair`` (parallel-sentence id: documents i, i + n_docs/len(langs), ... share it).
    """
    rng = np.random.default_rng(seed)
    lens = rng.integers(doc_len[0], doc_len[1] + 1, size=n_docs)
    n = int(lens.sum())
    doc_ids = np.repeat(np.arange(n_docs) * 7 + 3, lens)  # non-contiguous doc ids
    positions = np.concatenate([np.arange(m) for m in lens]).astype(np.int32)
    lang_of_doc = np.array([langs[i % len(langs)] for i in range(n_docs)])
    lang = np.repeat(lang_of_doc, lens)
    domain = np.repeat(np.array(["web", "code"])[np.arange(n_docs) % 2], lens)
    phase = np.where(positions < np.repeat(lens // 2, lens), "think", "answer")
    pair = np.repeat(np.arange(n_docs) // len(langs), lens)
    token_ids = rng.integers(0, vocab, size=n).astype(np.int32)
    n_layers = len(layers)
    scores = rng.normal(size=(n, n_layers, num_experts))
    if skew:
        lang_code = np.searchsorted(np.array(sorted(langs)), lang)
        scores[np.arange(n), :, lang_code % num_experts] += skew
        scores[np.arange(n), :, token_ids % num_experts] += skew
    ids = np.argsort(-scores, axis=2)[:, :, :top_k].astype(np.int16)
    # weights: softmax of the scores of the chosen experts, then shuffled slot order (unsorted top-k)
    chosen = np.take_along_axis(scores, ids.astype(np.int64), axis=2)
    w = np.exp(chosen) / np.exp(chosen).sum(axis=2, keepdims=True)
    perm = np.argsort(rng.random((n, n_layers, top_k)), axis=2)
    ids = np.take_along_axis(ids, perm, axis=2)
    w = np.take_along_axis(w, perm, axis=2).astype(np.float32)
    if empty_frac:
        empty = rng.random(ids.shape) < empty_frac
        ids = np.where(empty, -1, ids).astype(np.int16)
        w = np.where(empty, 0.0, w).astype(np.float32)
    router_logits = scores.astype(np.float16) if logits else None
    return RoutingTrace.from_arrays(
        ids,
        w if weights else None,
        layers=layers,
        num_experts=num_experts,
        labels={"lang": lang, "domain": domain, "phase": phase, "pair": pair},
        token_ids=token_ids,
        doc_ids=doc_ids,
        positions=positions,
        router_logits=router_logits,
        model_name="synthetic",
    )


def split_by_docs(trace: RoutingTrace, n_chunks: int) -> list[RoutingTrace]:
    """Cut a trace into chunks at document boundaries (documents never span shards)."""
    starts = np.flatnonzero(np.r_[True, trace.doc_ids[1:] != trace.doc_ids[:-1]])
    cut = starts[np.linspace(0, len(starts), n_chunks + 1, dtype=int)[1:-1]]
    bounds = [0, *cut.tolist(), trace.num_tokens]
    return [trace.select(np.arange(a, b)) for a, b in itertools.pairwise(bounds) if b > a]


def write_sharded(trace: RoutingTrace, path: Path, n_shards: int) -> Path:
    """A trace directory of about ``n_shards`` shards, written by the store itself (documents never span shards)."""
    tokens_per_shard = -(-trace.num_tokens // n_shards)
    trace.save(path, tokens_per_shard=tokens_per_shard)
    assert len(list((path / "shards").glob("part-*.parquet"))) >= min(2, n_shards)
    return path


@pytest.fixture
def trace() -> RoutingTrace:
    return make_trace(0)


@pytest.fixture
def skewed() -> RoutingTrace:
    return make_trace(1, skew=2.0, n_docs=18)
