"""Small synthetic traces for the metric tests (no model needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from moe_routing import RoutingTrace
from moe_routing.testing import synthetic_trace


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
    """A random trace: documents of random length (non-contiguous doc ids), distinct experts per token in a random
    slot order (unsorted top-k). ``skew`` > 0 makes routing depend on the language and the token id. Labels
    ``lang``, ``domain``, ``phase``, ``pair``. A thin wrapper of ``moe_routing.testing.synthetic_trace``."""
    return synthetic_trace(
        n_docs, doc_len, layers=layers, num_experts=num_experts, top_k=top_k, langs=langs, vocab=vocab,
        doc_ids=np.arange(n_docs) * 7 + 3, skew=skew, shuffle_slots=True, empty_frac=empty_frac, weights=weights,
        logits=logits, seed=seed,
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
