"""Contrast of two conditions: differential expert usage per layer, with effect sizes and bootstrap CIs.

Conditions are two values of a label of one trace (``contrast``: Qwen3 thinking vs non-thinking phase, prompt A
vs B, language A vs B) or two traces (``contrast_traces``: the same prompts captured twice). Confidence
intervals come from a Poisson bootstrap over documents that streams: each document's weight in a replicate is a
hash of (seed, doc id, replicate), so a document present in both conditions (same doc id) moves in both at once
(a paired, cluster bootstrap).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..errors import MetricError
from ._bootstrap import grouped_counts_boot, quantiles
from ._counts import warn_small
from ._source import Label, TraceSource, label_name
from ._stats import js_divergence, js_floor, safe_div

__all__ = ["contrast", "contrast_summary", "contrast_traces"]


def _conditions(trace: TraceSource, label: Label, a: Any, b: Any, k: int | None, top1: bool, n_boot: int,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    values, counts, boot, tokens, first = grouped_counts_boot(trace, label, k=k, top1=top1, n_boot=n_boot,
                                                              seed=seed, keep=[a, b])
    index = {v: i for i, v in enumerate(values.tolist())}
    missing = [v for v in (a, b) if v not in index]
    if missing:
        raise MetricError(f"no token has {label_name(label)} in {missing}; values present: {values.tolist()}.")
    order = [index[a], index[b]]
    warn_small(label_name(label), values[order], tokens[order])
    return counts[order], boot[order], tokens[order], list(first.layers)


def _pair_traces(trace_a: TraceSource, trace_b: TraceSource, k: int | None, top1: bool, n_boot: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    parts = [grouped_counts_boot(t, None, k=k, top1=top1, n_boot=n_boot, seed=seed) for t in (trace_a, trace_b)]
    (_, ca, ba, ta, fa), (_, cb, bb, tb, fb) = parts
    if fa.layers != fb.layers or fa.num_experts != fb.num_experts:
        raise MetricError(f"the traces differ in layout: layers {fa.layers} / {fb.layers}, experts "
                          f"{fa.num_experts} / {fb.num_experts}; contrast compares the same model's experts.")
    return np.concatenate([ca, cb]), np.concatenate([ba, bb]), np.concatenate([ta, tb]), list(fa.layers)


def _frame(counts: np.ndarray, boot: np.ndarray, tokens: np.ndarray, layers: list[int], names: tuple[Any, Any],
           ci: float, smoothing: float) -> pd.DataFrame:
    """counts ``[2, L, E]``, boot ``[2, B, L, E]`` -> tidy per (layer, expert) contrast."""
    share = safe_div(counts, counts.sum(axis=2, keepdims=True))  # [2, L, E]
    diff = share[0] - share[1]
    e = counts.shape[2]
    sm = (counts + smoothing) / (counts.sum(axis=2, keepdims=True) + smoothing * e)
    log2_ratio = np.log2(sm[0] / sm[1])
    with np.errstate(invalid="ignore"):
        h = 2 * np.arcsin(np.sqrt(np.clip(share[0], 0, 1))) - 2 * np.arcsin(np.sqrt(np.clip(share[1], 0, 1)))
    if boot.shape[1]:
        bshare = safe_div(boot, boot.sum(axis=3, keepdims=True))
        lo, hi = quantiles(bshare[0] - bshare[1], ci)
    else:
        lo = hi = np.full(diff.shape, np.nan)
    n_layers = counts.shape[1]
    return pd.DataFrame({
        "layer": np.repeat(layers, e),
        "expert": np.tile(np.arange(e), n_layers),
        "share_a": share[0].ravel(),
        "share_b": share[1].ravel(),
        "diff": diff.ravel(),
        "ci_low": lo.ravel(),
        "ci_high": hi.ravel(),
        "significant": ((lo > 0) | (hi < 0)).ravel(),
        "log2_ratio": log2_ratio.ravel(),
        "cohens_h": h.ravel(),
        "count_a": counts[0].ravel().astype(np.int64),
        "count_b": counts[1].ravel().astype(np.int64),
        "tokens_a": int(tokens[0]),
        "tokens_b": int(tokens[1]),
    }).assign(a=names[0], b=names[1])


def contrast(
    trace: TraceSource,
    label: Label,
    a: Any,
    b: Any,
    *,
    top1: bool = False,
    k: int | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    smoothing: float = 0.5,
) -> pd.DataFrame:
    """Differential expert usage between tokens with ``label == a`` and ``label == b``, per layer and expert.

    Columns: ``layer, expert, share_a, share_b`` (the expert's share of the condition's routing slots),
    ``diff`` = share_a - share_b, ``ci_low, ci_high`` (percentile CI of diff, Poisson bootstrap over documents,
    ``n_boot`` replicates), ``significant`` (CI excludes 0; not corrected for testing E x layers experts),
    ``log2_ratio`` (add-``smoothing`` shares), ``cohens_h`` (2 asin sqrt(p_a) - 2 asin sqrt(p_b), the effect
    size of a difference of proportions: 0.2 small, 0.5 medium), counts and tokens, and ``a, b``.
    Baseline: no condition effect gives diff 0 (CIs covering 0); see ``contrast_summary`` for a per-layer
    divergence with its shuffled-label floor.
    """
    counts, boot, tokens, layers = _conditions(trace, label, a, b, k, top1, n_boot, seed)
    return _frame(counts, boot, tokens, layers, (a, b), ci, smoothing)


def contrast_traces(
    trace_a: TraceSource,
    trace_b: TraceSource,
    *,
    top1: bool = False,
    k: int | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    smoothing: float = 0.5,
    names: tuple[Any, Any] = ("a", "b"),
) -> pd.DataFrame:
    """``contrast`` between two traces of the same model (e.g. one prompt set captured in two modes).

    Same columns as ``contrast``. Documents with the same doc id in both traces share their bootstrap weight
    (paired resampling); otherwise the two traces are resampled independently.
    """
    counts, boot, tokens, layers = _pair_traces(trace_a, trace_b, k, top1, n_boot, seed)
    return _frame(counts, boot, tokens, layers, names, ci, smoothing)


def contrast_summary(
    trace: TraceSource,
    label: Label | None = None,
    a: Any = None,
    b: Any = None,
    *,
    other: TraceSource | None = None,
    top1: bool = False,
    k: int | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    n_shuffles: int = 5,
) -> pd.DataFrame:
    """One row per layer: how different the two conditions' expert usage is overall.

    Conditions: ``label`` values ``a`` and ``b`` of ``trace``, or ``trace`` vs ``other``. Columns: ``layer, js``
    (JS divergence in bits between the two usage distributions), ``js_low, js_high`` (bootstrap CI),
    ``floor`` (JS after shuffling the condition over routing slots, from the margins), ``tv`` (total variation
    = half the L1 distance of the shares), ``n_significant`` (experts whose diff CI excludes 0).
    """
    if other is not None:
        counts, boot, _tokens, layers = _pair_traces(trace, other, k, top1, n_boot, seed)
    else:
        if label is None:
            raise MetricError("give label, a and b (two values of one trace) or other= (a second trace).")
        counts, boot, _tokens, layers = _conditions(trace, label, a, b, k, top1, n_boot, seed)
    js = js_divergence(counts[0], counts[1])
    lo, hi = quantiles(js_divergence(boot[0], boot[1]), ci) if n_boot else (js * np.nan, js * np.nan)
    share = safe_div(counts, counts.sum(axis=2, keepdims=True))
    tv = 0.5 * np.abs(share[0] - share[1]).sum(axis=1)
    floor = js_floor(counts[0], counts[1], n_shuffles, np.random.default_rng(seed))
    if n_boot:
        bshare = safe_div(boot, boot.sum(axis=3, keepdims=True))
        dlo, dhi = quantiles(bshare[0] - bshare[1], ci)
        n_sig = ((dlo > 0) | (dhi < 0)).sum(axis=1)
    else:
        n_sig = np.zeros(len(layers), dtype=np.int64)
    return pd.DataFrame({"layer": layers, "js": js, "js_low": lo, "js_high": hi, "floor": floor, "tv": tv,
                         "n_significant": n_sig})
