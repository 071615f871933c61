"""Expert load: counts, balance statistics, the auxiliary load-balancing loss, load by position, capacity, placement.

All functions take a ``RoutingTrace``, a trace directory or a list of chunks (see ``_source``) and stream it.
Counts include every non-empty slot of the top-k (``expert_ids != -1``) unless ``top1=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ..errors import MetricError
from ..trace import RoutingTrace
from ._bootstrap import _splitmix, hash64, hash_uniform
from ._counts import (
    GroupedAccumulator,
    factorize,
    grouped_counts,
    label_codes,
    layer_expert_counts,
    weighted_counts,
)
from ._ranking import sorted_ids, sorted_slots, topk_ids
from ._source import (
    Label,
    TraceSource,
    chunks,
    fold,
    label_name,
    needs,
    require_logits,
    require_weights,
    token_blocks,
)
from ._stats import safe_div

if TYPE_CHECKING:
    import xarray as xr

Selection = Literal["logits", "trace"]
Priority = Literal["slot", "token"]
Group = Literal["doc", "batch"] | int

__all__ = [
    "capacity_drop",
    "expert_load",
    "expert_placement",
    "greedy_placement",
    "load_balance",
    "load_balancing_loss",
    "load_balancing_loss_by_layer",
    "load_by_position",
    "usage_counts",
]


# ---------------------------------------------------------------------------------------------- primitive
def _usage(trace: TraceSource, label: Label | None, k: int | None, *, counts: bool, weights: bool
           ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray, RoutingTrace]:
    """One pass: slot counts and / or summed weights per (label value,) layer and expert.

    Returns ``({"count": [V, L, E] int64, "weight": [V, L, E] float64}, values [V] or None, tokens [V] or [],
    first chunk)``; without a label V = 1.
    """

    def init(chunk: RoutingTrace) -> dict:
        if weights:
            require_weights(chunk, "usage_counts(weighted=True)")
        shape = (chunk.num_layers, chunk.num_experts)
        return {"count": GroupedAccumulator(shape, np.int64), "weight": GroupedAccumulator(shape, np.float64),
                "tok": GroupedAccumulator((), np.int64)}

    def update(state: dict, chunk: RoutingTrace) -> None:
        e = chunk.num_experts
        codes, values = label_codes(chunk, label)
        if weights:
            ids_w, w = sorted_slots(chunk, k)
            state["weight"].add(values, weighted_counts(ids_w, w, e, codes, len(values)))
        if counts:
            ids = topk_ids(chunk, k)
            c = layer_expert_counts(ids, e)[None] if label is None else grouped_counts(codes, len(values), ids, e)
            state["count"].add(values, c)
        state["tok"].add(values, np.bincount(codes, minlength=len(values)))

    state, first = fold(trace, init, update, columns=needs(label, weights=weights or k is not None))
    out = {}
    values = None
    for key, wanted in (("count", counts), ("weight", weights)):
        if wanted:
            values, out[key] = state[key].result()
    _, tokens = state["tok"].result()
    return out, values, tokens, first


def usage_counts(
    trace: TraceSource,
    label: Label | None = None,
    *,
    top1: bool = False,
    k: int | None = None,
    weighted: bool = False,
) -> xr.DataArray:
    """Slot counts per (label value,) layer and expert: the count tensor most metrics are built on.

    Returns an ``xarray.DataArray`` with dims ``(layer, expert)``, or ``(<label>, layer, expert)`` when ``label``
    is given (a label name or a function of a chunk returning ``[tokens]`` values; the dimension is named after
    the label, e.g. ``lang``). Coordinates: ``layer`` = decoder-layer indices, ``<label>`` = label values
    (sorted), also under the old name ``value`` (deprecated). ``attrs``: ``tokens`` (tokens per value, or in
    all), ``top_k`` (slots counted per token), ``num_experts``, ``label``.

    ``top1=True`` counts only the largest-weight slot; ``k`` counts the first ``k`` slots by weight;
    ``weighted=True`` sums routing weights instead of counting (raises ``MetricError`` without weights).
    """
    import xarray as xr

    if top1:
        k = 1
    key = "weight" if weighted else "count"
    arrays, values, tokens, first = _usage(trace, label, k, counts=not weighted, weights=weighted)
    layers = list(first.layers)
    experts = np.arange(first.num_experts)
    slots = first.top_k if k is None else min(k, first.top_k)
    attrs = {"top_k": slots, "num_experts": first.num_experts, "label": None if label is None else label_name(label)}
    if label is None:
        return xr.DataArray(arrays[key][0], dims=("layer", "expert"), coords={"layer": layers, "expert": experts},
                            attrs={**attrs, "tokens": int(tokens[0])}, name="count")
    dim = label_dim(label)
    return xr.DataArray(arrays[key], dims=(dim, "layer", "expert"),
                        coords={dim: values, "value": (dim, values), "layer": layers, "expert": experts},
                        attrs={**attrs, "tokens": tokens}, name="count")


def label_dim(label: Label) -> str:
    """The dimension name of a label in xarray outputs: its name, unless that clashes with ``layer`` / ``expert``
    (then ``<name>_value``)."""
    name = label_name(label)
    return f"{name}_value" if name in ("layer", "expert", "value") else name


# ---------------------------------------------------------------------------------------------- load
def expert_load(trace: TraceSource, *, top1: bool = False, weighted: bool = False) -> pd.DataFrame:
    """Per layer and expert: how many routing decisions it received.

    Columns: ``layer, expert, count, share, load_ratio, dead`` — ``count`` counts every non-empty top-k slot
    (all k slots; ``top1=True``: the largest-weight slot only), ``share`` = count / layer total (sums to 1 per
    layer), ``load_ratio`` = count / (total / num_experts) = utilisation vs the ideal balanced load (1.0 is
    ideal; NeMo/Megatron "utilisation"), ``dead`` = count == 0. ``weighted=True`` adds ``weight`` (sum of the
    routing weights, "importance") and ``weight_share``. One row per (layer, expert), ``layers x experts`` rows.
    One pass over the trace (counts and weights together).

    Baseline: uniform routing gives share = 1/num_experts and load_ratio = 1.
    """
    arrays, _, _, first = _usage(trace, None, 1 if top1 else None, counts=True, weights=weighted)
    c = arrays["count"][0]
    n_layers, e = c.shape
    total = c.sum(axis=1, keepdims=True)
    df = pd.DataFrame({
        "layer": np.repeat(np.asarray(first.layers), e),
        "expert": np.tile(np.arange(e), n_layers),
        "count": c.ravel(),
        "share": safe_div(c, total).ravel(),
        "load_ratio": safe_div(c * e, total).ravel(),
        "dead": (c == 0).ravel(),
    })
    if weighted:
        w = arrays["weight"][0]
        df["weight"] = w.ravel()
        df["weight_share"] = safe_div(w, w.sum(axis=1, keepdims=True)).ravel()
    return df


def _gini(x: np.ndarray) -> np.ndarray:
    """Gini coefficient of non-negative loads along the last axis (0 = equal, (n-1)/n = one expert takes all)."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    i = np.arange(1, n + 1)
    total = x.sum(axis=-1)
    return safe_div((2 * i * x).sum(axis=-1), n * total) - (n + 1) / n


def balance_stats(counts: np.ndarray, tokens: float, top_k: int) -> dict[str, np.ndarray]:
    """Balance statistics of per-expert counts ``[..., experts]`` (shared by ``load_balance`` and others)."""
    c = np.asarray(counts, dtype=np.float64)
    e = c.shape[-1]
    total = c.sum(axis=-1)
    mean = total / e
    shares = safe_div(c, total[..., None])
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(shares > 0, -shares * np.log(np.where(shares > 0, shares, 1)), 0.0).sum(axis=-1)
    h = np.where(total > 0, h, np.nan)
    k = min(top_k, e)
    return {
        "decisions": total.astype(np.int64),
        "cv": safe_div(c.std(axis=-1), mean),
        "max_over_mean": safe_div(c.max(axis=-1), mean),
        "min_over_mean": safe_div(c.min(axis=-1), mean),
        "entropy_norm": h / math.log(e) if e > 1 else np.full_like(h, np.nan),
        "perplexity_frac": np.exp(h) / e,
        "gini": _gini(c),
        "dead": (c == 0).sum(axis=-1),
        "dead_frac": (c == 0).sum(axis=-1) / e,
        "balancedness": safe_div(mean, c.max(axis=-1)),
        # uniform random routing of `tokens` tokens, k distinct experts each: count_e ~ Binomial(T, k/E)
        "cv_random": np.full(total.shape, math.sqrt((e - k) / (tokens * k)) if tokens and k else np.nan),
    }


def load_balance(trace: TraceSource, *, top1: bool = False) -> pd.DataFrame:
    """One row per MoE layer: how evenly the layer spreads its decisions over experts.

    Columns: ``layer, decisions, cv, max_over_mean, min_over_mean, entropy_norm, perplexity_frac, gini, dead,
    dead_frac, balancedness, cv_random`` where, over the expert counts c (``[experts]``):
    ``cv`` = population std(c) / mean(c); ``max_over_mean`` = max(c) / mean(c);
    ``entropy_norm`` = H(c / sum c) / log(num_experts) (1 = uniform); ``perplexity_frac`` = exp(H) / E;
    ``gini`` = Gini coefficient of c; ``dead`` = experts with c == 0; ``balancedness`` = mean / max (SGLang).

    Baselines: perfect balance gives cv 0, max_over_mean 1, entropy_norm 1, gini 0; ``cv_random`` is the cv
    expected from uniformly random routing of the same tokens (sqrt((E - k) / (tokens k))): a measured cv near
    it is sampling noise, not imbalance.
    """
    counts = usage_counts(trace, top1=top1)
    stats = balance_stats(counts.values, counts.attrs["tokens"], counts.attrs["top_k"])
    df = pd.DataFrame({"layer": counts.coords["layer"].values, **stats})
    return df


# ---------------------------------------------------------------------------------------------- aux loss
def _aux_accumulate(trace: TraceSource, selection: Selection) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, list[int], int]:
    if selection not in ("logits", "trace"):
        raise MetricError(f"selection must be 'logits' or 'trace', got {selection!r}.")

    def init(chunk: RoutingTrace) -> dict:
        require_logits(chunk, "the load-balancing loss")
        return {"f": np.zeros((chunk.num_layers, chunk.num_experts)),
                "p": np.zeros((chunk.num_layers, chunk.num_experts)), "n": 0}

    def update(state: dict, chunk: RoutingTrace) -> None:
        logits = require_logits(chunk, "the load-balancing loss")
        e = chunk.num_experts
        if logits.shape[2] != e:
            raise MetricError(f"router_logits has {logits.shape[2]} experts, the trace {e}.")
        k = chunk.top_k
        for sl in token_blocks(chunk.num_tokens, chunk.num_layers * e, 1 << 20):
            x = logits[sl].astype(np.float32)
            x -= x.max(axis=2, keepdims=True)
            np.exp(x, out=x)
            x /= x.sum(axis=2, keepdims=True)
            state["p"] += x.sum(axis=0, dtype=np.float64)
            if selection == "logits":
                sel = np.argsort(-x, axis=2, kind="stable")[:, :, :k]
            else:
                sel = chunk.expert_ids[sl]
            state["f"] += layer_expert_counts(sel, e)
        state["n"] += chunk.num_tokens

    state, first = fold(trace, init, update, columns=needs(logits=True))
    return state["f"], state["p"], np.asarray(first.layers), state["n"], list(first.layers), first.top_k


def load_balancing_loss(trace: TraceSource, *, selection: Selection = "logits") -> float:
    """The Switch/Mixtral auxiliary load-balancing loss over all MoE layers, as transformers computes it.

    ``E * sum_e f_e * P_e`` with, over all (token, layer) rows of the router logits ``[tokens, layers, E]``,
    f_e = top-k assignments to e / rows and P_e = mean softmax probability of e (Fedus et al. 2021, eqs. 4-6;
    equals ``transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func`` given the per-layer logits
    and the trace's top_k). ``selection="trace"`` takes the assignments from the recorded ``expert_ids``
    instead of re-deriving top-k from the logits (right for biased or grouped routers).
    Needs ``router_logits`` (capture with ``logits=True``), else ``MetricError``.

    Baseline: perfectly balanced routing gives ``top_k``; larger means imbalance.
    """
    f, p, _, n, layers, _ = _aux_accumulate(trace, selection)
    rows = n * len(layers)
    e = f.shape[1]
    return float(e * np.sum((f.sum(axis=0) / rows) * (p.sum(axis=0) / rows)))


def load_balancing_loss_by_layer(trace: TraceSource, *, selection: Selection = "logits") -> pd.DataFrame:
    """The auxiliary load-balancing loss of each MoE layer on its own.

    Columns: ``layer, aux_loss, balanced`` with aux_loss = E * sum_e f_e P_e over the layer's tokens
    (f_e = assignments / tokens, P_e = mean router probability; Fedus et al. 2021) and ``balanced`` = top_k, the
    value under perfect balance. Needs ``router_logits``.
    """
    f, p, _, n, layers, k = _aux_accumulate(trace, selection)
    e = f.shape[1]
    loss = e * np.sum((f / n) * (p / n), axis=1)
    return pd.DataFrame({"layer": layers, "aux_loss": loss, "balanced": float(k)})


# ---------------------------------------------------------------------------------------------- by position
_POW2_EDGES = np.asarray([0] + [2**i for i in range(32)], dtype=np.int64)


def _position_edges(bins: Sequence[int] | None) -> np.ndarray:
    if bins is None:
        return _POW2_EDGES
    edges = np.asarray(sorted({int(b) for b in bins}), dtype=np.int64)
    if len(edges) < 2 or edges[0] != 0:
        raise MetricError(f"position bin edges must start at 0 and hold at least two values, got {list(bins)}.")
    return edges


def _bucketer(bins: int | Sequence[int] | None) -> tuple:
    """(bucket_of(positions) -> int64 [tokens], bounds(buckets) -> (start, end)); end -1 = open-ended."""
    if isinstance(bins, (int, np.integer)):
        width = int(bins)
        if width <= 0:
            raise MetricError(f"bins must be a positive width or a list of edges, got {bins}.")
        return (lambda pos: (np.asarray(pos) // width).astype(np.int64),
                lambda b: (np.asarray(b) * width, (np.asarray(b) + 1) * width))
    edges = _position_edges(bins)

    def bucket_of(pos: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, len(edges) - 1).astype(np.int64)

    def bounds(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = np.asarray(b, dtype=np.int64)
        end = np.where(b + 1 < len(edges), edges[np.minimum(b + 1, len(edges) - 1)], -1)
        return edges[b], end

    return bucket_of, bounds


def load_by_position(
    trace: TraceSource, *, bins: int | Sequence[int] | None = None, top1: bool = False
) -> pd.DataFrame:
    """Expert load per token-position bucket: does routing change along the sequence?

    ``bins``: None = powers of two ([0,1), [1,2), [2,4), ...), an int = bucket width, or a list of edges starting
    at 0 (the last bucket is open-ended). Columns: ``layer, pos_start, pos_end, expert, count, share, tokens``
    (share within the layer and bucket; ``pos_end`` exclusive, -1 = open-ended); buckets without tokens are
    left out. Baseline: position-independent routing gives the same shares in every bucket.
    """
    bucket_of, bounds = _bucketer(bins)

    def position_bucket(chunk: RoutingTrace) -> np.ndarray:
        return bucket_of(chunk.positions)

    counts = usage_counts(trace, position_bucket, top1=top1)
    c = counts.values
    nb, n_layers, e = c.shape
    starts, ends = bounds(counts.coords["value"].values)
    total = c.sum(axis=2, keepdims=True)
    return pd.DataFrame({
        "layer": np.tile(np.repeat(counts.coords["layer"].values, e), nb),
        "pos_start": np.repeat(starts, n_layers * e),
        "pos_end": np.repeat(ends, n_layers * e),
        "expert": np.tile(np.arange(e), nb * n_layers),
        "count": c.ravel(),
        "share": safe_div(c, total).ravel(),
        "tokens": np.repeat(counts.attrs["tokens"], n_layers * e),
    })


# ---------------------------------------------------------------------------------------------- capacity
def _cumcount(g: np.ndarray, e: np.ndarray) -> np.ndarray:
    """int64 ``[m]``: how many earlier elements share (g, e); ``g`` non-decreasing, ``e`` small ints.

    One stable (radix, for int16) sort by ``e``: inside an ``e`` block positions keep their order, so ``g`` runs
    are contiguous there and the count is the distance to the start of the (e, g) run.
    """
    m = len(e)
    order = np.argsort(e, kind="stable")
    se, sg = e[order], g[order]
    start = np.ones(m, dtype=bool)
    start[1:] = (se[1:] != se[:-1]) | (sg[1:] != sg[:-1])
    idx = np.arange(m)
    first = np.maximum.accumulate(np.where(start, idx, 0))
    out = np.empty(m, dtype=np.int64)
    out[order] = idx - first
    return out


def _queue_rank(group: np.ndarray, ids: np.ndarray, num_experts: int, priority: Priority) -> np.ndarray:
    """int64 ``[tokens, layers, k]``: rank of each slot in its (group, layer, expert) queue; -1 for empty slots.

    ``ids`` has slots sorted by weight, ``group`` is ``[tokens]``. ``priority="slot"`` serves all first choices of
    a group (in token order) before its second choices (GShard/Switch); ``"token"`` serves tokens in order.
    Works layer by layer (and slot by slot) on ``[tokens]`` columns with radix sorts of the int16 ids, never a
    sort of ``tokens x layers x k`` keys.
    """
    n, n_layers, k = ids.shape
    group = np.asarray(group, dtype=np.int64)
    order = None
    if n > 1 and np.any(group[1:] < group[:-1]):  # make groups contiguous; the stable sort keeps service order
        order = np.argsort(group, kind="stable")
        group, ids = group[order], ids[order]
    n_groups = int(group.max()) + 1 if n else 0
    width = num_experts + 1
    rank = np.empty((n, n_layers, k), dtype=np.int64)
    if priority == "slot":
        for li in range(n_layers):
            served = np.zeros(n_groups * width, dtype=np.int64)  # slots already queued per (group, expert)
            for s in range(k):
                e = ids[:, li, s]
                key = group * width + e.astype(np.int64) + 1
                rank[:, li, s] = _cumcount(group, e) + served[key]
                served += np.bincount(key, minlength=n_groups * width)
    else:
        g_rep = np.repeat(group, k)
        for li in range(n_layers):
            rank[:, li, :] = _cumcount(g_rep, np.ascontiguousarray(ids[:, li, :]).reshape(-1)).reshape(n, k)
    rank[ids < 0] = -1
    if order is not None:
        out = np.empty_like(rank)
        out[order] = rank
        return out
    return rank


def _random_topk(shape: tuple[int, int], num_experts: int, k: int, seed: int, keys: tuple[np.ndarray, ...]
                 ) -> np.ndarray:
    """int16 ``[tokens, layers, k]``: k distinct uniformly random experts per (token, layer).

    Drawn by hashing per-token ``keys`` (doc id, position), so the draw does not depend on how the trace is
    chunked: slot ``s`` takes ``hash_uniform(seed, *keys, layer, s, attempt)`` at the first ``attempt`` that
    differs from the earlier slots. The hash chain is shared across slots and attempts, and redraws touch only
    the colliding entries (loops over slots and rare redraws, never over tokens).
    """
    n, n_layers = shape
    out = np.empty((n, n_layers, k), dtype=np.int64)
    layer = np.arange(n_layers)[None, :]
    h = hash64(seed, *(np.asarray(key)[:, None] for key in keys), layer)  # [n, L]: the chain up to the layer
    h = np.broadcast_to(h, (n, n_layers))

    def draw(base: np.ndarray, attempt: int) -> np.ndarray:
        u = (_splitmix(base ^ np.uint64(attempt)) >> np.uint64(11)).astype(np.float64) * (2.0**-53)
        return np.minimum((u * num_experts).astype(np.int64), num_experts - 1)

    for s in range(k):
        hs = _splitmix(h ^ np.uint64(s))
        cur = draw(hs, 0)
        todo = np.zeros((n, n_layers), dtype=bool)
        for prev in range(s):
            todo |= cur == out[:, :, prev]
        attempt = 1
        while todo.any():
            where = np.nonzero(todo)
            redraw = draw(hs[where], attempt)
            cur[where] = redraw
            clash = np.zeros(len(redraw), dtype=bool)
            for prev in range(s):
                clash |= redraw == out[:, :, prev][where]
            todo[where] = clash
            attempt += 1
        out[:, :, s] = cur
    return out.astype(np.int16)


def _capture_batch_size(source: TraceSource) -> int | None:
    """The batch size a trace directory was captured with (``manifest.json`` settings), else None."""
    import os

    if isinstance(source, (str, os.PathLike)):
        import json
        from pathlib import Path

        try:
            manifest = json.loads((Path(source) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        size = (manifest.get("settings") or {}).get("batch_size")
        return int(size) if isinstance(size, int) and size > 0 else None
    if isinstance(source, RoutingTrace):
        size = source.meta.get("batch_size")
        return int(size) if isinstance(size, int) and size > 0 else None
    from ..store import TraceReader

    if isinstance(source, TraceReader):  # the reader of a trace directory: its manifest's settings
        size = (source.manifest.get("settings") or {}).get("batch_size")
        return int(size) if isinstance(size, int) and size > 0 else None
    return None


def _capacity_groups(source: TraceSource, group: Group, group_size: int | None, batch_size: int | None
                     ) -> Iterator[tuple[RoutingTrace, np.ndarray]]:
    """``(chunk, group codes [tokens])`` with every group whole inside one yielded chunk.

    ``"doc"``: documents (or windows of ``group_size`` positions in a document) never span shards, so chunks
    pass through. ``"batch"`` (``batch_size`` consecutive documents, by first appearance) and an int (that many
    consecutive tokens in trace order) may straddle shards: the unfinished last group is carried into the next
    chunk, so streamed and in-memory results agree.
    """
    if group == "doc":
        for chunk in chunks(source, columns=needs(weights=True)):
            doc_code, _ = factorize(chunk.doc_ids)
            if group_size is None:
                yield chunk, doc_code
            else:
                win = (chunk.positions // group_size).astype(np.int64)
                yield chunk, factorize(doc_code * (int(win.max()) + 1) + win)[0]
        return
    carry: RoutingTrace | None = None  # the unfinished last group, always starting at a group boundary
    tokens_before = 0  # tokens of the stream before `cur` (int groups)
    for chunk in chunks(source, columns=needs(weights=True)):
        cur = chunk if carry is None else RoutingTrace.concat([carry, chunk])
        if group == "batch":
            assert batch_size is not None
            doc_code, _ = factorize(cur.doc_ids)  # ordinal of first appearance, 0 at the carried group
            codes = doc_code // batch_size
            last = int(codes.max())
            complete_last = np.unique(doc_code[codes == last]).size == batch_size
        else:
            n = int(group)
            pos = tokens_before + np.arange(cur.num_tokens)
            codes = pos // n - tokens_before // n
            last = int(codes.max())
            complete_last = (pos[-1] + 1) % n == 0
        done = np.ones(cur.num_tokens, dtype=bool) if complete_last else codes < last
        carry = None if done.all() else cur.select(np.flatnonzero(~done))
        if done.any():
            yield (cur if carry is None else cur.select(np.flatnonzero(done))), codes[done]
            tokens_before += int(done.sum())
    if carry is not None:
        yield carry, np.zeros(carry.num_tokens, dtype=np.intp)


def capacity_drop(
    trace: TraceSource,
    capacity_factors: Sequence[float] = (1.0, 1.25, 1.5, 2.0),
    *,
    group: Group = "doc",
    group_size: int | None = None,
    batch_size: int | None = None,
    priority: Priority = "slot",
    min_capacity: int = 1,
    by_position: bool = False,
    bins: int | Sequence[int] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Simulated token dropping at expert capacity (Switch Transformer, Fedus et al. 2021; GShard).

    Tokens are split into groups; each expert of each layer accepts at most
    ``capacity = max(min_capacity, floor(c * group_tokens * top_k / E))`` slots per group, served in ``priority``
    order (``"slot"``: all first choices of the group in token order, then second choices, ...; ``"token"``:
    token order). Slots beyond capacity are dropped, so late tokens drop first. Groups (``group``):

    - ``"doc"`` (default): each document alone, or each window of ``group_size`` positions inside a document.
      A lower bound of what a server sees: one sequence's repeats of a token all hit the same queue.
    - ``"batch"``: ``batch_size`` consecutive documents together (in trace order, which is capture order:
      ``capture_corpus`` batches ``batch_size`` consecutive texts, and a trace directory records its batch size,
      used when ``batch_size`` is None). This is the Switch / GShard setting: capacity is per group of tokens
      from many sequences of a batch (Switch: the tokens of a batch on one core; GShard: the tokens of a
      device's group), so the mix of sequences evens the load out.
    - an int ``n``: groups of ``n`` consecutive tokens in trace order (across documents), GShard's fixed group
      size; the last group may be shorter.

    Group sizes count real tokens (padding is not in the trace). Columns: ``capacity_factor, layer, drop_rate``
    (dropped / routed slots), ``token_drop_rate`` (share of tokens with at least one dropped slot),
    ``drop_rate_random`` (the same simulation on uniformly random routing, hashed from (doc id, position): the
    baseline of a router balanced in expectation), ``slots``, ``groups`` (groups simulated), ``group``.
    ``by_position=True`` splits rows by position bucket (``pos_start, pos_end``; ``bins`` as in
    ``load_by_position``) to show drops towards the end of the group.
    """
    if priority not in ("slot", "token"):
        raise MetricError(f"priority must be 'slot' or 'token', got {priority!r}.")
    factors = np.asarray(list(capacity_factors), dtype=np.float64)
    if factors.size == 0 or np.any(factors <= 0):
        raise MetricError(f"capacity factors must be positive, got {list(capacity_factors)}.")
    if group_size is not None and group_size <= 0:
        raise MetricError(f"group_size must be positive, got {group_size}.")
    if isinstance(group, (bool, np.bool_)) or not (
            group in ("doc", "batch") or (isinstance(group, (int, np.integer)) and group > 0)):
        raise MetricError(f"group must be 'doc', 'batch' or a positive number of tokens, got {group!r}.")
    if group_size is not None and group != "doc":
        raise MetricError("group_size (windows inside a document) only applies to group='doc'; for groups of n "
                          "tokens across documents pass group=n.")
    if group == "batch":
        batch_size = batch_size if batch_size is not None else _capture_batch_size(trace)
        if batch_size is None:
            raise MetricError("group='batch' needs batch_size (documents per batch): this source does not record "
                              "the batch size it was captured with; pass batch_size= (demo_runs captures 32).")
        if batch_size <= 0:
            raise MetricError(f"batch_size must be positive, got {batch_size}.")
    elif batch_size is not None:
        raise MetricError("batch_size only applies to group='batch'.")
    bucket_of, bounds = _bucketer(bins)

    def simulate(ids: np.ndarray, group: np.ndarray, caps: np.ndarray, codes: np.ndarray, n_b: int,
                 e: int) -> np.ndarray:
        """[factors, 3, buckets, layers]: dropped slots, routed slots, tokens with a drop."""
        rank = _queue_rank(group, ids, e, priority)
        valid = rank >= 0
        n_layers = ids.shape[1]
        idx = (codes[:, None] * n_layers + np.arange(n_layers)[None, :]).ravel()
        size = n_b * n_layers
        routed = np.bincount(idx, weights=valid.sum(axis=2).ravel(), minlength=size)
        out = np.zeros((len(factors), 3, size))
        for fi in range(len(factors)):
            per_tok = (valid & (rank >= caps[fi][group][:, None, None])).sum(axis=2).ravel()
            out[fi, 0] = np.bincount(idx, weights=per_tok, minlength=size)
            out[fi, 1] = routed
            out[fi, 2] = np.bincount(idx, weights=per_tok > 0, minlength=size)
        return out.reshape(len(factors), 3, n_b, n_layers)

    acc: GroupedAccumulator | None = None
    tok_acc = GroupedAccumulator((), np.float64)
    first: RoutingTrace | None = None
    n_groups = 0
    for chunk, grp in _capacity_groups(trace, group, group_size, batch_size):
        if first is None:
            first = chunk
            acc = GroupedAccumulator((len(factors), 5, chunk.num_layers), np.float64)
        assert acc is not None
        e, k = chunk.num_experts, chunk.top_k
        grp, _ = factorize(grp)
        sizes = np.bincount(grp)
        n_groups += len(sizes)
        caps = np.maximum(min_capacity, np.floor(factors[:, None] * sizes[None, :] * k / e)).astype(np.int64)
        if by_position:
            codes, buckets = factorize(bucket_of(chunk.positions))
        else:
            codes, buckets = np.zeros(chunk.num_tokens, np.intp), np.array([0])
        ids = sorted_ids(chunk)
        real = simulate(ids, grp, caps, codes, len(buckets), e)
        rnd = _random_topk((chunk.num_tokens, chunk.num_layers), e, k, seed, (chunk.doc_ids, chunk.positions))
        rnd = np.where(ids >= 0, rnd, -1).astype(np.int16)  # the trace's empty slots stay empty
        base = simulate(rnd, grp, caps, codes, len(buckets), e)
        tokens = np.bincount(codes, minlength=len(buckets)).astype(np.float64)
        both = np.concatenate([real, base[:, :2]], axis=1)  # [F, 5, B, L]
        acc.add(buckets, both.transpose(2, 0, 1, 3))  # [B, F, 5, L]
        tok_acc.add(buckets, tokens)
    assert first is not None and acc is not None
    buckets, arr = acc.result()  # [B, F, 5, L]
    _, tokens = tok_acc.result()
    n_b, n_f, _, n_layers = arr.shape
    b_idx, f_idx, l_idx = np.meshgrid(np.arange(n_b), np.arange(n_f), np.arange(n_layers), indexing="ij")
    drop, routed, tok_drop, drop_r, routed_r = (arr[:, :, j, :] for j in range(5))
    df = pd.DataFrame({
        "capacity_factor": factors[f_idx.ravel()],
        "layer": np.asarray(first.layers)[l_idx.ravel()],
        "drop_rate": safe_div(drop, routed).ravel(),
        "token_drop_rate": safe_div(tok_drop, tokens[:, None, None]).ravel(),
        "drop_rate_random": safe_div(drop_r, routed_r).ravel(),
        "slots": routed.ravel().astype(np.int64),
        "groups": n_groups,
        "group": str(group),
    })
    if by_position:
        start, end = bounds(buckets)
        df.insert(2, "pos_start", start[b_idx.ravel()])
        df.insert(3, "pos_end", end[b_idx.ravel()])
        df = df.sort_values(["capacity_factor", "layer", "pos_start"], kind="stable").reset_index(drop=True)
    return df


# ---------------------------------------------------------------------------------------------- placement
def greedy_placement(load: np.ndarray, num_devices: int, *, balanced: bool = True) -> np.ndarray:
    """Device of each expert (``[experts]`` int) by greedy longest-processing-time placement.

    Experts in descending load go to the least-loaded device; ``balanced=True`` caps each device at
    ceil(E / G) experts (the equal-slot packing of DeepSeek's EPLB). LPT's max load is within 4/3 of optimal.
    """
    load = np.asarray(load, dtype=np.float64)
    e = load.shape[0]
    if num_devices <= 0:
        raise MetricError(f"num_devices must be positive, got {num_devices}.")
    cap = math.ceil(e / num_devices) if balanced else e
    device_load = np.zeros(num_devices)
    device_n = np.zeros(num_devices, dtype=np.int64)
    out = np.empty(e, dtype=np.int64)
    for expert in np.argsort(-load, kind="stable"):  # a loop over experts, not tokens
        free = np.flatnonzero(device_n < cap)
        d = free[np.argmin(device_load[free])]
        out[expert] = d
        device_load[d] += load[expert]
        device_n[d] += 1
    return out


def _device_balance(load: np.ndarray, placement: np.ndarray, num_devices: int) -> tuple[float, float]:
    """(max_over_mean, balancedness) of the device loads of ``placement`` (``[experts]`` device ids)."""
    dev = np.bincount(placement, weights=load, minlength=num_devices)
    mean = load.sum() / num_devices
    return float(safe_div(dev.max(), mean)), float(safe_div(mean, dev.max()))


def expert_placement(trace: TraceSource, num_devices: int, *, balanced: bool = True, holdout: bool = False,
                     seed: int = 0) -> pd.DataFrame:
    """What-if: place each layer's experts on ``num_devices`` devices from the measured load (expert parallelism).

    Columns: ``layer, devices, max_over_mean_contiguous`` (experts 0..E/G-1 on device 0 and so on, the default
    sharding), ``max_over_mean_greedy`` (after ``greedy_placement``), ``balancedness_contiguous`` and
    ``balancedness_greedy`` (mean / max device load, SGLang's measure), ``gain`` (contiguous max / greedy max).
    Baseline: perfectly balanced devices give max_over_mean 1.

    ``holdout=True`` asks whether the placement carries over to new traffic: documents are split in two halves
    at random (hashed from (``seed``, doc id), so streamed and in-memory runs agree), the greedy placement is
    fitted on the ``fit`` half and scored on the ``heldout`` half. Columns then: ``layer, devices``,
    ``max_over_mean_in_sample`` (greedy, fitted and scored on the fit half: the optimistic number),
    ``max_over_mean_heldout`` (the fit half's placement on the held-out half: what a deployment would see),
    ``max_over_mean_oracle`` (the held-out half's own greedy placement: the best possible there),
    ``max_over_mean_contiguous`` (contiguous sharding on the held-out half), the matching ``balancedness_*``,
    ``gain_heldout`` (contiguous / heldout max) and ``fit_tokens, heldout_tokens``.
    """
    if not holdout:
        return _placement_in_sample(trace, num_devices, balanced)

    def half(chunk: RoutingTrace) -> np.ndarray:
        return np.where(hash_uniform(seed, chunk.doc_ids) < 0.5, "fit", "heldout")

    counts = usage_counts(trace, half)
    halves = counts.coords["value"].values.tolist()
    if halves != ["fit", "heldout"]:
        raise MetricError(f"holdout=True needs documents in both halves, but all fell into {halves}: the trace "
                          "has too few documents (a single one?); use holdout=False.")
    c_fit, c_held = counts.values.astype(np.float64)  # [L, E] each
    e = c_fit.shape[1]
    if num_devices <= 0 or num_devices > e:
        raise MetricError(f"num_devices must be between 1 and num_experts ({e}), got {num_devices}.")
    contiguous = np.minimum(np.arange(e) * num_devices // e, num_devices - 1)
    tokens = counts.attrs["tokens"]
    rows = []
    for li, layer in enumerate(counts.coords["layer"].values.tolist()):
        fitted = greedy_placement(c_fit[li], num_devices, balanced=balanced)
        ins = _device_balance(c_fit[li], fitted, num_devices)
        held = _device_balance(c_held[li], fitted, num_devices)
        oracle = _device_balance(c_held[li], greedy_placement(c_held[li], num_devices, balanced=balanced),
                                 num_devices)
        contig = _device_balance(c_held[li], contiguous, num_devices)
        rows.append({
            "layer": layer, "devices": num_devices,
            "max_over_mean_in_sample": ins[0], "max_over_mean_heldout": held[0],
            "max_over_mean_oracle": oracle[0], "max_over_mean_contiguous": contig[0],
            "balancedness_in_sample": ins[1], "balancedness_heldout": held[1],
            "balancedness_oracle": oracle[1], "balancedness_contiguous": contig[1],
            "gain_heldout": float(safe_div(np.asarray(contig[0]), np.asarray(held[0]))),
            "fit_tokens": int(tokens[0]), "heldout_tokens": int(tokens[1]),
        })
    return pd.DataFrame(rows)


def _placement_in_sample(trace: TraceSource, num_devices: int, balanced: bool) -> pd.DataFrame:
    counts = usage_counts(trace)
    c_all = counts.values.astype(np.float64)
    e = c_all.shape[1]
    if num_devices <= 0 or num_devices > e:
        raise MetricError(f"num_devices must be between 1 and num_experts ({e}), got {num_devices}.")
    contiguous = np.minimum(np.arange(e) * num_devices // e, num_devices - 1)
    rows = []
    for li, layer in enumerate(counts.coords["layer"].values.tolist()):
        c = c_all[li]
        dev_c = np.bincount(contiguous, weights=c, minlength=num_devices)
        dev_g = np.bincount(greedy_placement(c, num_devices, balanced=balanced), weights=c, minlength=num_devices)
        mean = c.sum() / num_devices
        rows.append({
            "layer": layer,
            "devices": num_devices,
            "max_over_mean_contiguous": float(safe_div(dev_c.max(), mean)),
            "max_over_mean_greedy": float(safe_div(dev_g.max(), mean)),
            "balancedness_contiguous": float(safe_div(mean, dev_c.max())),
            "balancedness_greedy": float(safe_div(mean, dev_g.max())),
            "gain": float(safe_div(dev_c.max(), dev_g.max())),
        })
    return pd.DataFrame(rows)
