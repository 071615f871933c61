"""Specialization: which experts serve which labels, tokens and token types; co-activation of experts.

References: OLMoE (Muennighoff et al. 2024, section 5 and ``scripts/run_moe_analysis.py``) for domain and
vocabulary specialization and co-activation; Mixtral (Jiang et al. 2024, section 5) for per-domain expert shares.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ..errors import MetricError
from ..trace import RoutingTrace
from ._bootstrap import grouped_counts_boot, quantiles
from ._counts import factorize, warn_small
from ._ranking import top1, topk_ids
from ._source import Label, TraceSource, fold, label_name, label_of, needs, read_all
from ._stats import entropy, mutual_information, nmi_tables, safe_div
from .load import usage_counts

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "TOKEN_TYPES",
    "VOCABULARY_PRESETS",
    "coactivation",
    "coactivation_matrices",
    "coactivation_random",
    "coactivation_summary",
    "domain_specialization",
    "label_nmi",
    "label_probe",
    "label_usage",
    "token_type",
    "token_type_label",
    "token_type_specialization",
    "top_tokens",
    "vocabulary_specialization",
]


# ---------------------------------------------------------------------------------------------- per label
def _long(counts: xr.DataArray, column: str) -> pd.DataFrame:
    """Tidy frame of a ``[value, layer, expert]`` count tensor with count, share, token_share, lift, tokens."""
    c = counts.values.astype(np.float64)
    nv, n_layers, e = c.shape
    tokens = np.asarray(counts.attrs["tokens"], dtype=np.float64)
    share = safe_div(c, c.sum(axis=2, keepdims=True))
    overall = c.sum(axis=0)
    overall_share = safe_div(overall, overall.sum(axis=1, keepdims=True))
    return pd.DataFrame({
        column: np.repeat(counts.coords["value"].values, n_layers * e),
        "layer": np.tile(np.repeat(counts.coords["layer"].values, e), nv),
        "expert": np.tile(np.arange(e), nv * n_layers),
        "count": counts.values.ravel(),
        "share": share.ravel(),
        "token_share": safe_div(c, tokens[:, None, None]).ravel(),
        "lift": safe_div(share, overall_share[None]).ravel(),
        "tokens": np.repeat(tokens.astype(np.int64), n_layers * e),
    })


def label_usage(trace: TraceSource, label: Label, *, top1: bool = False, k: int | None = None) -> pd.DataFrame:
    """Expert-usage distribution per label value (domain, language, condition, ...), per layer.

    Columns: ``<label>, layer, expert, count, share, token_share, lift, tokens`` where ``share`` = the expert's
    share of the value's slots in the layer (sums to 1 over experts; Mixtral Fig. 7), ``token_share`` = count /
    tokens of the value (share of its tokens that use the expert when each token uses it at most once),
    ``lift`` = share / the expert's share over all values (1 = no preference).
    Baseline: label-independent routing gives lift 1; uniform routing gives share 1/E.
    """
    counts = usage_counts(trace, label, top1=top1, k=k)
    warn_small(label_name(label), counts.coords["value"].values, counts.attrs["tokens"])
    return _long(counts, label_name(label))


def domain_specialization(trace: TraceSource, label: Label = "domain", *, k: int | None = None) -> pd.DataFrame:
    """OLMoE domain specialization (Muennighoff et al. 2024, Figs. 21-23) per domain, layer and expert.

    Columns: ``<label>, layer, expert, specialization, token_share, purity, purity_baseline, uniform,
    token_share_uniform, count, tokens`` with ``specialization`` = the expert's routing slots for the domain /
    all slots of the domain (OLMoE's plotted proportion; sums to 1 over experts; ``uniform`` = 1/E is the
    balanced baseline), ``token_share`` = share of the domain's tokens that have the expert among their top-k
    (= specialization x k, the quantity of OLMoE's v2 figure; baseline ``token_share_uniform`` = k/E, k the
    slots counted), and ``purity`` = the domain's share of the expert's slots (1 = the expert serves this domain
    only; baseline = the domain's share of all slots, column ``purity_baseline``).
    """
    counts = usage_counts(trace, label, k=k)
    name = label_name(label)
    warn_small(name, counts.coords["value"].values, counts.attrs["tokens"])
    df = _long(counts, name)
    c = counts.values.astype(np.float64)
    purity = safe_div(c, c.sum(axis=0, keepdims=True))
    base = safe_div(c.sum(axis=2), c.sum(axis=(0, 2))[None, :])  # [V, L]
    df = df.rename(columns={"share": "specialization"})
    df["purity"] = purity.ravel()
    df["purity_baseline"] = np.repeat(base.ravel(), c.shape[2])
    df["uniform"] = 1.0 / c.shape[2]
    df["token_share_uniform"] = counts.attrs["top_k"] / c.shape[2]
    return df[[name, "layer", "expert", "specialization", "token_share", "purity", "purity_baseline", "uniform",
               "token_share_uniform", "count", "tokens"]]


_nmi_tables = nmi_tables  # the NMI tables live in _stats (kept under this name for old imports)


def label_nmi(
    trace: TraceSource,
    label: Label,
    *,
    n_shuffles: int = 5,
    n_boot: int = 0,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """How much the top-1 expert tells about a label: one row per layer.

    ``nmi`` = I(label; top-1 expert) / H(label) (plug-in estimates from the label x expert contingency table;
    top-1 = the slot with the largest weight, slot 0 without weights). 1 = the expert determines the label.
    ``floor`` = the same with shuffled labels (mean over ``n_shuffles``; each shuffled table is drawn from the
    table's margins, exactly as shuffling the token labels would give, so it streams): the value that finite
    samples give without any dependence; read ``nmi`` against it. Also ``floor_sd, mi_bits, h_label_bits,
    tokens`` and, with ``n_boot`` > 0, ``ci_low, ci_high`` (Poisson bootstrap over documents). Tokens whose
    slots are all empty are left out of their layer.
    """
    values, counts, boot, tokens, first = grouped_counts_boot(trace, label, top1=True, n_boot=n_boot, seed=seed)
    warn_small(label_name(label), values, tokens)
    tables = counts.transpose(1, 0, 2)  # [L, V, E]
    out = nmi_tables(tables, n_shuffles, seed)
    df = pd.DataFrame({"layer": list(first.layers), **out})
    if n_boot:
        bt = boot.transpose(1, 2, 0, 3)  # [B, L, V, E]
        nmi_b = safe_div(mutual_information(bt), entropy(bt.sum(axis=3), axis=-1))
        df["ci_low"], df["ci_high"] = quantiles(nmi_b, ci)
    return df


# ---------------------------------------------------------------------------------------------- tokens
def _target_tokens(chunk: RoutingTrace, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(token id per routed token ``[tokens]``, valid mask): the token itself or the next token of its doc."""
    if target == "input":
        tok = chunk.token_ids
        return tok, tok >= 0
    if target == "next":
        tok = np.full(chunk.num_tokens, -1, dtype=np.int32)
        same = (chunk.doc_ids[1:] == chunk.doc_ids[:-1]) & (chunk.positions[1:] == chunk.positions[:-1] + 1)
        tok[:-1] = np.where(same, chunk.token_ids[1:], -1)
        return tok, tok >= 0
    tok = np.asarray(chunk.label(target)).astype(np.int64)
    return tok, tok >= 0


def _token_expert_table(trace: TraceSource, k: int | None, target: str, layers: Sequence[int] | None = None
                        ) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray], RoutingTrace]:
    """Sparse counts per layer: ``[(keys, counts)]`` with key = token_id * E + expert, plus token occurrences.

    Streams; memory grows with the distinct (token, expert) pairs, not with tokens.
    """

    def init(chunk: RoutingTrace) -> dict:
        return {"parts": [[] for _ in range(chunk.num_layers)], "occ": []}

    def update(state: dict, chunk: RoutingTrace) -> None:
        e = chunk.num_experts
        tok, valid = _target_tokens(chunk, target)
        codes, uniq = factorize(np.where(valid, tok, -1))
        ids = topk_ids(chunk, k)
        state["occ"].append((uniq, np.bincount(codes, minlength=len(uniq))))
        for li in range(chunk.num_layers):  # a loop over layers; tokens are vectorised
            ex = ids[:, li, :].astype(np.intp)
            ok = (ex >= 0) & valid[:, None]
            key = codes[:, None] * e + ex
            cnt = np.bincount(key[ok], minlength=len(uniq) * e)
            nz = np.flatnonzero(cnt)
            state["parts"][li].append((uniq[nz // e].astype(np.int64) * e + nz % e, cnt[nz]))

    label_target = None if target in ("input", "next") else target
    state, first = fold(trace, init, update, layers=layers, columns=needs(label_target, weights=k is not None, tokens=True))
    tables = [_merge(parts) for parts in state["parts"]]
    occ_keys, occ_counts = _merge([(u.astype(np.int64), c) for u, c in state["occ"]])
    keep = occ_keys >= 0
    return tables, (occ_keys[keep], occ_counts[keep]), first


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        keys, counts = parts[0]
        order = np.argsort(keys, kind="stable")
        return keys[order], counts[order].astype(np.int64)
    keys = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)


#: ``vocabulary_specialization`` presets: the keyword defaults each one sets.
VOCABULARY_PRESETS: dict[str, dict[str, Any]] = {"default": {"min_count": 10}, "olmoe": {"min_count": 1}}


def vocabulary_specialization(
    trace: TraceSource,
    *,
    k: int = 1,
    min_count: int | None = None,
    target: str = "input",
    per_token: bool = False,
    n_sim: int = 20,
    seed: int = 0,
    preset: Literal["default", "olmoe"] = "default",
) -> pd.DataFrame:
    """OLMoE vocabulary specialization: how consistently a token id goes to one expert.

    For each token id with at least ``min_count`` occurrences, specialization = (occurrences routed to its most
    frequent expert among the first ``k`` slots by weight) / occurrences (Muennighoff et al. 2024, Fig. 24-25;
    ``scripts/run_moe_analysis.py``). ``target="input"`` uses the token itself, ``"next"`` the gold next token
    of the same document, or the name of a label holding token ids (e.g. predicted next tokens).

    Two definitions are in use: ``preset="default"`` keeps token ids seen at least 10 times (``min_count=10``,
    as OLMoE's ``do_token_analysis_experts`` and the per-expert lists do; a token id seen once always scores
    1.0, which would pull the mean up); ``preset="olmoe"`` keeps every token id (``min_count=1``), as OLMoE's
    per-layer figure function ``do_token_analysis_layers_experts`` does. The same routing gives clearly higher
    numbers under "olmoe" (rare token ids reach 1.0 by chance); compare with the paper's per-layer figures
    under "olmoe". An explicit ``min_count`` overrides the preset.

    Returns per layer: ``layer, token_ids, specialization`` (mean over token ids), ``uniform`` (k/E),
    ``floor`` (expected value if tokens were routed independently of their identity with the layer's measured
    expert frequencies: Monte Carlo with ``n_sim`` draws per distinct occurrence count; approximate for k > 1).
    ``per_token=True`` returns ``layer, token_id, occurrences, top_expert, specialization`` instead.
    """
    if preset not in VOCABULARY_PRESETS:
        raise MetricError(f"preset must be one of {sorted(VOCABULARY_PRESETS)}, got {preset!r}.")
    if min_count is None:
        min_count = int(VOCABULARY_PRESETS[preset]["min_count"])
    if min_count < 1:
        raise MetricError(f"min_count must be at least 1, got {min_count}.")
    tables, (occ_keys, occ_counts), first = _token_expert_table(trace, k, target)
    e = first.num_experts
    kk = min(k, first.top_k)
    rows = []
    per_token_frames = []
    rng = np.random.default_rng(seed)
    for li, (keys, counts) in enumerate(tables):
        token = keys // e
        expert = keys % e
        # per token (keys are sorted by token, then expert): the largest count and its first expert
        starts = np.flatnonzero(np.r_[True, token[1:] != token[:-1]]) if len(token) else np.zeros(0, np.intp)
        top_tok = token[starts]
        top_cnt = np.maximum.reduceat(counts, starts) if len(starts) else counts[:0]
        group = np.cumsum(np.r_[False, token[1:] != token[:-1]]) if len(token) else np.zeros(0, np.intp)
        at_max = np.flatnonzero(counts == top_cnt[group])
        first_at_max = at_max[np.r_[True, group[at_max][1:] != group[at_max][:-1]]] if len(at_max) else at_max
        top_exp = expert[first_at_max]
        pos = np.searchsorted(occ_keys, top_tok)
        occ = occ_counts[np.clip(pos, 0, max(len(occ_keys) - 1, 0))] if len(occ_keys) else np.zeros(0, np.int64)
        keep = occ >= min_count
        spec = top_cnt[keep] / occ[keep]
        layer = first.layers[li]
        if per_token:
            per_token_frames.append(pd.DataFrame({
                "layer": layer, "token_id": top_tok[keep], "occurrences": occ[keep], "top_expert": top_exp[keep],
                "specialization": spec}))
            continue
        # independence floor from the layer's expert frequencies
        freq = np.bincount(expert, weights=counts, minlength=e)
        p = freq / freq.sum() if freq.sum() else np.full(e, 1.0 / e)
        floor = np.nan
        if keep.any() and n_sim > 0:
            uniq_n, inv = np.unique(occ[keep], return_inverse=True)
            exp_max = np.array([rng.multinomial(int(n) * kk, p, size=n_sim).max(axis=1).mean() / n
                                for n in uniq_n])  # a loop over distinct occurrence counts
            floor = float(np.minimum(exp_max, 1.0)[inv].mean())
        rows.append({"layer": layer, "token_ids": int(keep.sum()),
                     "specialization": float(spec.mean()) if keep.any() else np.nan,
                     "uniform": kk / e, "floor": floor})
    if per_token:
        return pd.concat(per_token_frames, ignore_index=True)
    return pd.DataFrame(rows)


def _decoder(tokens: Any) -> Callable[[int], str]:
    """A token-id -> string function from a tokenizer, a mapping, a vocabulary list or a function."""
    if tokens is None:
        return lambda i: ""
    if hasattr(tokens, "decode"):
        return lambda i: tokens.decode([int(i)])
    if hasattr(tokens, "convert_ids_to_tokens"):
        return lambda i: tokens.convert_ids_to_tokens(int(i))
    if isinstance(tokens, Mapping):
        return lambda i: str(tokens.get(int(i), ""))
    if callable(tokens):
        return lambda i: str(tokens(int(i)))
    if isinstance(tokens, Sequence):
        return lambda i: str(tokens[int(i)]) if 0 <= int(i) < len(tokens) else ""
    raise MetricError(
        "tokens must be a tokenizer (with decode), a {token_id: string} mapping, a vocabulary list or a function; "
        f"got {type(tokens).__name__}."
    )


def top_tokens(
    trace: TraceSource,
    *,
    n: int = 10,
    k: int | None = None,
    layers: Sequence[int] | None = None,
    tokens: Any = None,
    min_count: int = 1,
) -> pd.DataFrame:
    """The ``n`` most frequent token ids of each expert, per layer (OLMoE ``eid2token``).

    Columns: ``layer, expert, rank, token_id, count, expert_share`` (count / the expert's slots),
    ``token_share`` (count / occurrences of the token: how much of this token the expert takes), ``lift``
    (expert_share / the token's share of all tokens) and, when ``tokens`` (a tokenizer, mapping, vocabulary list
    or function) is given, ``token`` (the decoded string). Counts all k slots unless ``k`` is given.
    Baseline: with identity-blind routing, lift is 1.
    """
    tables, (occ_keys, occ_counts), first = _token_expert_table(trace, k, "input", layers=layers)
    e = first.num_experts
    total_occ = occ_counts.sum()
    frames = []
    for li, (keys, counts) in enumerate(tables):
        token = keys // e
        expert = keys % e
        occ = occ_counts[np.searchsorted(occ_keys, token)] if len(keys) else np.zeros(0, np.int64)
        ok = occ >= min_count
        token, expert, counts, occ = token[ok], expert[ok], counts[ok], occ[ok]
        order = np.lexsort((token, -counts, expert))
        ex_sorted = expert[order]
        start = np.r_[True, ex_sorted[1:] != ex_sorted[:-1]] if len(order) else np.zeros(0, bool)
        first_idx = np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
        rank = np.arange(len(order)) - first_idx
        sel = order[rank < n]
        expert_total = np.bincount(expert, weights=counts, minlength=e)
        frames.append(pd.DataFrame({
            "layer": first.layers[li],
            "expert": expert[sel],
            "rank": rank[rank < n],
            "token_id": token[sel],
            "count": counts[sel],
            "expert_share": safe_div(counts[sel], expert_total[expert[sel]]),
            "token_share": safe_div(counts[sel], occ[sel]),
            "lift": safe_div(safe_div(counts[sel], expert_total[expert[sel]]), occ[sel] / total_occ),
        }))
    df = pd.concat(frames, ignore_index=True)
    if tokens is not None:
        decode = _decoder(tokens)
        strings = {int(t): decode(int(t)) for t in np.unique(df["token_id"].to_numpy())}
        df["token"] = df["token_id"].map(strings)
    return df


# ---------------------------------------------------------------------------------------------- token types
TOKEN_TYPES = ("digit", "punctuation", "whitespace", "latin", "cjk", "other_script", "other")
_CJK_PREFIXES = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC", "HALFWIDTH KATAKANA", "BOPOMOFO")
_SPACE_MARKERS = {"\u0120": " ", "\u2581": " ", "\u010a": "\n", "\u0109": "\t"}


def token_type(text: str) -> str:
    """Category of a token string: digit, punctuation, whitespace, latin, cjk, other_script or other.

    Byte-level BPE and SentencePiece space markers (Ġ, ▁, Ċ) count as whitespace. A token with letters goes by
    script (CJK if any CJK character, Latin if every letter is Latin, else other_script); digits-only ->
    digit; punctuation or symbols only -> punctuation; partial UTF-8 bytes ("\\ufffd") and mixes -> other.
    """
    s = "".join(_SPACE_MARKERS.get(c, c) for c in text)
    if not s:
        return "other"
    t = s.strip()
    if not t:
        return "whitespace"
    if "\ufffd" in t:
        return "other"
    letters = [c for c in t if c.isalpha()]
    if letters:
        if any(unicodedata.name(c, "").startswith(_CJK_PREFIXES) for c in letters):
            return "cjk"
        if all(unicodedata.name(c, "").startswith("LATIN") for c in letters):
            return "latin"
        return "other_script"
    if all(unicodedata.category(c) == "Nd" for c in t):
        return "digit"
    if all(unicodedata.category(c)[0] in "PS" for c in t):
        return "punctuation"
    return "other"


def token_type_label(tokens: Any) -> Callable[[RoutingTrace], np.ndarray]:
    """A label function (``[tokens]`` token type of each token) usable by every label-taking metric.

    ``tokens``: a tokenizer (``decode``), a {token_id: string} mapping, a vocabulary list or a function.
    Each distinct token id is decoded once (a loop over the vocabulary seen, not over tokens).
    """
    decode = _decoder(tokens)
    cache: dict[int, str] = {}

    def label(chunk: RoutingTrace) -> np.ndarray:
        codes, uniq = factorize(chunk.token_ids)
        types = np.array([cache.setdefault(int(t), token_type(decode(int(t))) if t >= 0 else "other")
                          for t in uniq.tolist()], dtype=object)
        return types[codes].astype(str)

    label.label_name = "token_type"  # type: ignore[attr-defined]
    return label


def token_type_specialization(trace: TraceSource, tokens: Any, *, top1: bool = False) -> pd.DataFrame:
    """Expert usage per token type (digits, punctuation, whitespace, Latin, CJK, other scripts, other).

    ``tokens``: a tokenizer, a {token_id: string} mapping, a vocabulary list or a function. Columns as in
    ``label_usage`` with ``token_type`` as the label column (``lift`` > 1: the expert prefers that type), plus
    per (token_type, layer) ``nmi`` context via ``label_nmi(trace, token_type_label(tokens))``.
    Baseline: type-blind routing gives lift 1.
    """
    return label_usage(trace, token_type_label(tokens), top1=top1)


# ---------------------------------------------------------------------------------------------- probe
def label_probe(
    trace: TraceSource,
    label: Label,
    *,
    layers: Sequence[int] | None = None,
    features: Literal["topk", "top1"] = "topk",
    max_tokens: int | None = 200_000,
    test_size: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
) -> pd.DataFrame:
    """Per-layer logistic-regression probe predicting a label from the experts a token chose (scikit-learn).

    Features per token: multi-hot of its top-k experts (``features="topk"``) or one-hot of the top-1. Train and
    test are split by document (no document on both sides) when there are enough documents, else by token.
    Columns: ``layer, accuracy, balanced_accuracy, chance`` (accuracy of always predicting the training majority
    class), ``chance_balanced`` (1 / classes), ``n_train, n_test, classes``.
    Reads the whole trace into memory (subsampled to ``max_tokens`` tokens, whole documents kept together
    where possible).
    """
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

    if features not in ("topk", "top1"):
        raise MetricError(f"features must be 'topk' or 'top1', got {features!r}.")
    t = read_all(trace)
    y_all = label_of(t, label)
    _, counts = np.unique(y_all, return_counts=True)
    warn_small(label_name(label), np.unique(y_all), counts)
    rng = np.random.default_rng(seed)
    idx = np.arange(t.num_tokens)
    if max_tokens is not None and t.num_tokens > max_tokens:
        docs = np.unique(t.doc_ids)
        rng.shuffle(docs)
        sizes = pd.Series(t.doc_ids).value_counts()
        keep_docs = docs[np.cumsum(sizes.loc[docs].to_numpy()) <= max_tokens]
        if len(keep_docs) >= 4:
            idx = np.flatnonzero(np.isin(t.doc_ids, keep_docs))
        else:
            idx = np.sort(rng.choice(t.num_tokens, size=max_tokens, replace=False))
    y = y_all[idx]
    groups = t.doc_ids[idx]
    classes = np.unique(y)
    if len(classes) < 2:
        raise MetricError(f"label {label_name(label)!r} has a single value here; a probe needs at least two.")
    by_doc = len(np.unique(groups)) >= 4
    splitter = GroupShuffleSplit if by_doc else ShuffleSplit
    train, test = next(splitter(n_splits=1, test_size=test_size, random_state=seed).split(idx, y, groups))
    if len(np.unique(y[train])) < 2:
        train, test = next(ShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(idx))
    majority = pd.Series(y[train]).value_counts().index[0]
    chance = float(np.mean(y[test] == majority))
    ids = top1(t)[idx][:, :, None] if features == "top1" else t.expert_ids[idx]
    e = t.num_experts
    rows = []
    lidx = range(t.num_layers) if layers is None else [t.layer_index(x) for x in layers]
    for li in lidx:
        ex = ids[:, li, :]
        r, s = np.nonzero(ex >= 0)
        x = sparse.csr_matrix((np.ones(len(r)), (r, ex[r, s])), shape=(len(idx), e))
        model = LogisticRegression(C=C, max_iter=1000)
        model.fit(x[train], y[train])
        pred = model.predict(x[test])
        rows.append({
            "layer": t.layers[li],
            "accuracy": float(np.mean(pred == y[test])),
            "balanced_accuracy": float(balanced_accuracy_score(y[test], pred)),
            "chance": chance,
            "chance_balanced": 1.0 / len(classes),
            "n_train": len(train),
            "n_test": len(test),
            "classes": len(classes),
        })
    return pd.DataFrame(rows)


# co-activation moved to its own module; its names stay importable from here
from .coactivation import (  # noqa: E402
    coactivation,
    coactivation_matrices,
    coactivation_random,
    coactivation_summary,
)
