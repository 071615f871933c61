"""Resampling: counter-based hashing, the Poisson bootstrap over documents, percentile intervals, and slot
counts per label value with their bootstrap replicates.

A document's weight in a replicate depends on (seed, doc id, replicate) only, so streamed and in-memory runs,
and any sharding, give the same replicates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import MetricError
from ..trace import RoutingTrace
from ._counts import GroupedAccumulator, factorize, grouped_counts, label_codes
from ._ranking import topk_ids
from ._source import Label, TraceSource, fold, needs, token_blocks

# ---------------------------------------------------------------------------------------------- hashing
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash64(seed: int, *keys: Any) -> np.ndarray:
    """uint64 hash of integer keys (broadcast together): a counter-based RNG independent of chunking."""
    h = _splitmix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    out: np.ndarray = np.asarray(h)
    for key in keys:
        out = _splitmix(out ^ np.asarray(key).astype(np.int64).view(np.uint64))
    return out


def hash_uniform(seed: int, *keys: Any) -> np.ndarray:
    """float64 in [0, 1) from :func:`hash64`."""
    return (hash64(seed, *keys) >> np.uint64(11)).astype(np.float64) * (2.0**-53)


_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(i) for i in range(20)])


def poisson_weights(seed: int, doc_ids: np.ndarray, n_boot: int) -> np.ndarray:
    """float64 ``[n_boot, docs]``: Poisson(1) bootstrap weight of each document in each replicate.

    A document's weight depends on (seed, doc id, replicate) only, so streamed and in-memory runs agree (the
    "Poisson bootstrap" of massive-data practice: each document appears ~Poisson(1) times per replicate).
    """
    u = hash_uniform(seed, np.arange(n_boot)[:, None], np.asarray(doc_ids, dtype=np.int64)[None, :])
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.float64)


class BootstrapCounts:
    """Additive cell counts plus their Poisson-bootstrap replicates over documents, accumulated chunk by chunk.

    ``add(doc_ids, cells, values)`` adds ``values`` (default 1) to flat cell indices ``cells`` (``[m]``) of
    observations belonging to documents ``doc_ids`` (``[m]``). ``counts`` is ``[cells]``, ``boot`` is
    ``[n_boot, cells]``.
    """

    def __init__(self, n_cells: int, n_boot: int, seed: int) -> None:
        self.n_cells = n_cells
        self.n_boot = n_boot
        self.seed = seed
        self.counts = np.zeros(n_cells, dtype=np.float64)
        self.boot = np.zeros((n_boot, n_cells), dtype=np.float64)

    def add(self, doc_ids: np.ndarray, cells: np.ndarray, values: np.ndarray | None = None) -> None:
        cells = np.asarray(cells, dtype=np.intp)
        if cells.size == 0:
            return
        vals = np.ones(cells.shape, dtype=np.float64) if values is None else np.asarray(values, dtype=np.float64)
        self.counts += np.bincount(cells, weights=vals, minlength=self.n_cells)
        if not self.n_boot:
            return
        dcodes, docs = factorize(np.asarray(doc_ids, dtype=np.int64))
        n_docs = len(docs)
        w = poisson_weights(self.seed, docs, self.n_boot)  # [B, D]
        if n_docs * self.n_cells <= 1 << 25:
            per_doc = np.bincount(dcodes * self.n_cells + cells, weights=vals, minlength=n_docs * self.n_cells)
            self.boot += w @ per_doc.reshape(n_docs, self.n_cells)
        else:
            from scipy import sparse

            per_doc = sparse.coo_matrix((vals, (dcodes, cells)), shape=(n_docs, self.n_cells)).tocsc()
            self.boot += np.asarray((per_doc.T @ w.T).T)


def quantiles(boot: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval ``(low, high)`` over axis 0 of bootstrap replicates (NaNs ignored)."""
    if boot.shape[0] == 0:
        nan = np.full(boot.shape[1:], np.nan)
        return nan, nan
    alpha = (1 - ci) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(boot, [alpha, 1 - alpha], axis=0)
    return lo, hi


def grouped_counts_boot(
    source: TraceSource,
    label: Label | None,
    *,
    k: int | None = None,
    top1: bool = False,
    n_boot: int = 0,
    seed: int = 0,
    keep: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, RoutingTrace]:
    """Slot counts per label value with Poisson-bootstrap replicates over documents, streamed.

    Returns ``(values [V], counts [V, layers, E], boot [V, n_boot, layers, E], tokens [V], first chunk)``.
    ``keep`` restricts to some label values. Memory: V * n_boot * layers * E * 8 bytes for the replicates.
    """

    def init(chunk: RoutingTrace) -> dict:
        return {"acc": GroupedAccumulator((1 + n_boot, chunk.num_layers, chunk.num_experts), np.float64),
                "tok": GroupedAccumulator((), np.int64)}

    def update(state: dict, chunk: RoutingTrace) -> None:
        n_layers, e = chunk.num_layers, chunk.num_experts
        codes, values = label_codes(chunk, label)
        mask = np.ones(len(values), dtype=bool)
        if keep is not None:
            wanted = set(keep)
            mask = np.array([v in wanted for v in values.tolist()], dtype=bool)
            if not mask.any():
                return
            if not mask.all():  # only the kept values' tokens are ranked and counted
                sel = np.flatnonzero(mask[codes])
                chunk, codes = chunk.select(sel), codes[sel]
        nv = len(values)
        state["tok"].add(values[mask], np.bincount(codes, minlength=nv)[mask])
        ids = topk_ids(chunk, 1 if top1 else k)
        both = np.zeros((nv, 1 + n_boot, n_layers, e))
        both[:, 0] = grouped_counts(codes, nv, ids, e)
        if n_boot:
            bc = BootstrapCounts(nv * n_layers * e, n_boot, seed)
            layer_cell = (np.arange(n_layers, dtype=np.intp) * e)[None, :, None]
            for sl in token_blocks(chunk.num_tokens, n_layers * ids.shape[2]):  # bounded temporaries
                block = ids[sl]
                ok = block >= 0
                cells = (codes[sl] * (n_layers * e))[:, None, None] + layer_cell + block.astype(np.intp)
                docs = np.broadcast_to(chunk.doc_ids[sl][:, None, None], block.shape)
                bc.add(docs[ok], cells[ok])
            both[:, 1:] = bc.boot.reshape(n_boot, nv, n_layers, e).transpose(1, 0, 2, 3)
        state["acc"].add(values[mask], both[mask])

    state, first = fold(source, init, update, columns=needs(label, weights=top1 or k is not None))
    values, acc = state["acc"].result()
    _, tokens = state["tok"].result()
    if len(values) == 0:
        raise MetricError(f"no token carries the requested label values {list(keep or [])}.")
    return values, acc[:, 0], acc[:, 1:], tokens, first
