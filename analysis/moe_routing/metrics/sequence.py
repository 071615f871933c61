"""Cross-layer and sequence structure: layer-to-layer transitions, path entropy, consecutive tokens, agreement.

References: Mixtral (Jiang et al. 2024, section 5, Table 5) for consecutive-token expert repetition; OLMoE
(Muennighoff et al. 2024, Fig. 20, "router saturation") for agreement between checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import MetricError, TraceError
from ..trace import RoutingTrace
from ._bootstrap import BootstrapCounts, hash64, quantiles
from ._counts import (
    GroupedAccumulator,
    factorize,
    grouped_counts,
    label_codes,
    layer_expert_counts,
    warn_small,
)
from ._ranking import top1, top2, topk_ids
from ._source import Label, TraceSource, chunks, fold, label_name, needs, token_blocks
from ._stats import entropy, nmi_tables, random_pair_overlap, safe_div

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "consecutive_same_expert",
    "path_entropy",
    "router_agreement",
    "transition_summary",
    "transitions",
]


# ---------------------------------------------------------------------------------------------- transitions
def _transition_counts(trace: TraceSource) -> tuple[np.ndarray, RoutingTrace]:
    """int64 ``[layers - 1, E, E]``: tokens with top-1 e at MoE layer l and e' at the next MoE layer."""

    def init(chunk: RoutingTrace) -> np.ndarray:
        if chunk.num_layers < 2:
            raise MetricError(f"transitions need at least two MoE layers; this trace has {list(chunk.layers)}.")
        e = chunk.num_experts
        return np.zeros((chunk.num_layers - 1) * e * e, np.int64)

    def update(state: np.ndarray, chunk: RoutingTrace) -> None:
        e, n_layers = chunk.num_experts, chunk.num_layers
        t1_all = top1(chunk)
        sentinel = (n_layers - 1) * e * e
        for sl in token_blocks(chunk.num_tokens, n_layers, sentinel):  # bounded int64 temporaries
            t1 = t1_all[sl].astype(np.intp)
            a, b = t1[:, :-1], t1[:, 1:]
            key = np.where((a >= 0) & (b >= 0), (np.arange(n_layers - 1)[None, :] * e + a) * e + b, sentinel)
            state += np.bincount(key.ravel(), minlength=sentinel + 1)[:sentinel]

    state, first = fold(trace, init, update, columns=needs(weights=True))
    e = first.num_experts
    return state.reshape(first.num_layers - 1, e, e), first


def transitions(trace: TraceSource, *, normalize: bool = True) -> xr.DataArray:
    """Top-1 transition matrices between consecutive MoE layers.

    DataArray ``(layer, expert, next_expert)``: for each MoE layer but the last (``layer`` coordinate; the
    ``next_layer`` coordinate on the same dim names the layer it flows into), P(top-1 at the next MoE layer =
    e' | top-1 here = e) (``normalize=False``: token counts). Rows of experts never chosen are NaN.
    Baseline: layer-independent routing makes every row equal to the next layer's expert shares.
    """
    import xarray as xr

    counts, first = _transition_counts(trace)
    values = safe_div(counts, counts.sum(axis=2, keepdims=True)) if normalize else counts
    e = first.num_experts
    return xr.DataArray(values, dims=("layer", "expert", "next_expert"),
                        coords={"layer": list(first.layers[:-1]), "next_layer": ("layer", list(first.layers[1:])),
                                "expert": np.arange(e), "next_expert": np.arange(e)},
                        name="p_transition" if normalize else "count")


def transition_summary(trace: TraceSource, *, n_shuffles: int = 5, seed: int = 0) -> pd.DataFrame:
    """How predictable the next layer's top-1 is from this layer's: one row per pair of consecutive MoE layers.

    Columns: ``layer, next_layer, nmi`` = I(e; e') / H(e') (e, e' = top-1 experts at the two layers),
    ``floor`` (the same after shuffling tokens between the layers, from the margins), ``cond_entropy_bits``
    = H(e' | e), ``h_next_bits``, ``tokens``.
    """
    counts, first = _transition_counts(trace)
    # rows = next-layer expert so that nmi normalises by H(next)
    out = nmi_tables(counts.transpose(0, 2, 1), n_shuffles, seed)
    h_next = out.pop("h_label_bits")
    mi = out.pop("mi_bits")
    return pd.DataFrame({"layer": list(first.layers[:-1]), "next_layer": list(first.layers[1:]),
                         "nmi": out["nmi"], "floor": out["floor"], "floor_sd": out["floor_sd"],
                         "mi_bits": mi, "cond_entropy_bits": h_next - mi, "h_next_bits": h_next,
                         "tokens": out["tokens"]})


# ---------------------------------------------------------------------------------------------- paths
def path_entropy(trace: TraceSource, *, depth: int | None = None) -> pd.DataFrame:
    """Entropy of top-1 expert paths through ``depth`` consecutive MoE layers (all layers when None).

    One row per window start: ``layer, depth, entropy_bits`` (plug-in entropy of the path distribution),
    ``independent_bits`` (sum of the per-layer top-1 entropies: the path entropy if layers routed
    independently), ``max_bits`` = log2(min(tokens, E^depth)), ``ratio`` = entropy / independent (< 1: layers
    share structure), ``distinct_paths, tokens``. Memory grows with the number of distinct paths (<= tokens).
    Plug-in entropy saturates at log2(tokens) when most paths are unique: read it against ``max_bits``.
    """

    def init(chunk: RoutingTrace) -> dict:
        d = chunk.num_layers if depth is None else depth
        if d < 1 or d > chunk.num_layers:
            raise MetricError(f"depth must be between 1 and the {chunk.num_layers} MoE layers, got {depth}.")
        return {"d": d, "paths": [[] for _ in range(chunk.num_layers - d + 1)],
                "single": np.zeros((chunk.num_layers, chunk.num_experts), np.int64), "n": 0}

    def update(state: dict, chunk: RoutingTrace) -> None:
        e, d = chunk.num_experts, state["d"]
        t1 = top1(chunk).astype(np.int64)
        ok = t1 >= 0
        exact = d * math.log2(e + 1) < 62
        for s in range(len(state["paths"])):  # loop over window starts (layers), tokens vectorised
            window = t1[:, s:s + d]
            keep = ok[:, s:s + d].all(axis=1)
            if exact:
                key = (window[keep] * ((e + 1) ** np.arange(d, dtype=np.int64))[None, :]).sum(axis=1)
            else:
                key = hash64(1, *(window[keep][:, j] for j in range(d))).view(np.int64)
            u, c = np.unique(key, return_counts=True)
            state["paths"][s].append((u, c))
        for li in range(chunk.num_layers):
            state["single"][li] += np.bincount(t1[ok[:, li], li], minlength=e)
        state["n"] += chunk.num_tokens

    state, first = fold(trace, init, update, columns=needs(weights=True))
    d, e = state["d"], first.num_experts
    h_single = entropy(state["single"], axis=1) / math.log(2)
    rows = []
    for s, parts in enumerate(state["paths"]):
        keys = np.concatenate([p[0] for p in parts])
        cnts = np.concatenate([p[1] for p in parts])
        _, inv = np.unique(keys, return_inverse=True)
        merged = np.bincount(inv, weights=cnts)
        n = merged.sum()
        h = float(entropy(merged) / math.log(2)) if n else np.nan
        indep = float(h_single[s:s + d].sum())
        rows.append({"layer": first.layers[s], "depth": d, "entropy_bits": h, "independent_bits": indep,
                     "max_bits": math.log2(min(max(n, 1), e**d)) if n else np.nan,
                     "ratio": h / indep if indep else np.nan, "distinct_paths": len(merged), "tokens": int(n)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- consecutive
def consecutive_same_expert(
    trace: TraceSource,
    *,
    by: Label | None = None,
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """How often consecutive tokens of a document get the same expert (Mixtral paper, Jiang et al. 2024, Table 5).

    Over pairs (token t, token t+1) of the same document with consecutive positions, per layer:
    ``first`` = P(top-1(t) == top-1(t+1)) ("first choice"); ``first_or_second`` = P(the two highest-weight
    experts of t and of t+1 share an expert) ("first or second choice"; NaN when k < 2).
    Baselines: ``random_first`` = 1/E, ``random_first_or_second`` = 1 - C(E-2, 2) / C(E, 2) (1 - (6/8)(5/7)
    = 46% for Mixtral), ``marginal_first`` = sum_e p_e^2 with p the layer's top-1 shares (chance given the
    measured imbalance). ``first_low, first_high, first_or_second_low, first_or_second_high``: Poisson bootstrap
    CI over documents (``n_boot`` replicates; 0 to skip). ``pairs``: pairs counted. ``by`` adds a label column
    (the label of token t). Without weights, slot order stands for weight order.
    """
    by_name = None if by is None else label_name(by)

    def init(chunk: RoutingTrace) -> dict:
        e, n_layers = chunk.num_experts, chunk.num_layers
        return {"acc": GroupedAccumulator((4, n_layers, e), np.float64),
                "boot": GroupedAccumulator((n_boot, 3, n_layers), np.float64),
                "tok": GroupedAccumulator((), np.int64)}

    def update(state: dict, chunk: RoutingTrace) -> None:
        e, n_layers = chunk.num_experts, chunk.num_layers
        codes, values = label_codes(chunk, by)
        nv = len(values)
        state["tok"].add(values, np.bincount(codes, minlength=nv))
        if chunk.top_k >= 2:
            t1, t2 = top2(chunk)  # first and second choice by weight
        else:
            t1, t2 = top1(chunk), None
        pair = (chunk.doc_ids[1:] == chunk.doc_ids[:-1]) & (chunk.positions[1:] == chunk.positions[:-1] + 1)
        a1, b1 = t1[:-1], t1[1:]
        valid = (a1 >= 0) & (b1 >= 0)
        valid &= pair[:, None]  # [pairs, L]
        same1 = valid & (a1 == b1)
        if t2 is not None:
            a2, b2 = t2[:-1], t2[1:]
            hit = (a1 == b2) | ((a2 >= 0) & ((a2 == b1) | (a2 == b2)))
            same2 = same1 | (valid & hit)
        else:
            same2 = np.zeros_like(valid)
        pc = codes[:-1]
        # [V, 4, L, E]: pairs, same first, same first-or-second (in expert column 0), top-1 counts
        out = np.zeros((nv, 4, n_layers, e))
        masks = (valid, same1, same2)
        lay = np.arange(n_layers)[None, :]
        if nv == 1:
            for j, m in enumerate(masks):
                out[0, j, :, 0] = m.sum(axis=0)
            out[0, 3] = layer_expert_counts(t1[:, :, None], e)
        else:
            cell = (pc[:, None] * n_layers + lay).ravel()
            for j, m in enumerate(masks):
                out[:, j, :, 0] = np.bincount(cell, weights=m.ravel(), minlength=nv * n_layers).reshape(nv, -1)
            out[:, 3] = grouped_counts(codes, nv, t1[:, :, None], e)
        state["acc"].add(values, out)
        if n_boot:
            # per (document, label value) unit: its pair counts [units, 3, L], then resample documents
            ucodes, units = factorize(chunk.doc_ids[:-1] * nv + pc)
            n_units = len(units)
            per_unit = np.zeros((n_units, 3, n_layers))
            ucell = (ucodes[:, None] * n_layers + lay).ravel()
            for j, m in enumerate(masks):
                per_unit[:, j] = np.bincount(ucell, weights=m.ravel(), minlength=n_units * n_layers).reshape(
                    n_units, n_layers)
            unit_doc, unit_val = units // nv, units % nv
            boots = np.zeros((nv, n_boot, 3, n_layers))
            for vi in range(nv):  # a loop over label values
                sel = unit_val == vi
                bc = BootstrapCounts(3 * n_layers, n_boot, seed)
                bc.add(np.repeat(unit_doc[sel], 3 * n_layers), np.tile(np.arange(3 * n_layers), int(sel.sum())),
                       per_unit[sel].ravel())
                boots[vi] = bc.boot.reshape(n_boot, 3, n_layers)
            state["boot"].add(values, boots)

    state, first = fold(trace, init, update, columns=needs(by, weights=True))
    values, acc = state["acc"].result()
    _, tokens = state["tok"].result()
    if by is not None:
        warn_small(label_name(by), values, tokens)
    e, k = first.num_experts, first.top_k
    pairs, s1, s2 = acc[:, 0, :, 0], acc[:, 1, :, 0], acc[:, 2, :, 0]
    p = safe_div(acc[:, 3], acc[:, 3].sum(axis=2, keepdims=True))
    nv, n_layers = pairs.shape
    df = pd.DataFrame({
        "layer": np.tile(np.asarray(first.layers), nv),
        "first": safe_div(s1, pairs).ravel(),
        "first_or_second": (safe_div(s2, pairs) if k >= 2 else np.full_like(pairs, np.nan)).ravel(),
        "random_first": 1.0 / e,
        "random_first_or_second": random_pair_overlap(e, 2) if k >= 2 else np.nan,
        "marginal_first": (p**2).sum(axis=2).ravel(),
        "pairs": pairs.ravel().astype(np.int64),
    })
    if n_boot:
        _, b = state["boot"].result()  # [V, B, 3, L]
        lo1, hi1 = quantiles(safe_div(b[:, :, 1], b[:, :, 0]).transpose(1, 0, 2), ci)
        lo2, hi2 = quantiles(safe_div(b[:, :, 2], b[:, :, 0]).transpose(1, 0, 2), ci)
        df["first_low"], df["first_high"] = lo1.ravel(), hi1.ravel()
        if k >= 2:
            df["first_or_second_low"], df["first_or_second_high"] = lo2.ravel(), hi2.ravel()
        else:
            df["first_or_second_low"] = df["first_or_second_high"] = np.nan
    if by is not None:
        df.insert(0, by_name, np.repeat(values, n_layers))
    return df


# ---------------------------------------------------------------------------------------------- agreement
def _aligned(a: TraceSource, b: TraceSource) -> Iterator[tuple[RoutingTrace, RoutingTrace]]:
    """Pairs of equally long chunks of two traces of the same tokens, whatever their sharding."""
    cols = needs(weights=True, tokens=True)
    it_a, it_b = iter(chunks(a, columns=cols)), iter(chunks(b, columns=cols))
    buf_a: RoutingTrace | None = None
    buf_b: RoutingTrace | None = None
    while True:
        if buf_a is None or buf_a.num_tokens == 0:
            buf_a = next(it_a, None)
        if buf_b is None or buf_b.num_tokens == 0:
            buf_b = next(it_b, None)
        if buf_a is None or buf_b is None:
            if buf_a is not None or buf_b is not None:
                raise TraceError("the two traces hold different numbers of tokens; agreement needs the same tokens.")
            return
        m = min(buf_a.num_tokens, buf_b.num_tokens)
        head_a = buf_a if m == buf_a.num_tokens else buf_a.select(np.arange(m))
        head_b = buf_b if m == buf_b.num_tokens else buf_b.select(np.arange(m))
        yield head_a, head_b
        buf_a = None if m == buf_a.num_tokens else buf_a.select(np.arange(m, buf_a.num_tokens))
        buf_b = None if m == buf_b.num_tokens else buf_b.select(np.arange(m, buf_b.num_tokens))


def router_agreement(a: TraceSource, b: TraceSource, *, k: int | None = None) -> pd.DataFrame:
    """Agreement of two routers on the same tokens (OLMoE "router saturation", Muennighoff et al. 2024 Fig. 20).

    For two traces of the same tokens (e.g. an early checkpoint vs the final one, or two models sharing experts'
    indexing), per MoE layer present in both: ``agreement`` = mean over tokens of |topk(a) ∩ topk(b)| / k
    (top-k by weight, ``k`` = the smaller top_k unless given), ``top1`` = P(top-1 equal), baselines
    ``random`` = k/E (expected overlap of independent random k-sets) and ``random_top1`` = 1/E, ``tokens``.
    Streams both traces together; raises ``TraceError`` if their token ids or lengths differ.
    """
    state: dict = {}
    for ca, cb in _aligned(a, b):
        if not state:
            if ca.num_experts != cb.num_experts:
                raise MetricError(f"the traces route over {ca.num_experts} and {cb.num_experts} experts; agreement "
                                  "compares expert indices of the same expert set.")
            common = [x for x in ca.layers if x in cb.layers]
            if not common:
                raise MetricError(f"the traces share no MoE layer ({list(ca.layers)} vs {list(cb.layers)}).")
            kk = min(ca.top_k, cb.top_k) if k is None else k
            if kk < 1 or kk > min(ca.top_k, cb.top_k):
                raise MetricError(f"k must be between 1 and {min(ca.top_k, cb.top_k)}, got {k}.")
            state = {"layers": common, "k": kk, "e": ca.num_experts,
                     "ia": [ca.layer_index(x) for x in common], "ib": [cb.layer_index(x) for x in common],
                     "inter": np.zeros(len(common)), "top1": np.zeros(len(common)), "n": 0}
        ta, tb = ca.token_ids, cb.token_ids
        known = (ta >= 0) & (tb >= 0)
        if np.any(ta[known] != tb[known]):
            raise TraceError("the two traces hold different token ids at the same position; agreement needs the "
                             "same tokens in the same order.")
        xa = topk_ids(ca, state["k"])[:, state["ia"], :]
        xb = topk_ids(cb, state["k"])[:, state["ib"], :]
        hit = np.zeros(xa.shape, dtype=bool)
        for j in range(xb.shape[2]):  # loop over slots
            hit |= xa == xb[:, :, j:j + 1]
        hit &= xa >= 0
        state["inter"] += hit.sum(axis=(0, 2))
        state["top1"] += (top1(ca)[:, state["ia"]] == top1(cb)[:, state["ib"]]).sum(axis=0)
        state["n"] += ca.num_tokens
    if not state:
        raise MetricError("the traces hold no tokens.")
    n, kk, e = state["n"], state["k"], state["e"]
    return pd.DataFrame({"layer": state["layers"], "agreement": state["inter"] / (n * kk), "top1": state["top1"] / n,
                         "random": kk / e, "random_top1": 1.0 / e, "tokens": n})

