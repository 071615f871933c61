"""Small synthetic traces and reference metric frames (computed here, independent of moe_routing.metrics)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_routing import RoutingTrace
from moe_routing.testing import synthetic_trace

LAYERS = (1, 3, 5, 7)  # decoder-layer indices of the MoE layers: deliberately not 0..L-1
NUM_EXPERTS = 8
TOP_K = 2
WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", "\n", "Der",
         " schnelle", " Fuchs", " springt", " über", " den", " Hund", "."]  # fmt: skip


def make_trace(
    n_docs: int = 3,
    doc_len: int = 19,
    *,
    layers: tuple[int, ...] = LAYERS,
    num_experts: int = NUM_EXPERTS,
    top_k: int = TOP_K,
    logits: bool = True,
    seed: int = 0,
) -> RoutingTrace:
    """A trace whose routing depends on a ``lang`` label (de prefers the upper half of the experts, fr expert 0);
    every document is the token cycle of ``WORDS``. A thin wrapper of ``moe_routing.testing.synthetic_trace``."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys(WORDS))}
    return synthetic_trace(
        n_docs, doc_len, layers=layers, num_experts=num_experts, top_k=top_k, langs=("en", "de", "fr"),
        token_cycle=[vocab[w] for w in WORDS], labels=("lang",), logits=logits, float32_scores=True, seed=seed,
        lang_bias={"de": dict.fromkeys(range(num_experts // 2, num_experts), 1.5), "fr": {0: 2.0}},
    )


def token_texts(trace: RoutingTrace) -> list[str]:
    """Token strings aligned with ``make_trace``'s tokens."""
    inv = {i: t for t, i in {t: i for i, t in enumerate(dict.fromkeys(WORDS))}.items()}
    return [inv[int(i)] for i in trace.token_ids]


def load_frame(trace: RoutingTrace) -> pd.DataFrame:
    """Reference ``expert_load``: ``layer, expert, count, share``."""
    rows = []
    for li, layer in enumerate(trace.layers):
        e = trace.expert_ids[:, li, :]
        counts = np.bincount(e[e >= 0].astype(int), minlength=trace.num_experts)
        for ex, c in enumerate(counts):
            rows.append({"layer": layer, "expert": ex, "count": int(c), "share": c / counts.sum()})
    return pd.DataFrame(rows)


def balance_frame(trace: RoutingTrace) -> pd.DataFrame:
    """Reference ``load_balance``: ``layer, cv, max_over_mean, entropy_norm, gini``."""
    rows = []
    for layer, sub in load_frame(trace).groupby("layer"):
        s = np.sort(sub["share"].to_numpy())
        n = len(s)
        ent = -np.sum(s[s > 0] * np.log(s[s > 0])) / np.log(n)
        gini = (2 * np.sum(np.arange(1, n + 1) * s) / (n * s.sum())) - (n + 1) / n
        cv, mom = s.std() / s.mean(), s.max() / s.mean()
        rows.append({"layer": layer, "cv": cv, "max_over_mean": mom, "entropy_norm": ent, "gini": gini})
    return pd.DataFrame(rows)
