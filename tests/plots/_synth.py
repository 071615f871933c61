"""Small synthetic traces and reference metric frames (computed here, independent of moe_routing.metrics)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_routing import RoutingTrace

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
    """A trace whose routing depends on a ``lang`` label (de prefers the upper half of the experts)."""
    rng = np.random.default_rng(seed)
    n = n_docs * doc_len
    lang = np.array(["en", "de", "fr"] * (n_docs // 3 + 1))[:n_docs].repeat(doc_len)
    z = rng.normal(size=(n, len(layers), num_experts)).astype(np.float32)
    z[lang == "de", :, num_experts // 2 :] += 1.5
    z[lang == "fr", :, 0] += 2.0
    ids = np.argsort(-z, axis=2, kind="stable")[:, :, :top_k]
    p = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    w = np.take_along_axis(p, ids, axis=2)
    w = w / w.sum(axis=2, keepdims=True)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(WORDS))}
    token_ids = np.array([vocab[WORDS[j % len(WORDS)]] for j in range(doc_len)] * n_docs)
    return RoutingTrace.from_arrays(
        ids,
        w,
        layers=layers,
        num_experts=num_experts,
        labels={"lang": lang},
        token_ids=token_ids,
        doc_ids=np.arange(n_docs).repeat(doc_len),
        router_logits=z if logits else None,
        model_name="synthetic",
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
