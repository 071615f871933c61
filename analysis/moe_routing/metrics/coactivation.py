"""Co-activation of experts: which experts a token's top-k holds together (OLMoE, Muennighoff et al. 2024, Fig. 25).

P(E_j | E_i) = count(i, j) / count(i) per layer, over all pairs of a token's experts (``mode="all"``) or only
rank-adjacent pairs of the weight-sorted top-k (``mode="adjacent"``, as OLMoE's script counts them), with the
uniformly-random-routing baseline of each mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ..errors import MetricError
from ..trace import RoutingTrace
from ._counts import layer_expert_counts
from ._ranking import sorted_ids
from ._source import TraceSource, fold, needs, token_blocks

if TYPE_CHECKING:
    import xarray as xr

CoactivationMode = Literal["all", "adjacent"]

__all__ = ["coactivation", "coactivation_matrices", "coactivation_random", "coactivation_summary"]


# ---------------------------------------------------------------------------------------------- co-activation
def coactivation_random(num_experts: int, top_k: int, mode: CoactivationMode = "all") -> float:
    """P(E_j | E_i) off the diagonal when every token takes k distinct experts uniformly at random.

    ``mode="all"``: each of i's slots has k - 1 partners spread over the E - 1 other experts, (k - 1) / (E - 1).
    ``mode="adjacent"``: a slot has on average 2 (k - 1) / k rank-adjacent partners (the two ends one, the
    others two), so 2 (k - 1) / (k (E - 1)).
    """
    _pair_slots(max(top_k, 1), mode)  # validates mode
    if num_experts < 2 or top_k < 1:
        return float("nan")
    if mode == "all":
        return (top_k - 1) / (num_experts - 1)
    return 2 * (top_k - 1) / (top_k * (num_experts - 1))


def _pair_slots(k: int, mode: CoactivationMode) -> tuple[np.ndarray, np.ndarray]:
    if mode == "all":
        i, j = np.triu_indices(k, 1)
    elif mode == "adjacent":
        i, j = np.arange(k - 1), np.arange(1, k)
    else:
        raise MetricError(f"mode must be 'all' or 'adjacent', got {mode!r}.")
    return i, j


def _pair_counts(trace: TraceSource, mode: CoactivationMode, layers: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray,
                                                                                       RoutingTrace]:
    """(pair counts ``[layers, E, E]`` symmetric, expert counts ``[layers, E]``, first chunk)."""

    def init(chunk: RoutingTrace) -> dict:
        e = chunk.num_experts
        return {"pairs": np.zeros(chunk.num_layers * e * e, np.int64),
                "single": np.zeros((chunk.num_layers, e), np.int64)}

    def update(state: dict, chunk: RoutingTrace) -> None:
        e, n_layers = chunk.num_experts, chunk.num_layers
        ids = sorted_ids(chunk) if mode == "adjacent" else chunk.expert_ids
        state["single"] += layer_expert_counts(ids, e)
        si, sj = _pair_slots(chunk.top_k, mode)
        if len(si) == 0:
            return
        sentinel = n_layers * e * e
        n_pairs, k = len(si), chunk.top_k
        layer_base = (np.arange(n_layers, dtype=np.intp) * e * e)[None, None, :]
        empty = bool((ids < 0).any())
        for sl in token_blocks(chunk.num_tokens, n_layers * n_pairs, sentinel):
            # slot-major contiguous rows [k, tokens * layers]: each slot pair is one add of two rows
            block = ids[sl]
            m = block.shape[0] * n_layers
            rows = np.ascontiguousarray(block.transpose(2, 0, 1)).astype(np.intp)  # [k, tokens, layers]
            first_key = (rows * e + layer_base).reshape(k, m)
            rows = rows.reshape(k, m)
            keys = np.empty((n_pairs, m), dtype=np.intp)
            for p in range(n_pairs):  # a loop over slot pairs (<= k(k-1)/2), tokens vectorised
                np.add(first_key[si[p]], rows[sj[p]], out=keys[p])
                if empty:
                    np.putmask(keys[p], (rows[si[p]] < 0) | (rows[sj[p]] < 0), sentinel)
            state["pairs"] += np.bincount(keys.ravel(), minlength=sentinel + 1)[:sentinel]

    state, first = fold(trace, init, update, layers=layers, columns=needs(weights=mode == "adjacent"))
    e = first.num_experts
    pairs = state["pairs"].reshape(first.num_layers, e, e)
    pairs = pairs + pairs.transpose(0, 2, 1)
    idx = np.arange(e)
    pairs[:, idx, idx] = 0
    return pairs, state["single"], first


def _conditional(pairs: np.ndarray, single: np.ndarray) -> np.ndarray:
    """P(E_j | E_i) = pairs[..., i, j] / single[..., i]; 0 where expert i was never chosen."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(single[..., :, None] > 0, pairs / np.maximum(single[..., :, None], 1), 0.0)


def coactivation(trace: TraceSource, layer: int, *, mode: CoactivationMode = "all") -> np.ndarray:
    """float64 ``[experts, experts]``: P(E_j | E_i) = count(i, j) / count(i) at MoE layer ``layer``.

    count(i, j) = tokens whose top-k holds both i and j (``mode="all"``: all C(k, 2) pairs of a token's
    experts; ``mode="adjacent"``: only rank-adjacent pairs of the weight-sorted top-k, as OLMoE's
    ``do_coactivation_analysis`` in ``scripts/run_moe_analysis.py`` counts them), count(i) = slots routed to i.
    Diagonal 0; the row of an expert never chosen is 0 (nothing observed). Muennighoff et al. 2024, Fig. 25.
    Random routing baseline off the diagonal (:func:`coactivation_random`): (k - 1) / (E - 1) in the all-pairs
    mode (each row then sums to k - 1), 2 (k - 1) / (k (E - 1)) in the adjacent mode.
    """
    if isinstance(trace, RoutingTrace):
        trace.layer_index(layer)
    pairs, single, _ = _pair_counts(trace, mode, [layer])
    return _conditional(pairs[0], single[0])


def coactivation_matrices(trace: TraceSource, *, mode: CoactivationMode = "all") -> xr.DataArray:
    """``coactivation`` for every MoE layer: DataArray ``(layer, expert, other)`` of P(other | expert).

    ``attrs``: ``mode``, ``random`` (P(other | expert) under uniformly random routing in this ``mode``:
    :func:`coactivation_random`) and ``chosen`` (``[layers, experts]`` slot counts, to tell never-chosen
    experts' zero rows apart).
    """
    import xarray as xr

    pairs, single, first = _pair_counts(trace, mode, None)
    e = first.num_experts
    return xr.DataArray(_conditional(pairs, single), dims=("layer", "expert", "other"),
                        coords={"layer": list(first.layers), "expert": np.arange(e), "other": np.arange(e)},
                        attrs={"mode": mode, "random": coactivation_random(e, first.top_k, mode), "chosen": single},
                        name="p_coactivation")


def coactivation_summary(trace: TraceSource, *, mode: CoactivationMode = "all") -> pd.DataFrame:
    """Per layer: how strongly experts pair up. Columns ``layer, max_p, mean_max_p, random``.

    ``max_p`` = the largest P(E_j | E_i); ``mean_max_p`` = mean over chosen experts i of max_j P(E_j | E_i);
    ``random`` = P(E_j | E_i) under uniformly random routing in this ``mode`` (:func:`coactivation_random`):
    (k - 1) / (E - 1) for all pairs, 2 (k - 1) / (k (E - 1)) for rank-adjacent pairs.
    """
    m = coactivation_matrices(trace, mode=mode)
    row_max = np.where(m.attrs["chosen"] > 0, m.values.max(axis=2), np.nan)
    return pd.DataFrame({"layer": m.coords["layer"].values, "max_p": np.nanmax(row_max, axis=1),
                         "mean_max_p": np.nanmean(row_max, axis=1), "random": m.attrs["random"]})
