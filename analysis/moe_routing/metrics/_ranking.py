"""The one ranking rule of the slots of a token: which slot is its first choice, second choice, top-k.

Slots rank by weight, descending; ties go to the lower slot; empty slots (expert -1) rank below every real one
(at the lowest finite float32), NaN weights at -inf (below them), as ``np.nan_to_num`` of the masked weights
gives. Without weights (imports that record ids only) or with k = 1, slot order is the engine's order.
``RoutingTrace.top1()`` and ``RoutingTrace.sorted_by_weight()`` follow the same rule (:func:`top1` is exactly
``RoutingTrace.top1()``); every function here works block by block, so temporaries stay
``O(BLOCK_DECISIONS)`` instead of ``[tokens, layers, k]`` float64 / int64 arrays.
"""

from __future__ import annotations

import numpy as np

from ..errors import MetricError
from ..trace import RoutingTrace
from ._source import token_blocks

__all__ = ["rank_keys", "sorted_ids", "sorted_slots", "top1", "top2", "topk_ids"]


def _check_read(chunk: RoutingTrace) -> None:
    if chunk.has_weights and chunk.meta.get("weights_read") is False:
        raise RuntimeError("internal: a metric ranks slots by weight but did not ask chunks() for the weights "
                           "column (pass columns=WEIGHTS).")


def rank_keys(w: np.ndarray, ids: np.ndarray) -> np.ndarray:
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
    _check_read(chunk)
    return rank_keys(chunk.weights, chunk.expert_ids)


def top1(chunk: RoutingTrace) -> np.ndarray:
    """int16 ``[tokens, layers]``: the expert of the largest-weight slot, exactly ``RoutingTrace.top1()``.

    (Ties: first slot; without weights: slot 0.) Computed block by block so the temporaries stay in cache.
    """
    ids = chunk.expert_ids
    if not chunk.has_weights or chunk.top_k == 1:
        return ids[:, :, 0].copy()
    _check_read(chunk)
    out = np.empty(ids.shape[:2], dtype=ids.dtype)
    for sl in token_blocks(chunk.num_tokens, chunk.num_layers * chunk.top_k):
        slot = np.argmax(rank_keys(chunk.weights[sl], ids[sl]), axis=2)
        out[sl] = np.take_along_axis(ids[sl], slot[:, :, None], axis=2)[:, :, 0]
    return out


def top2(chunk: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """int16 ``([tokens, layers], [tokens, layers])``: first and second slot by weight (``sorted_by_weight``)."""
    ids = chunk.expert_ids
    if not chunk.has_weights:
        return ids[:, :, 0].copy(), ids[:, :, 1].copy()
    _check_read(chunk)
    first = np.empty(ids.shape[:2], dtype=ids.dtype)
    second = np.empty(ids.shape[:2], dtype=ids.dtype)
    for sl in token_blocks(chunk.num_tokens, chunk.num_layers * chunk.top_k):
        block = ids[sl]
        w = rank_keys(chunk.weights[sl], block).copy()
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
    _check_read(chunk)
    out = np.empty_like(ids)
    for sl in token_blocks(chunk.num_tokens, chunk.num_layers * chunk.top_k):
        order = np.argsort(-rank_keys(chunk.weights[sl], ids[sl]), axis=2, kind="stable")
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


def sorted_slots(chunk: RoutingTrace, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, weights)`` ``[tokens, layers, k']`` of the first ``k`` slots by weight (all when None), as
    ``chunk.sorted_by_weight()`` orders them (``k' = min(k, top_k)``)."""
    ids = chunk.expert_ids
    kk = chunk.top_k if k is None else min(k, chunk.top_k)
    if not chunk.has_weights:
        return ids[:, :, :kk], chunk.weights[:, :, :kk]
    _check_read(chunk)
    out_ids = np.empty((*ids.shape[:2], kk), dtype=ids.dtype)
    out_w = np.empty((*ids.shape[:2], kk), dtype=chunk.weights.dtype)
    for sl in token_blocks(chunk.num_tokens, chunk.num_layers * chunk.top_k):
        order = np.argsort(-rank_keys(chunk.weights[sl], ids[sl]), axis=2, kind="stable")[:, :, :kk]
        out_ids[sl] = np.take_along_axis(ids[sl], order, axis=2)
        out_w[sl] = np.take_along_axis(chunk.weights[sl], order, axis=2)
    return out_ids, out_w
