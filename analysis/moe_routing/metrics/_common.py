"""Shared plumbing of ``moe_routing.metrics``: trace sources, chunk iteration, count primitives, hashing, stats.

Every metric accepts a :class:`~moe_routing.trace.RoutingTrace`, a trace directory (``str`` / ``os.PathLike``,
read shard by shard through ``moe_routing.store.TraceReader``), a ``TraceReader`` itself (what ``capture_corpus``
returns) or a sequence of ``RoutingTrace`` chunks (treated like shards). Additive metrics fold over the chunks
so memory stays bounded by one shard plus the accumulators. Documents never span shards, so sequence metrics may
look at neighbouring tokens inside a chunk only.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..errors import MetricError, TraceError
from ..trace import RoutingTrace

if TYPE_CHECKING:
    from ..store import TraceReader

TraceSource = Union[RoutingTrace, "TraceReader", str, "os.PathLike[str]", Sequence[RoutingTrace]]
Label = Union[str, Callable[[RoutingTrace], np.ndarray]]  # noqa: UP007

#: A label value with fewer tokens than this makes a number too noisy to read: the metric warns.
MIN_TOKENS = 50

#: Decisions handled per block by the count primitives (bounds temporaries, keeps them in cache: measured
#: fastest around 2**17 on a 2-core x86 box).
BLOCK_DECISIONS = 1 << 17


# ---------------------------------------------------------------------------------------------- sources
def _reader(source: Any) -> TraceReader | None:
    """The ``TraceReader`` of a source that is one or names a trace directory; None for in-memory sources."""
    from ..store import TraceReader

    if isinstance(source, TraceReader):
        return source
    if isinstance(source, (str, os.PathLike)):
        return TraceReader(source)
    return None


def _raw_chunks(source: TraceSource, layers: Sequence[int] | None) -> Iterator[RoutingTrace]:
    if isinstance(source, RoutingTrace):
        yield source if layers is None else source.select(layers=layers)
    elif (reader := _reader(source)) is not None:
        yield from reader.iter_traces(layers=None if layers is None else list(layers))
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        for chunk in source:
            if not isinstance(chunk, RoutingTrace):
                raise MetricError(f"a sequence of chunks must hold RoutingTrace objects, got {type(chunk).__name__}.")
            yield chunk if layers is None else chunk.select(layers=layers)
    else:
        raise MetricError(
            f"expected a RoutingTrace, a trace directory (path or TraceReader) or a list of RoutingTrace chunks, "
            f"got {type(source).__name__}."
        )


def chunks(source: TraceSource, *, layers: Sequence[int] | None = None) -> Iterator[RoutingTrace]:
    """The trace as an iterator of ``RoutingTrace`` chunks (one per shard for a directory).

    Checks that every chunk has the layers, experts and k of the first; raises ``MetricError`` when the trace
    holds no token at all.
    """
    first: RoutingTrace | None = None
    seen = False
    for chunk in _raw_chunks(source, layers):
        if first is None:
            first = chunk
        elif (chunk.layers, chunk.num_experts, chunk.top_k) != (first.layers, first.num_experts, first.top_k):
            raise TraceError(
                "shards disagree on the model layout: "
                f"layers {first.layers} / {chunk.layers}, num_experts {first.num_experts} / {chunk.num_experts}, "
                f"top_k {first.top_k} / {chunk.top_k}."
            )
        if chunk.num_tokens:
            seen = True
            yield chunk
    if not seen:
        raise MetricError("the trace holds no tokens: there is nothing to measure (check the capture or the filter).")


def read_all(source: TraceSource, *, layers: Sequence[int] | None = None) -> RoutingTrace:
    """The whole trace in memory (for the metrics that need every token at once: probes, resampling)."""
    if isinstance(source, RoutingTrace):
        out = source if layers is None else source.select(layers=layers)
    elif (reader := _reader(source)) is not None:
        out = reader.read(layers=None if layers is None else list(layers))
    else:
        out = RoutingTrace.concat(list(chunks(source, layers=layers)))
    if out.num_tokens == 0:
        raise MetricError("the trace holds no tokens: there is nothing to measure (check the capture or the filter).")
    return out


def label_of(chunk: RoutingTrace, label: Label) -> np.ndarray:
    """Per-token label values ``[tokens]``: a label name of the trace, or a function of the chunk."""
    if callable(label):
        arr = np.asarray(label(chunk))
        if arr.shape != (chunk.num_tokens,):
            raise MetricError(f"a label function must return one value per token ({chunk.num_tokens}), got {arr.shape}.")
        return arr
    return chunk.label(label)


def label_name(label: Label) -> str:
    return label if isinstance(label, str) else getattr(label, "label_name", getattr(label, "__name__", "label"))


def require_weights(trace: RoutingTrace, what: str) -> None:
    if not trace.has_weights:
        raise MetricError(
            f"{what} needs routing weights, but this trace has no weights (an import that records expert ids "
            "only, e.g. vLLM). Use a count-based variant, or capture the model with moe_routing to get weights."
        )


def require_logits(trace: RoutingTrace, what: str) -> np.ndarray:
    if trace.router_logits is None:
        raise MetricError(f"{what} needs router logits, but this trace has none: capture with logits=True.")
    return trace.router_logits


# ---------------------------------------------------------------------------------------------- views
def _rank_keys(w: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Ranking keys of slots as ``RoutingTrace.top1`` ranks them: empty slots at the lowest finite float, NaN
    weights at -inf (``np.nan_to_num`` of the masked weights)."""
    if ids.size == 0:
        return w
    # min / max reductions: no temporaries on the common path (no empty slot, finite weights)
    if ids.min() < 0 or not (np.isfinite(w.min()) and np.isfinite(w.max())):
        w = np.nan_to_num(np.where(ids < 0, np.float32(-np.inf), w), nan=-np.inf)
    return w


def _ranked_weights(chunk: RoutingTrace) -> np.ndarray | None:
    """float32 ``[tokens, layers, k]`` ranking keys of all slots; None when there is no order (no weights, k = 1)."""
    if not chunk.has_weights or chunk.top_k == 1:
        return None
    return _rank_keys(chunk.weights, chunk.expert_ids)


def top1(chunk: RoutingTrace) -> np.ndarray:
    """int16 ``[tokens, layers]``: the expert of the largest-weight slot, exactly ``RoutingTrace.top1()``.

    (Ties: first slot; without weights: slot 0.) Computed block by block so the temporaries stay in cache.
    """
    ids = chunk.expert_ids
    if not chunk.has_weights or chunk.top_k == 1:
        return ids[:, :, 0].copy()
    out = np.empty(ids.shape[:2], dtype=ids.dtype)
    for sl in token_blocks(chunk.num_tokens, chunk.num_layers * chunk.top_k):
        slot = np.argmax(_rank_keys(chunk.weights[sl], ids[sl]), axis=2)
        out[sl] = np.take_along_axis(ids[sl], slot[:, :, None], axis=2)[:, :, 0]
    return out


def top2(chunk: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """int16 ``([tokens, layers], [tokens, layers])``: first and second slot by weight (``sorted_by_weight``)."""
    ids = chunk.expert_ids
    if not chunk.has_weights:
        return ids[:, :, 0].copy(), ids[:, :, 1].copy()
    first = np.empty(ids.shape[:2], dtype=ids.dtype)
    second = np.empty(ids.shape[:2], dtype=ids.dtype)
    for sl in token_blocks(chunk.num_tokens, chunk.num_layers * chunk.top_k):
        block = ids[sl]
        w = _rank_keys(chunk.weights[sl], block).copy()
        s1 = np.argmax(w, axis=2)[:, :, None]
        np.put_along_axis(w, s1, np.float32(-np.inf), axis=2)
        s2 = np.argmax(w, axis=2)[:, :, None]
        # only -inf left besides the first (NaN weights): the stable sort takes the lowest other slot
        none_left = np.take_along_axis(w, s2, axis=2) == -np.inf
        if none_left.any():
            s2 = np.where(none_left, (s1 == 0).astype(s2.dtype), s2)
        first[sl] = np.take_along_axis(block, s1, axis=2)[:, :, 0]
        second[sl] = np.take_along_axis(block, s2, axis=2)[:, :, 0]
    return first, second


def sorted_ids(chunk: RoutingTrace) -> np.ndarray:
    """int16 ``[tokens, layers, k]``: expert ids in descending weight order (``sorted_by_weight().expert_ids``)."""
    ids = chunk.expert_ids
    if not chunk.has_weights or chunk.top_k == 1:
        return ids
    out = np.empty_like(ids)
    for sl in token_blocks(chunk.num_tokens, chunk.num_layers * chunk.top_k):
        order = np.argsort(-_rank_keys(chunk.weights[sl], ids[sl]), axis=2, kind="stable")
        out[sl] = np.take_along_axis(ids[sl], order, axis=2)
    return out


def topk_ids(chunk: RoutingTrace, k: int | None = None) -> np.ndarray:
    """int16 ``[tokens, layers, k]``: the ``k`` highest-weight slots as a set (all slots when ``k`` is None).

    Slot order inside the result is unspecified for k >= top_k; use ``sorted_ids`` when order matters. Without
    weights the first ``k`` slots are taken (the engine's order).
    """
    if k is None or k >= chunk.top_k:
        return chunk.expert_ids
    if k < 1:
        raise MetricError(f"k must be at least 1, got {k}.")
    w = _ranked_weights(chunk)
    if w is None:
        return chunk.expert_ids[:, :, :k]
    if k == 1:
        return top1(chunk)[:, :, None]
    if k == 2:
        first, second = top2(chunk)
        return np.stack([first, second], axis=2)
    return sorted_ids(chunk)[:, :, :k]


def token_blocks(n: int, per_token: int, min_items: int = 0) -> Iterator[slice]:
    """Slices over ``n`` tokens holding about ``max(BLOCK_DECISIONS, 4 * min_items)`` items each.

    ``min_items``: the size of the per-block output (a bincount's minlength), so that large outputs are not
    re-allocated for tiny blocks.
    """
    step = max(1, max(BLOCK_DECISIONS, 4 * min_items) // max(1, per_token))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


# ---------------------------------------------------------------------------------------------- counts
def layer_expert_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[layers, experts]``: how many slots of ``ids`` (``[tokens, layers, k]``, -1 ignored) chose each expert.

    One ``np.bincount`` per block on ``layer * (E + 1) + id + 1``: bin 0 of each layer swallows the empty slots.
    """
    n, n_layers, k = ids.shape
    width = num_experts + 1
    offsets = (np.arange(n_layers, dtype=np.intp) * width + 1)[None, :, None]
    total = np.zeros(n_layers * width, dtype=np.int64)
    for sl in token_blocks(n, n_layers * k):
        idx = ids[sl].astype(np.intp)
        idx += offsets
        total += np.bincount(idx.ravel(), minlength=n_layers * width)
    return total.reshape(n_layers, width)[:, 1:]


def grouped_counts(codes: np.ndarray, n_groups: int, ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[groups, layers, experts]``: slot counts per group (``codes`` ``[tokens]`` in ``[0, groups)``)."""
    n, n_layers, k = ids.shape
    width = num_experts + 1
    cell = n_layers * width
    offsets = (np.arange(n_layers, dtype=np.intp) * width + 1)[None, :, None]
    total = np.zeros(n_groups * cell, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.intp)
    for sl in token_blocks(n, n_layers * k, n_groups * cell):
        idx = ids[sl].astype(np.intp)
        idx += offsets
        idx += (codes[sl] * cell)[:, None, None]
        total += np.bincount(idx.ravel(), minlength=n_groups * cell)
    return total.reshape(n_groups, n_layers, width)[:, :, 1:]


def label_codes(chunk: RoutingTrace, label: Label | None) -> tuple[np.ndarray, np.ndarray]:
    """(codes [tokens], values [V]) of a label in a chunk; without a label every token is in one group 0."""
    if label is None:
        return np.zeros(chunk.num_tokens, np.intp), np.array([0])
    return factorize(label_of(chunk, label))


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes [tokens] intp, uniques)`` by hashing (no sort of the tokens)."""
    import pandas as pd

    codes, uniques = pd.factorize(np.asarray(values), use_na_sentinel=False)
    return codes.astype(np.intp, copy=False), np.asarray(uniques)


class GroupedAccumulator:
    """Sums arrays keyed by label value over chunks whose sets of values differ.

    ``add(values, arrays)`` with ``arrays`` ``[len(values), *shape]``; ``result()`` gives the values sorted
    and the stacked sums ``[values, *shape]``.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.int64) -> None:
        self.shape = shape
        self.dtype = dtype
        self.index: dict[Any, int] = {}
        self.keys: list[Any] = []
        self.rows: list[np.ndarray] = []

    def add(self, values: np.ndarray, arrays: np.ndarray) -> None:
        for value, arr in zip(values.tolist(), arrays, strict=True):
            i = self.index.get(value)
            if i is None:
                self.index[value] = len(self.keys)
                self.keys.append(value)
                self.rows.append(np.array(arr, dtype=self.dtype, copy=True))
            else:
                self.rows[i] += arr

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.keys:
            return np.array([]), np.zeros((0, *self.shape), dtype=self.dtype)
        order = sorted(range(len(self.keys)), key=lambda i: _sort_key(self.keys[i]))
        return np.array([self.keys[i] for i in order]), np.stack([self.rows[i] for i in order])


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, value) if not (isinstance(value, float) and math.isnan(value)) else (2, 0)
    return (1, str(value))


def warn_small(name: str, values: np.ndarray, tokens: np.ndarray, *, minimum: int = MIN_TOKENS) -> None:
    """Warn once per call about label values with fewer than ``minimum`` tokens."""
    small = [(v, int(t)) for v, t in zip(values.tolist(), np.asarray(tokens).tolist(), strict=True) if t < minimum]
    if small:
        listed = ", ".join(f"{v!r} ({t} tokens)" for v, t in small[:8])
        more = "" if len(small) <= 8 else f" and {len(small) - 8} more"
        warnings.warn(
            f"label {name!r} has values with fewer than {minimum} tokens: {listed}{more}; their numbers are too "
            "noisy to read. Capture more text for them or leave them out.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------- information
def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of (unnormalised, non-negative) weights along ``axis``."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = p / total
        terms = np.where(q > 0, -q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    out = terms.sum(axis=axis)
    return np.where(np.squeeze(total, axis=axis) > 0, out, np.nan)


def mutual_information(table: np.ndarray) -> np.ndarray:
    """I(row; column) in nats of contingency tables ``[..., rows, cols]`` (plug-in estimate)."""
    t = np.asarray(table, dtype=np.float64)
    n = t.sum(axis=(-2, -1), keepdims=True)
    rows = t.sum(axis=-1, keepdims=True)
    cols = t.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = t * n / (rows * cols)
        terms = np.where(t > 0, t * np.log(np.where(t > 0, ratio, 1.0)), 0.0)
        out = terms.sum(axis=(-2, -1)) / np.squeeze(n, axis=(-2, -1))
    return out


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1, base: float = 2.0) -> np.ndarray:
    """Jensen-Shannon divergence (not distance) between weight vectors along ``axis``; in [0, 1] for base 2."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = p / p.sum(axis=axis, keepdims=True)
        q = q / q.sum(axis=axis, keepdims=True)
    m = (p + q) / 2
    js = entropy(m, axis) - (entropy(p, axis) + entropy(q, axis)) / 2
    return np.maximum(js, 0.0) / math.log(base)


def permutation_tables(table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A contingency table ``[rows, cols]`` drawn as if the row labels of its units were shuffled.

    Shuffling labels keeps both margins; the table it gives is multivariate-hypergeometric row by row, so it is
    drawn from the margins alone (exact in distribution, no token array needed, works on streamed counts).
    """
    t = np.asarray(table, dtype=np.int64)
    remaining = t.sum(axis=0).astype(np.int64)
    out = np.zeros_like(t)
    for i, size in enumerate(t.sum(axis=1).tolist()):
        if size:
            out[i] = rng.multivariate_hypergeometric(remaining, size, method="marginals")
            remaining -= out[i]
    return out


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


def safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) != 0, np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64), np.nan)


def fold(source: TraceSource, init: Callable[[RoutingTrace], Any], update: Callable[[Any, RoutingTrace], None],
         *, layers: Sequence[int] | None = None) -> tuple[Any, RoutingTrace]:
    """Run ``update(state, chunk)`` over the chunks; ``state = init(first_chunk)``. Returns (state, first chunk)."""
    state: Any = None
    first: RoutingTrace | None = None
    for chunk in chunks(source, layers=layers):
        if first is None:
            first = chunk
            state = init(chunk)
        update(state, chunk)
    assert first is not None
    return state, first


def layer_indices(trace: RoutingTrace, layers: Sequence[int] | None) -> list[int]:
    """Positions in the layers dimension of decoder layers ``layers`` (all when None); unknown -> TraceError."""
    if layers is None:
        return list(range(trace.num_layers))
    return [trace.layer_index(x) for x in layers]


def random_pair_overlap(num_experts: int, m: int) -> float:
    """P(two independent uniformly random m-subsets of E experts intersect)."""
    if m <= 0 or num_experts <= 0:
        return float("nan")
    if 2 * m > num_experts:
        return 1.0
    return 1.0 - math.comb(num_experts - m, m) / math.comb(num_experts, m)


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
        nv = len(values)
        state["tok"].add(values[mask], np.bincount(codes, minlength=nv)[mask])
        ids = topk_ids(chunk, 1 if top1 else k)
        both = np.zeros((nv, 1 + n_boot, n_layers, e))
        both[:, 0] = grouped_counts(codes, nv, ids, e)
        if n_boot:
            ok = (ids >= 0) & mask[codes][:, None, None]
            cells = (codes[:, None, None] * n_layers + np.arange(n_layers)[None, :, None]) * e + ids.astype(np.intp)
            docs = np.broadcast_to(chunk.doc_ids[:, None, None], ids.shape)
            bc = BootstrapCounts(nv * n_layers * e, n_boot, seed)
            bc.add(docs[ok], cells[ok])
            both[:, 1:] = bc.boot.reshape(n_boot, nv, n_layers, e).transpose(1, 0, 2, 3)
        state["acc"].add(values[mask], both[mask])

    state, first = fold(source, init, update)
    values, acc = state["acc"].result()
    _, tokens = state["tok"].result()
    if len(values) == 0:
        raise MetricError(f"no token carries the requested label values {list(keep or [])}.")
    return values, acc[:, 0], acc[:, 1:], tokens, first
