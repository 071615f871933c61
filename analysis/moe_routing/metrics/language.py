"""Per-language routing: divergence between languages, divergence to a reference over depth, shared experts.

References: Bandarkar et al. 2025, "Multilingual Routing in Mixture-of-Experts" (per-sequence routing
distributions, entropy-normalised Jensen-Shannon divergence to English over depth, language-specific vs shared
experts).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pandas as pd

from ..errors import MetricError
from ..trace import RoutingTrace
from ._common import (
    GroupedAccumulator,
    Label,
    TraceSource,
    entropy,
    factorize,
    fold,
    grouped_counts_boot,
    js_divergence,
    label_name,
    label_of,
    permutation_tables,
    quantiles,
    safe_div,
    token_blocks,
    warn_small,
)
from .load import usage_counts

__all__ = ["language_divergence", "language_experts", "reference_divergence", "top_expert_overlap"]


def language_divergence(
    trace: TraceSource,
    label: Label = "lang",
    *,
    top1: bool = False,
    k: int | None = None,
    n_boot: int = 100,
    n_shuffles: int = 5,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Jensen-Shannon divergence between the expert-usage distributions of every pair of languages, per layer.

    Columns: ``layer, a, b`` (label values, a < b), ``js`` (JS divergence in bits, in [0, 1]; the square of
    ``scipy.spatial.distance.jensenshannon(p, q, base=2)``), ``floor`` (the same after shuffling the label
    between the two languages' routing slots, from the margins: the divergence finite samples show without any
    language effect; exact per token with ``top1=True``), ``ci_low, ci_high`` (Poisson bootstrap over
    documents, ``n_boot`` replicates; memory values x n_boot x layers x experts x 8 bytes).
    """
    values, counts, boot, tokens, first = grouped_counts_boot(trace, label, k=k, top1=top1, n_boot=n_boot, seed=seed)
    warn_small(label_name(label), values, tokens)
    if len(values) < 2:
        raise MetricError(f"label {label_name(label)!r} has a single value here; a divergence needs two.")
    rng = np.random.default_rng(seed)
    rows = []
    for i, j in itertools.combinations(range(len(values)), 2):  # a loop over pairs of languages
        js = js_divergence(counts[i], counts[j])  # [L]
        lo, hi = quantiles(js_divergence(boot[i], boot[j]), ci) if n_boot else (np.nan * js, np.nan * js)
        floor = np.full(len(js), np.nan)
        if n_shuffles:
            draws = np.zeros((n_shuffles, len(js)))
            for s in range(n_shuffles):
                for li in range(len(js)):
                    t = permutation_tables(np.stack([counts[i, li], counts[j, li]]).astype(np.int64), rng)
                    draws[s, li] = js_divergence(t[0], t[1])
            floor = draws.mean(axis=0)
        for li, layer in enumerate(first.layers):
            rows.append({"layer": layer, "a": values[i], "b": values[j], "js": js[li], "floor": floor[li],
                         "ci_low": lo[li], "ci_high": hi[li]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- Bandarkar
def _unit_distributions(chunk: RoutingTrace, source: str, codes: np.ndarray, n_units: int) -> np.ndarray:
    """float64 ``[units, layers, E]``: per unit (document x label), the summed routing distribution of its tokens."""
    n_layers, e = chunk.num_layers, chunk.num_experts
    out = np.zeros((n_units, n_layers * e))
    if source == "logits":
        logits = chunk.router_logits
        assert logits is not None
        for sl in token_blocks(chunk.num_tokens, n_layers * e, 1 << 20):
            # columns past num_experts are no experts (zaya's skip class): the softmax over the experts is the
            # router's distribution given the token is routed, as the "weights" and "counts" sources see it;
            # NaN pads a layer narrower than the widest (probability 0)
            x = np.nan_to_num(logits[sl, :, :e].astype(np.float64), nan=-np.inf)
            x -= x.max(axis=2, keepdims=True)
            np.exp(x, out=x)
            x /= x.sum(axis=2, keepdims=True)
            # units are factorized, so a sparse one-hot keeps this a single product
            from scipy import sparse

            c = codes[sl]
            onehot = sparse.csr_matrix((np.ones(len(c)), (c, np.arange(len(c)))), shape=(n_units, len(c)))
            out += onehot @ x.reshape(len(c), n_layers * e)
        return out.reshape(n_units, n_layers, e)
    ids = chunk.expert_ids.astype(np.intp)
    if source == "weights":
        w = np.where(ids >= 0, np.nan_to_num(chunk.weights), 0.0).astype(np.float64)
        w = w / np.where(w.sum(axis=2, keepdims=True) > 0, w.sum(axis=2, keepdims=True), 1.0)
    else:  # counts: each routed slot weighs 1 / (routed slots of the token at that layer)
        routed = (ids >= 0).sum(axis=2, keepdims=True)
        w = np.where(ids >= 0, 1.0 / np.maximum(routed, 1), 0.0)
    cell = (codes[:, None, None] * n_layers + np.arange(n_layers)[None, :, None]) * e + np.maximum(ids, 0)
    ok = ids >= 0
    out = np.bincount(cell[ok], weights=w[ok], minlength=n_units * n_layers * e)
    return out.reshape(n_units, n_layers, e)


def _choose_source(chunk: RoutingTrace, source: str) -> str:
    if source == "auto":
        if chunk.router_logits is not None:
            return "logits"
        return "weights" if chunk.has_weights else "counts"
    if source == "logits" and chunk.router_logits is None:
        raise MetricError("source='logits' needs router logits, but this trace has none: capture with logits=True "
                          "or use source='weights' / 'counts'.")
    if source == "weights" and not chunk.has_weights:
        raise MetricError("source='weights' needs routing weights, but this import has no weights (ids only); use "
                          "source='counts'.")
    if source not in ("logits", "weights", "counts"):
        raise MetricError(f"source must be 'auto', 'logits', 'weights' or 'counts', got {source!r}.")
    return source


def _normalised(js: np.ndarray, hp: np.ndarray, hq: np.ndarray, normalize: str) -> np.ndarray:
    if normalize == "none":
        return js
    if normalize == "entropy":
        return safe_div(js, (hp + hq) / 2)
    raise MetricError(f"normalize must be 'entropy' or 'none', got {normalize!r}.")


def reference_divergence(
    trace: TraceSource,
    label: Label = "lang",
    reference: Any = "en",
    *,
    pair_label: str | None = None,
    source: str = "auto",
    normalize: str = "entropy",
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Routing divergence of each language to a reference language over depth (Bandarkar et al. 2025).

    Per sequence (document) and layer, the routing distribution q = mean over its tokens of the router's
    post-softmax distribution (``source="logits"``; ``"weights"``: the recorded top-k weights renormalised;
    ``"counts"``: k-hot / k; ``"auto"`` picks the first available). With ``pair_label`` (a label naming the
    parallel sentence, e.g. a FLORES sentence id), each document is compared with the reference document of the
    same pair and the divergences are averaged; without it, each language's mean distribution is compared with
    the reference's. Divergence = JS(q, q_ref) in bits divided by the mean entropy (bits) of q and q_ref
    (``normalize="entropy"``; ``"none"``: plain JS). Router-logit columns past ``num_experts`` (zaya's skip
    class) are left out: the distribution is over the experts, given the token is routed. The paper's exact
    normaliser could not be checked here: compare magnitudes across models with care; shapes over depth
    (U-shaped, lowest in middle layers) compare.

    Columns: ``<label>, layer, divergence, js, entropy_norm`` (mean normalised entropy H(q)/log E of the
    language's documents), ``ci_low, ci_high`` (bootstrap over pairs, or Poisson bootstrap over documents),
    ``n`` (pairs or documents). The reference's own row has divergence 0.
    Two passes over a trace directory when ``pair_label`` is given (memory: the reference's documents).
    """
    name = label_name(label)
    if pair_label is None:
        return _reference_by_language(trace, label, reference, source, normalize, n_boot, ci, seed, name)

    def collect_ref_init(chunk: RoutingTrace) -> dict:
        return {"acc": GroupedAccumulator((chunk.num_layers, chunk.num_experts), np.float64)}

    def collect_ref(state: dict, chunk: RoutingTrace) -> None:
        src = _choose_source(chunk, source)
        lab = label_of(chunk, label)
        mask = lab == reference
        if not mask.any():
            return
        sub = chunk.select(mask)
        codes, pairs = factorize(sub.label(pair_label))
        dist = _unit_distributions(sub, src, codes, len(pairs))
        n = np.bincount(codes, minlength=len(pairs)).astype(np.float64)
        state["acc"].add(pairs, dist / n[:, None, None])

    ref_state, first = fold(trace, collect_ref_init, collect_ref)
    ref_pairs, ref_q = ref_state["acc"].result()
    if len(ref_pairs) == 0:
        raise MetricError(f"no token has {name} == {reference!r}: the reference language is missing.")
    ref_q = ref_q / ref_q.sum(axis=2, keepdims=True)
    ref_index = {v: i for i, v in enumerate(ref_pairs.tolist())}
    e = first.num_experts

    def init(chunk: RoutingTrace) -> dict:
        return {"div": {}, "js": {}, "ent": {}}

    def update(state: dict, chunk: RoutingTrace) -> None:
        src = _choose_source(chunk, source)
        lab = label_of(chunk, label)
        unit_codes, units = factorize(_pair_units(lab, chunk.doc_ids))
        dist = _unit_distributions(chunk, src, unit_codes, len(units))
        n = np.bincount(unit_codes, minlength=len(units)).astype(np.float64)
        q = dist / n[:, None, None]
        first_tok = np.zeros(len(units), dtype=np.intp)
        first_tok[unit_codes[::-1]] = np.arange(chunk.num_tokens)[::-1]
        unit_lab = lab[first_tok]
        unit_pair = chunk.label(pair_label)[first_tok]
        ridx = np.array([ref_index.get(p, -1) for p in unit_pair.tolist()], dtype=np.intp)
        ok = ridx >= 0
        if not ok.any():
            return
        qr = ref_q[ridx[ok]]
        qq = q[ok]
        js = js_divergence(qq, qr)  # [units, L]
        hq, hr = entropy(qq) / math.log(2), entropy(qr) / math.log(2)
        div = _normalised(js, hq, hr, normalize)
        for v, d, j, h in zip(unit_lab[ok].tolist(), div, js, entropy(qq) / math.log(e), strict=True):
            state["div"].setdefault(v, []).append(d)
            state["js"].setdefault(v, []).append(j)
            state["ent"].setdefault(v, []).append(h)

    state, _ = fold(trace, init, update)
    rng = np.random.default_rng(seed)
    rows = []
    for v in sorted(state["div"], key=str):
        div = np.asarray(state["div"][v])
        js = np.asarray(state["js"][v])
        ent = np.asarray(state["ent"][v])
        m = len(div)
        if n_boot and m > 1:
            idx = rng.integers(0, m, size=(n_boot, m))
            lo, hi = quantiles(div[idx].mean(axis=1), ci)
        else:
            lo = hi = np.full(div.shape[1], np.nan)
        for li, layer in enumerate(first.layers):
            rows.append({name: v, "layer": layer, "divergence": div[:, li].mean(), "js": js[:, li].mean(),
                         "entropy_norm": ent[:, li].mean(), "ci_low": lo[li], "ci_high": hi[li], "n": m})
    return pd.DataFrame(rows)


def _pair_units(lab: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    """One int64 key per (document, label value) unit."""
    lcodes, _ = factorize(lab)
    return doc_ids.astype(np.int64) * (int(lcodes.max()) + 1 if len(lcodes) else 1) + lcodes


def _reference_by_language(trace: TraceSource, label: Label, reference: Any, source: str, normalize: str,
                           n_boot: int, ci: float, seed: int, name: str) -> pd.DataFrame:
    from ._common import BootstrapCounts

    def init(chunk: RoutingTrace) -> dict:
        return {"acc": GroupedAccumulator((1 + n_boot, chunk.num_layers, chunk.num_experts), np.float64),
                "ent": GroupedAccumulator((2, chunk.num_layers), np.float64)}

    def update(state: dict, chunk: RoutingTrace) -> None:
        src = _choose_source(chunk, source)
        n_layers, e = chunk.num_layers, chunk.num_experts
        lab = label_of(chunk, label)
        unit_codes, _units = factorize(_pair_units(lab, chunk.doc_ids))
        n_units = int(unit_codes.max()) + 1
        dist = _unit_distributions(chunk, src, unit_codes, n_units)
        n = np.bincount(unit_codes, minlength=n_units).astype(np.float64)
        q = dist / n[:, None, None]  # per-document distributions [U, L, E]
        first_tok = np.zeros(n_units, dtype=np.intp)
        first_tok[unit_codes[::-1]] = np.arange(chunk.num_tokens)[::-1]
        lcodes, values = factorize(lab[first_tok])
        docs = chunk.doc_ids[first_tok]
        bc = BootstrapCounts(len(values) * n_layers * e, n_boot, seed)
        cells = (lcodes[:, None] * n_layers * e + np.arange(n_layers * e)[None, :]).ravel()
        bc.add(np.repeat(docs, n_layers * e), cells, q.reshape(n_units, -1).ravel())
        both = np.concatenate([bc.counts[None], bc.boot], axis=0).reshape(1 + n_boot, len(values), n_layers, e)
        state["acc"].add(values, both.transpose(1, 0, 2, 3))
        ent = entropy(q) / math.log(e)  # [U, L]
        ent_sum = np.zeros((len(values), 2, n_layers))
        np.add.at(ent_sum[:, 0], lcodes, ent)
        np.add.at(ent_sum[:, 1], lcodes, 1.0)
        state["ent"].add(values, ent_sum)

    state, first = fold(trace, init, update)
    values, acc = state["acc"].result()
    _, ent = state["ent"].result()
    where = [i for i, v in enumerate(values.tolist()) if v == reference]
    if not where:
        raise MetricError(f"no token has {name} == {reference!r}: the reference language is missing.")
    r = where[0]
    rows = []
    for i, v in enumerate(values.tolist()):
        js_all = js_divergence(acc[i], acc[r])  # [1 + B, L]
        h_i = entropy(acc[i]) / math.log(2)
        h_r = entropy(acc[r]) / math.log(2)
        div_all = _normalised(js_all, h_i, h_r, normalize)
        lo, hi = quantiles(div_all[1:], ci) if n_boot else (np.full(len(first.layers), np.nan),) * 2
        for li, layer in enumerate(first.layers):
            rows.append({name: v, "layer": layer, "divergence": div_all[0, li], "js": js_all[0, li],
                         "entropy_norm": ent[i, 0, li] / ent[i, 1, li], "ci_low": lo[li], "ci_high": hi[li],
                         "n": int(ent[i, 1, 0])})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- expert sets
def _expected_random_jaccard(e: int, n: int) -> float:
    """E[|A ∩ B| / |A ∪ B|] for independent uniformly random n-subsets of e experts (hypergeometric overlap)."""
    from scipy import stats

    x = np.arange(0, n + 1)
    pmf = stats.hypergeom.pmf(x, e, n, n)
    union = 2 * n - x
    return float(np.sum(pmf * np.where(union > 0, x / np.maximum(union, 1), 1.0)))


def top_expert_overlap(
    trace: TraceSource, label: Label = "lang", *, n: int | None = None, k: int | None = None
) -> pd.DataFrame:
    """Overlap of each pair of languages' ``n`` most used experts (default: top_k), per layer.

    Columns: ``layer, a, b, overlap`` (|A ∩ B| / n), ``jaccard`` (|A ∩ B| / |A ∪ B|), ``random_overlap`` (n / E)
    and ``random_jaccard`` (expected for random n-subsets): the baselines of language-blind routing.
    """
    counts = usage_counts(trace, label, k=k)
    values = counts.coords["value"].values
    warn_small(label_name(label), values, counts.attrs["tokens"])
    c = counts.values
    e = c.shape[2]
    nn = counts.attrs["top_k"] if n is None else n
    if not 1 <= nn <= e:
        raise MetricError(f"n must be between 1 and num_experts ({e}), got {n}.")
    order = np.argsort(-c, axis=2, kind="stable")[:, :, :nn]  # [V, L, n]
    member = np.zeros(c.shape, dtype=bool)
    np.put_along_axis(member, order, True, axis=2)
    rj = _expected_random_jaccard(e, nn)
    rows = []
    for i, j in itertools.combinations(range(len(values)), 2):
        inter = (member[i] & member[j]).sum(axis=1)
        union = (member[i] | member[j]).sum(axis=1)
        for li, layer in enumerate(counts.coords["layer"].values.tolist()):
            rows.append({"layer": layer, "a": values[i], "b": values[j], "overlap": inter[li] / nn,
                         "jaccard": inter[li] / union[li], "random_overlap": nn / e, "random_jaccard": rj})
    return pd.DataFrame(rows)


def language_experts(
    trace: TraceSource,
    label: Label = "lang",
    *,
    threshold: float = 0.1,
    shared_min: float | None = None,
    k: int | None = None,
) -> pd.DataFrame:
    """Language-specific and shared experts per layer, from frequency differences (Bandarkar et al. 2025).

    freq_l(e) = share of language l's tokens that have expert e among their top-k. Expert e is *specific* to l
    when freq_l(e) - max over other languages of freq(e) >= ``threshold``; *shared* when every language uses it
    at least ``shared_min`` (default: the uniform rate k/E) and max - min frequency < ``threshold``; else
    *other*. Columns: ``layer, expert, kind, <label>`` (the language, for specific experts), ``margin``
    (freq difference to the runner-up language), ``min_freq, max_freq``.
    Baseline: language-blind routing gives no specific expert beyond sampling noise.
    """
    counts = usage_counts(trace, label, k=k)
    values = counts.coords["value"].values
    warn_small(label_name(label), values, counts.attrs["tokens"])
    if len(values) < 2:
        raise MetricError(f"label {label_name(label)!r} has a single value here; comparing languages needs two.")
    tokens = np.asarray(counts.attrs["tokens"], dtype=np.float64)
    freq = counts.values / tokens[:, None, None]  # [V, L, E]
    e = freq.shape[2]
    smin = counts.attrs["top_k"] / e if shared_min is None else shared_min
    order = np.sort(freq, axis=0)
    top, runner, low = order[-1], order[-2], order[0]
    best = np.argmax(freq, axis=0)
    margin = top - runner
    kind = np.where(margin >= threshold, "specific",
                    np.where((low >= smin) & (top - low < threshold), "shared", "other"))
    n_layers = freq.shape[1]
    name = label_name(label)
    df = pd.DataFrame({
        "layer": np.repeat(counts.coords["layer"].values, e),
        "expert": np.tile(np.arange(e), n_layers),
        "kind": kind.ravel(),
        name: np.where(kind == "specific", values[best].astype(object), None).ravel(),
        "margin": margin.ravel(),
        "min_freq": low.ravel(),
        "max_freq": top.ravel(),
    })
    return df

