"""Per-language routing: divergence between languages, divergence to a reference over depth, shared experts.

References: Bandarkar et al. 2025, "Multilingual Routing in Mixture-of-Experts" (per-sequence routing
distributions, entropy-normalised Jensen-Shannon divergence to English over depth, language-specific vs shared
experts).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import MetricError
from ..trace import RoutingTrace
from ._bootstrap import grouped_counts_boot, poisson_weights, quantiles
from ._counts import GroupedAccumulator, factorize, warn_small
from ._source import Label, TraceSource, chunks, fold, label_name, label_of, needs, token_blocks
from ._stats import entropy, js_divergence, js_floor, safe_div, softmax
from .load import usage_counts

DistributionSource = Literal["auto", "logits", "weights", "counts"]
Normalize = Literal["entropy", "none"]
ExpertVariable = Literal["top1", "slot0", "set"]

#: A coloured cell built from fewer routing slots than this is marked ``too_few`` (plots can mask it).
MIN_CELL_SLOTS = 20

__all__ = ["conditional_label_mi", "language_divergence", "language_experts", "language_usage", "reference_divergence",
           "top_expert_overlap"]


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
    min_count: int = MIN_CELL_SLOTS,
) -> pd.DataFrame:
    """Jensen-Shannon divergence between the expert-usage distributions of every pair of languages, per layer.

    Columns: ``layer, a, b`` (label values, a < b), ``js`` (JS divergence in bits, in [0, 1]; the square of
    ``scipy.spatial.distance.jensenshannon(p, q, base=2)``), ``floor`` (the same after shuffling the label
    between the two languages' routing slots, from the margins: the divergence finite samples show without any
    language effect; exact per token with ``top1=True``), ``ci_low, ci_high`` (Poisson bootstrap over
    documents, ``n_boot`` replicates; memory values x n_boot x layers x experts x 8 bytes), ``slots_a, slots_b``
    (routing slots of each language in the layer), ``tokens_a, tokens_b``, ``too_few`` (either language has
    fewer than ``min_count`` slots: mask the cell, its divergence is mostly sampling noise), ``excess`` = js -
    floor (the divergence beyond what finite samples show: the number to compare across cells),
    ``js_corrected`` = max(0, js - bias) with bias = mean of the bootstrap replicates - js.

    The interval is for the true divergence: a plug-in JS is biased upward (noise only adds divergence), and a
    resample adds the same bias again, so the plain percentile interval sits above the estimate and misses a
    true divergence of 0 almost always. ``ci_low, ci_high`` are percentiles of the replicates shifted by twice
    the estimated bias (clipped at 0): centred on ``js_corrected``, calibrated on synthetic traces of known
    divergence (tests/metrics/test_language.py). The plain percentile interval (what ``ci_low, ci_high`` held
    before) is kept as ``ci_low_percentile, ci_high_percentile``; it contains ``js``.
    """
    values, counts, boot, tokens, first = grouped_counts_boot(trace, label, k=k, top1=top1, n_boot=n_boot, seed=seed)
    warn_small(label_name(label), values, tokens)
    if len(values) < 2:
        raise MetricError(f"label {label_name(label)!r} has a single value here; a divergence needs two.")
    rng = np.random.default_rng(seed)
    ii, jj = np.triu_indices(len(values), 1)  # every pair a < b, in the order itertools.combinations gives
    n_layers, e = counts.shape[1:]
    n_pairs = len(ii)
    js = np.empty((n_pairs, n_layers))
    lo = np.full((n_pairs, n_layers), np.nan)
    hi = np.full((n_pairs, n_layers), np.nan)
    floor = np.full((n_pairs, n_layers), np.nan)
    lo_p, hi_p, bias = (np.full((n_pairs, n_layers), np.nan) for _ in range(3))
    # pairs in blocks: temporaries of about 2**22 cells whatever the number of languages (vectorised over pairs)
    per_pair = n_layers * e * max(1, n_boot)
    step = max(1, (1 << 22) // per_pair)
    for start in range(0, n_pairs, step):
        a, b = ii[start:start + step], jj[start:start + step]
        js[start:start + step] = js_divergence(counts[a], counts[b])
        if n_boot:
            reps = js_divergence(boot[a], boot[b]).transpose(1, 0, 2)  # [B, pairs, L]
            lo_p[start:start + step], hi_p[start:start + step] = quantiles(reps, ci)
            # a resample adds sampling noise, and noise only raises a JS: the replicates sit above the estimate
            # by about its own plug-in bias. Shift them by twice the estimated bias: centred on the corrected value
            bias[start:start + step] = np.nanmean(reps, axis=0) - js[start:start + step]
            lo_b, hi_b = quantiles(reps - 2 * bias[start:start + step][None], ci)
            lo[start:start + step], hi[start:start + step] = np.maximum(lo_b, 0.0), np.maximum(hi_b, 0.0)
        for pi in range(start, min(start + step, n_pairs)) if n_shuffles else ():  # pairs in order: one rng stream
            floor[pi] = js_floor(counts[ii[pi]], counts[jj[pi]], n_shuffles, rng)
    slots = counts.sum(axis=2)  # [V, L]
    return pd.DataFrame({
        "layer": np.tile(np.asarray(first.layers), n_pairs),
        "a": np.repeat(values[ii], n_layers),
        "b": np.repeat(values[jj], n_layers),
        "js": js.ravel(),
        "floor": floor.ravel(),
        "ci_low": lo.ravel(),
        "ci_high": hi.ravel(),
        "slots_a": slots[ii].ravel().astype(np.int64),
        "slots_b": slots[jj].ravel().astype(np.int64),
        "tokens_a": np.repeat(np.asarray(tokens)[ii], n_layers).astype(np.int64),
        "tokens_b": np.repeat(np.asarray(tokens)[jj], n_layers).astype(np.int64),
        "too_few": (np.minimum(slots[ii], slots[jj]) < min_count).ravel(),
        "excess": (js - floor).ravel(),
        "js_corrected": np.maximum(js - bias, 0.0).ravel(),
        "ci_low_percentile": lo_p.ravel(),
        "ci_high_percentile": hi_p.ravel(),
    })


# ---------------------------------------------------------------------------------------------- Bandarkar
def _unit_distributions(chunk: RoutingTrace, source: str, codes: np.ndarray, n_units: int) -> np.ndarray:
    """float64 ``[units, layers, E]``: per unit (document x label), the summed routing distribution of its tokens.

    Block by block over tokens (``token_blocks``): temporaries stay bounded whatever the chunk's size.
    """
    n_layers, e = chunk.num_layers, chunk.num_experts
    out = np.zeros(n_units * n_layers * e)
    if source == "logits":
        from scipy import sparse

        logits = chunk.router_logits
        assert logits is not None
        for sl in token_blocks(chunk.num_tokens, n_layers * e, 1 << 20):
            # columns past num_experts are no experts (zaya's skip class): the softmax over the experts is the
            # router's distribution given the token is routed, as the "weights" and "counts" sources see it;
            # NaN pads a layer narrower than the widest (probability 0)
            x = softmax(logits[sl, :, :e])
            c = codes[sl]
            # units are factorized, so a sparse one-hot keeps this a single product
            onehot = sparse.csr_matrix((np.ones(len(c)), (c, np.arange(len(c)))), shape=(n_units, len(c)))
            out += (onehot @ x.reshape(len(c), n_layers * e)).ravel()
        return out.reshape(n_units, n_layers, e)
    k = chunk.top_k
    layer_cell = (np.arange(n_layers, dtype=np.intp) * e)[None, :, None]
    for sl in token_blocks(chunk.num_tokens, n_layers * k, n_units * n_layers * e):
        ids = chunk.expert_ids[sl].astype(np.intp)
        ok = ids >= 0
        if source == "weights":
            w = np.where(ok, np.nan_to_num(chunk.weights[sl]), 0.0).astype(np.float64)
            total = w.sum(axis=2, keepdims=True)
            w = w / np.where(total > 0, total, 1.0)
        else:  # counts: each routed slot weighs 1 / (routed slots of the token at that layer)
            routed = ok.sum(axis=2, keepdims=True)
            w = np.where(ok, 1.0 / np.maximum(routed, 1), 0.0)
        cell = (codes[sl] * (n_layers * e))[:, None, None] + layer_cell + np.maximum(ids, 0)
        out += np.bincount(cell[ok], weights=w[ok], minlength=n_units * n_layers * e)
    return out.reshape(n_units, n_layers, e)


def _reference_columns(label: Label, pair_label: str | None, source: str) -> frozenset[str] | None:
    """What ``reference_divergence`` reads: the labels, and weights / logits as ``source`` may use them."""
    return needs(label, pair_label, weights=source in ("auto", "weights"), logits=source in ("auto", "logits"))


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


def _normalised(js: np.ndarray, hp: np.ndarray, hq: np.ndarray, normalize: Normalize) -> np.ndarray:
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
    source: DistributionSource = "auto",
    normalize: Normalize = "entropy",
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

    cols = _reference_columns(label, pair_label, source)
    ref_state, first = fold(trace, collect_ref_init, collect_ref, columns=cols)
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

    state, _ = fold(trace, init, update, columns=cols)
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


def _reference_by_language(trace: TraceSource, label: Label, reference: Any, source: DistributionSource, normalize: Normalize,
                           n_boot: int, ci: float, seed: int, name: str) -> pd.DataFrame:
    from ._bootstrap import BootstrapCounts

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

    state, first = fold(trace, init, update, columns=_reference_columns(label, None, source))
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


def _boot_tokens(trace: TraceSource, label: Label, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [V], float64 [V, n_boot]): tokens per label value in each Poisson replicate over documents
    (the same weights as ``grouped_counts_boot`` with this seed)."""
    from ._bootstrap import BootstrapCounts
    from ._counts import label_codes

    def init(chunk: RoutingTrace) -> dict:
        return {"acc": GroupedAccumulator((n_boot,), np.float64)}

    def update(state: dict, chunk: RoutingTrace) -> None:
        codes, values = label_codes(chunk, label)
        bc = BootstrapCounts(len(values), n_boot, seed)
        bc.add(chunk.doc_ids, codes)
        state["acc"].add(values, bc.boot.T)

    state, _ = fold(trace, init, update, columns=needs(label))
    return state["acc"].result()


def language_experts(
    trace: TraceSource,
    label: Label = "lang",
    *,
    threshold: float = 0.1,
    shared_min: float | None = None,
    k: int | None = None,
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    min_count: int = MIN_CELL_SLOTS,
) -> pd.DataFrame:
    """Language-specific and shared experts per layer, from frequency differences (Bandarkar et al. 2025).

    freq_l(e) = share of language l's tokens that have expert e among their top-k. Expert e is *specific* to l
    when freq_l(e) - max over other languages of freq(e) >= ``threshold``; *shared* when every language uses it
    at least ``shared_min`` (default: the uniform rate k/E) and max - min frequency < ``threshold``; else
    *other*. Columns: ``layer, expert, kind, <label>`` (the language, for specific experts), ``margin``
    (freq difference to the runner-up language), ``min_freq, max_freq``.
    Baseline: language-blind routing gives no specific expert beyond sampling noise.

    Uncertainty (Poisson bootstrap over documents, ``n_boot`` replicates, seeded): ``top`` (the language with
    the highest frequency, for every kind), ``count`` (its slots on the expert), ``tokens`` (its tokens),
    ``margin_ci_low, margin_ci_high`` (interval of freq_top - max over the others, with ``top`` held fixed),
    ``stability`` (share of replicates that give the same kind, and for a specific expert the same language)
    and ``too_few`` (``count`` < ``min_count``: a "specific" expert resting on a handful of slots).
    """
    values, counts, boot, tokens, _first = grouped_counts_boot(trace, label, k=k, n_boot=n_boot, seed=seed)
    warn_small(label_name(label), values, tokens)
    if len(values) < 2:
        raise MetricError(f"label {label_name(label)!r} has a single value here; comparing languages needs two.")
    layer_values = np.asarray(list(_first.layers))
    top_k = _first.top_k if k is None else min(k, _first.top_k)
    tok = np.asarray(tokens, dtype=np.float64)
    freq = counts / tok[:, None, None]  # [V, L, E]
    e = freq.shape[2]
    smin = top_k / e if shared_min is None else shared_min

    def classify(f: np.ndarray) -> tuple[np.ndarray, ...]:
        order = np.sort(f, axis=0)
        top, runner, low = order[-1], order[-2], order[0]
        margin = top - runner
        kind = np.where(margin >= threshold, "specific",
                        np.where((low >= smin) & (top - low < threshold), "shared", "other"))
        return kind, np.argmax(f, axis=0), margin, low, top

    kind, best, margin, low, top = classify(freq)
    n_layers = freq.shape[1]
    name = label_name(label)
    best_count = np.take_along_axis(counts, best[None], axis=0)[0]  # [L, E]
    df = pd.DataFrame({
        "layer": np.repeat(layer_values, e),
        "expert": np.tile(np.arange(e), n_layers),
        "kind": kind.ravel(),
        name: np.asarray(np.where(kind == "specific", values[best].astype(object), None)).ravel(),
        "margin": margin.ravel(),
        "min_freq": low.ravel(),
        "max_freq": top.ravel(),
        "top": values[best].astype(object).ravel(),
        "count": best_count.ravel().astype(np.int64),
        "tokens": tok[best].ravel().astype(np.int64),
    })
    lo = hi = stability = np.full(n_layers * e, np.nan)
    if n_boot:
        bvals, btok = _boot_tokens(trace, label, n_boot, seed)
        assert bvals.tolist() == values.tolist()
        fb = safe_div(boot, btok[:, :, None, None]).transpose(1, 0, 2, 3)  # [B, V, L, E]
        fb = np.nan_to_num(fb, nan=0.0)
        fixed = np.take_along_axis(fb, best[None, None], axis=1)[:, 0]  # [B, L, E]
        others = np.where(np.arange(len(values))[None, :, None, None] == best[None, None], -np.inf, fb).max(axis=1)
        lo, hi = (x.ravel() for x in quantiles(fixed - others, ci))
        same = np.zeros((n_layers, e))
        for b in range(n_boot):  # a loop over replicates; each is vectorised over layers and experts
            kb, bb, _, _, _ = classify(fb[b])
            same += (kb == kind) & ((kind != "specific") | (bb == best))
        stability = (same / n_boot).ravel()
    df["margin_ci_low"], df["margin_ci_high"] = lo, hi
    df["stability"] = stability
    df["too_few"] = df["count"].to_numpy() < min_count
    return df


def language_usage(
    trace: TraceSource,
    label: Label = "lang",
    *,
    top1: bool = False,
    k: int | None = None,
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    min_count: int = MIN_CELL_SLOTS,
) -> pd.DataFrame:
    """``label_usage`` (expert usage and lift per language, layer and expert) with counts and intervals per cell.

    The columns of ``label_usage`` (``<label>, layer, expert, count, share, token_share, lift, tokens``; lift =
    the expert's share of the language's slots / its share over all languages), plus ``slots`` (the language's
    slots in the layer), ``expected`` (slots the cell would get without preference: slots x overall share),
    ``lift_ci_low, lift_ci_high`` and ``share_ci_low, share_ci_high`` (Poisson bootstrap over documents,
    ``n_boot`` replicates, seeded) and ``too_few``: fewer than ``min_count`` slots both observed and expected,
    so the lift rests on a handful of slots (a lift of 2.6 from 3 slots); a cell that expects many slots but
    gets none is a reliable 0 and is not marked. A frame that ``language_usage_heatmap`` reads as it is.
    """
    values, counts, boot, tokens, first = grouped_counts_boot(trace, label, k=1 if top1 else k, n_boot=n_boot,
                                                              seed=seed)
    warn_small(label_name(label), values, tokens)
    c = counts.astype(np.float64)  # [V, L, E]
    nv, n_layers, e = c.shape
    slots = c.sum(axis=2, keepdims=True)
    share = safe_div(c, slots)
    overall = c.sum(axis=0)
    overall_share = safe_div(overall, overall.sum(axis=1, keepdims=True))  # [L, E]
    expected = slots * overall_share[None]
    tok = np.asarray(tokens, dtype=np.float64)
    df = pd.DataFrame({
        label_name(label): np.repeat(values, n_layers * e),
        "layer": np.tile(np.repeat(np.asarray(list(first.layers)), e), nv),
        "expert": np.tile(np.arange(e), nv * n_layers),
        "count": np.rint(counts).astype(np.int64).ravel(),
        "share": share.ravel(),
        "token_share": safe_div(c, tok[:, None, None]).ravel(),
        "lift": safe_div(share, overall_share[None]).ravel(),
        "tokens": np.repeat(tok.astype(np.int64), n_layers * e),
        "slots": np.repeat(slots[:, :, 0].ravel().astype(np.int64), e),
        "expected": expected.ravel(),
    })
    nan = np.full(nv * n_layers * e, np.nan)
    lift_lo = lift_hi = share_lo = share_hi = nan
    if n_boot:
        b = boot.transpose(1, 0, 2, 3)  # [B, V, L, E]
        share_b = safe_div(b, b.sum(axis=3, keepdims=True))
        over_b = b.sum(axis=1)
        lift_b = safe_div(share_b, safe_div(over_b, over_b.sum(axis=2, keepdims=True))[:, None])
        lift_lo, lift_hi = (x.ravel() for x in quantiles(lift_b, ci))
        share_lo, share_hi = (x.ravel() for x in quantiles(share_b, ci))
    df["lift_ci_low"], df["lift_ci_high"] = lift_lo, lift_hi
    df["share_ci_low"], df["share_ci_high"] = share_lo, share_hi
    df["too_few"] = (df["count"].to_numpy() < min_count) & (df["expected"].to_numpy() < min_count)
    return df


# ---------------------------------------------------------------------------------------------- token control
def _xlogx_sum(codes: np.ndarray, weights: np.ndarray | None, size: int) -> float:
    """sum_c n_c log n_c of the (weighted) counts of ``codes`` in ``[0, size)``."""
    n = np.bincount(codes, weights=weights, minlength=size)
    n = n[n > 0]
    return float(np.sum(n * np.log(n)))


def _cmi_nats(cells: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], sizes: tuple[int, int, int, int],
              weights: np.ndarray | None) -> float:
    """Plug-in I(L; X | G) in nats from compact codes of (g, l, x), (g, l), (g, x) and g per token.

    ``(1/N) [sum n_glx log n_glx + sum n_g log n_g - sum n_gl log n_gl - sum n_gx log n_gx]``.
    """
    glx, gl, gx, g = cells
    total = float(len(g) if weights is None else weights.sum())
    if total <= 0:
        return float("nan")
    s = (_xlogx_sum(glx, weights, sizes[0]) + _xlogx_sum(g, weights, sizes[3])
         - _xlogx_sum(gl, weights, sizes[1]) - _xlogx_sum(gx, weights, sizes[2]))
    return max(s / total, 0.0)


def _strata_cells(g: np.ndarray, lab: np.ndarray, x: np.ndarray
                  ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[int, int, int, int]]:
    """Compact codes ``[tokens]`` of (g, l, x), (g, l), (g, x), g and their sizes, for ``_cmi_nats``."""
    nl, nx = int(lab.max()) + 1, int(x.max()) + 1
    gl = g.astype(np.int64) * nl + lab
    gx = g.astype(np.int64) * nx + x
    glx, gl_c, gx_c = (factorize(c)[0] for c in (gl * nx + x, gl, gx))
    codes = (glx, gl_c, gx_c, g)
    return codes, (int(glx.max()) + 1, int(gl_c.max()) + 1, int(gx_c.max()) + 1, int(g.max()) + 1)


def _mi_nats(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in I(a; b) in nats of two code arrays (same length)."""
    ab, _ = factorize(a.astype(np.int64) * (int(b.max()) + 1) + b)
    na = np.bincount(a)
    nb = np.bincount(b)
    nab = np.bincount(ab)
    n = float(len(a))
    xl = lambda x: float(np.sum(x[x > 0] * np.log(x[x > 0])))  # noqa: E731
    return max((xl(nab) + n * math.log(n) - xl(na) - xl(nb)) / n, 0.0)


def _expert_variable(chunk: RoutingTrace, expert: str) -> np.ndarray:
    """int64 ``[tokens, layers]``: the routing variable of each token (-1: no expert at that layer)."""
    from ._ranking import top1 as top1_ids

    if expert == "top1":
        return top1_ids(chunk).astype(np.int64)
    if expert == "slot0":
        return chunk.expert_ids[:, :, 0].astype(np.int64)
    if expert == "set":  # the unordered set of routed experts as one value (a bit mask)
        ids = chunk.expert_ids.astype(np.int64)
        if chunk.num_experts > 62:
            # more experts than bits: a sorted tuple, hashed to an int64 code
            key = np.sort(np.where(ids >= 0, ids, chunk.num_experts), axis=2)
            out = np.zeros(ids.shape[:2], dtype=np.int64)
            for s in range(key.shape[2]):
                out = out * (chunk.num_experts + 1) + key[:, :, s]
        else:
            out = np.where(ids >= 0, np.left_shift(np.int64(1), np.maximum(ids, 0)), 0).sum(axis=2)
        return np.where((ids >= 0).any(axis=2), out, -1)
    raise MetricError(f"expert must be 'top1', 'slot0' or 'set', got {expert!r}.")


def _given_of(chunk: RoutingTrace, given: Label) -> tuple[np.ndarray, np.ndarray]:
    """(values [tokens], valid mask) of the conditioning variable: token ids, or any label."""
    if isinstance(given, str) and given == "token_id":
        return chunk.token_ids.astype(np.int64), chunk.token_ids >= 0
    values = label_of(chunk, given)
    return values, np.ones(len(values), dtype=bool)


def conditional_label_mi(
    trace: TraceSource,
    label: Label = "lang",
    given: Label = "token_id",
    *,
    layers: list[int] | None = None,
    expert: ExpertVariable = "top1",
    min_labels: int = 2,
    n_shuffles: int = 5,
    n_boot: int = 100,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """How much the expert tells about a label *beyond the token*: I(label; expert | token), one row per layer.

    A router that is a pure function of the token id (a token -> expert table; an untrained router on languages
    with disjoint vocabularies comes close) separates languages through the token alone; this measures what is
    left. Only token ids (``given="token_id"``; or any label / function of a chunk, e.g. a token-type label)
    that occur under at least ``min_labels`` label values take part: elsewhere the token already fixes the label
    and the conditional MI is 0 by construction.

    The expert variable (``expert``): ``"top1"`` = the largest-weight slot, exactly as ``label_nmi`` (slot 0
    without weights); ``"slot0"`` = the engine's first slot; ``"set"`` = the token's set of routed experts as one
    value. Tokens without a routed expert at a layer are left out of that layer.

    Columns (bits; plug-in estimates, biased upward in small strata: read them against ``floor_bits``):
    ``layer``, ``cmi_bits`` = sum_t p(t) I(label; expert | token = t) over the kept tokens;
    ``floor_bits, floor_sd_bits`` = the same after permuting the labels among the occurrences of each token id
    (mean and sd over ``n_shuffles``; keeps every stratum's margins: the value finite samples give when the
    expert carries nothing about the label beyond the token); ``excess_bits`` = cmi_bits - floor_bits (the
    number to compare across models: the plug-in bias grows with the strata's label x expert cells, so an
    untrained router with spread-out experts shows a large raw value and a large floor);
    ``ci_low, ci_high`` = percentile interval of a Poisson bootstrap over documents (``ci_unit = "documents"``;
    over tokens, ``"tokens"``, when the trace has a single document), strata fixed, with the replicates centred
    on the estimate (a resample thins the strata and adds plug-in bias of its own, which would push the whole
    interval above the estimate); ``mi_label_token_bits`` = I(label; token), ``mi_label_expert_bits`` =
    I(label; expert) and ``h_label_bits`` = H(label), all over the same kept tokens (chain rule:
    I(label; token, expert) = mi_label_token_bits + cmi_bits); ``n_tokens`` (kept tokens), ``n_token_ids``
    (kept strata), ``n_tokens_total`` (tokens with a label, a given value and an expert at the layer).
    Holds every kept token in memory (a few integers per token and layer).
    """
    if min_labels < 2:
        raise MetricError(f"min_labels must be at least 2 (a token under one label carries no choice), got {min_labels}.")
    if n_shuffles < 0 or n_boot < 0:
        raise MetricError(f"n_shuffles and n_boot must be >= 0, got {n_shuffles} and {n_boot}.")
    if not 0 < ci < 1:
        raise MetricError(f"ci must be in (0, 1), got {ci}.")
    parts: dict[str, list[np.ndarray]] = {"lab": [], "giv": [], "doc": [], "x": []}
    first: RoutingTrace | None = None
    n_valid_given = 0
    cols = needs(label, None if given == "token_id" else given, weights=expert == "top1", tokens=True)
    for chunk in chunks(trace, layers=layers, columns=cols):
        first = first or chunk
        lab = label_of(chunk, label)
        giv, ok = _given_of(chunk, given)
        n_valid_given += int(ok.sum())
        parts["lab"].append(lab[ok])
        parts["giv"].append(np.asarray(giv)[ok])
        parts["doc"].append(chunk.doc_ids[ok])
        parts["x"].append(_expert_variable(chunk, expert)[ok])
    assert first is not None
    if n_valid_given == 0:
        raise MetricError("no token has a token id (token_ids are -1 in this trace, e.g. an import without ids): "
                          "conditioning on the token needs them; pass given=<a label> instead.")
    lab_codes, lab_values = factorize(np.concatenate(parts["lab"]))
    giv_codes, _ = factorize(np.concatenate(parts["giv"]))
    docs = np.concatenate(parts["doc"])
    x_all = np.concatenate(parts["x"])  # [tokens, layers]
    warn_small(label_name(label), lab_values, np.bincount(lab_codes, minlength=len(lab_values)))
    # strata: given values seen under >= min_labels label values (over all tokens with a label and a given value)
    pair_codes, _ = factorize(giv_codes.astype(np.int64) * len(lab_values) + lab_codes)
    first_of_pair = np.zeros(int(pair_codes.max()) + 1, dtype=np.intp)
    first_of_pair[pair_codes[::-1]] = np.arange(len(pair_codes))[::-1]
    labels_per_giv = np.bincount(giv_codes[first_of_pair], minlength=int(giv_codes.max()) + 1)
    kept_giv = labels_per_giv >= min_labels
    keep = kept_giv[giv_codes]
    rng = np.random.default_rng(seed)
    unit = "documents" if len(np.unique(docs)) >= 2 else "tokens"
    rows = []
    for li, layer in enumerate(first.layers):
        x_layer = x_all[:, li]
        routed = x_layer >= 0
        m = keep & routed
        n_tot = int(routed.sum())
        row: dict[str, Any] = {"layer": layer}
        if not m.any():
            rows.append({**row, "cmi_bits": np.nan, "floor_bits": np.nan, "floor_sd_bits": np.nan, "excess_bits": np.nan,
                         "ci_low": np.nan, "ci_high": np.nan, "ci_unit": unit, "mi_label_token_bits": np.nan,
                         "mi_label_expert_bits": np.nan, "h_label_bits": np.nan, "n_tokens": 0,
                         "n_token_ids": 0, "n_tokens_total": n_tot})
            continue
        g, _ = factorize(giv_codes[m])
        lc, _ = factorize(lab_codes[m])
        xc, _ = factorize(x_layer[m])
        c_obs, s_obs = _strata_cells(g, lc, xc)
        cmi = _cmi_nats(c_obs, s_obs, None)
        floors = []
        if n_shuffles:
            by_g = np.argsort(g, kind="stable")
            for _ in range(n_shuffles):
                perm = np.lexsort((rng.random(len(g)), g))  # tokens grouped by stratum, random order inside
                shuffled = np.empty_like(lc)
                shuffled[by_g] = lc[perm]
                floors.append(_cmi_nats(*_strata_cells(g, shuffled, xc), None))
        lo = hi = np.nan
        if n_boot:
            if unit == "documents":
                dcodes, dvals = factorize(docs[m])
                w_all = poisson_weights(seed, dvals, n_boot)[:, dcodes]  # [B, tokens]
            else:
                w_all = poisson_weights(seed, np.flatnonzero(m), n_boot)
            boot = np.array([_cmi_nats(c_obs, s_obs, w) for w in w_all])
            # resampling documents thins the strata and adds plug-in bias: centre the replicates on the estimate
            boot = boot - (boot.mean() - cmi)
            lo, hi = (float(v[0]) for v in quantiles(boot[:, None], ci))
        h_label = float(entropy(np.bincount(lc)) / math.log(2))
        rows.append({
            **row,
            "cmi_bits": cmi / math.log(2),
            "floor_bits": float(np.mean(floors)) / math.log(2) if floors else np.nan,
            "floor_sd_bits": float(np.std(floors)) / math.log(2) if floors else np.nan,
            "excess_bits": (cmi - float(np.mean(floors))) / math.log(2) if floors else np.nan,
            "ci_low": lo / math.log(2),
            "ci_high": hi / math.log(2),
            "ci_unit": unit,
            "mi_label_token_bits": _mi_nats(lc, g) / math.log(2),
            "mi_label_expert_bits": _mi_nats(lc, xc) / math.log(2),
            "h_label_bits": h_label,
            "n_tokens": int(m.sum()),
            "n_token_ids": int(g.max()) + 1,
            "n_tokens_total": n_tot,
        })
    return pd.DataFrame(rows)
