"""Causal measures: what ablating experts does to next-token loss, and steering sets picked from traces.

Statistics alone do not say which experts matter (a 2026 causal audit of MoE routing, arXiv 2606.10703, found
that utilisation, norms and routing weights predict ablation effects with Cohen's d < 0.17). These functions run
the model with experts removed (``moe_routing.intervene``) and measure the change of the next-token negative
log-likelihood (NLL, nats per predicted token) against two controls computed in the same pass:

- a noise floor: the same clean forward run twice (0 on a deterministic backend), and, for a model that is not
  in fp32, the same batch in an fp32 copy of the model (bf16 noise is as large as one expert's effect);
- random expert sets of the same size in the same layers (drawn, when the layer has enough experts, from the
  experts outside the tested set).

Units of resampling are the corpus's texts (a text cut into several chunks stays one unit); intervals are
Poisson-bootstrap percentiles (``_common.poisson_weights``: a text's weight depends on (seed, text, replicate)
only, so conditions share their replicates and pooled or paired numbers stay consistent). The corpus is
streamed in blocks: memory holds one block of token ids plus per-label accumulators ``[conditions, n_boot]``.

``steering_set`` is a pure trace metric (SteerMoE, arXiv 2509.09660): the risk difference of each expert's
activation rate between two traces of paired inputs; ``steering_bias`` turns its choice into the ``bias=``
argument of ``intervene``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CorpusError, MetricError
from ._common import (
    TraceSource,
    _sort_key,
    chunks,
    factorize,
    layer_expert_counts,
    poisson_weights,
    quantiles,
)

__all__ = [
    "AblationMatrix",
    "CausalClaim",
    "ablation_effect",
    "ablation_matrix",
    "check_claim",
    "expert_importance",
    "steering_bias",
    "steering_set",
]

Experts = Mapping[int, Sequence[int]]

#: Texts per planning block: a block is tokenised, sorted by length (less padding) and cut into batches.
BLOCK_BATCHES = 32

NOISE_REPEAT = "noise: repeat"
NOISE_FP32 = "noise: fp32"


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class _Batch:
    """One padded batch: ``input_ids / attention_mask / position_ids`` ``[B, T]``, the text and label of each row."""

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    texts: np.ndarray  # int64 [B]: index of the row's text in the corpus
    labels: np.ndarray  # object [B]
    starts: np.ndarray  # bool [B]: the row is its text's first chunk

    @property
    def new_texts(self) -> int:
        return int(self.starts.sum())


def _records(corpus: Any, by: str | None, labels: Mapping[str, Sequence[Any]] | None,
             text_column: str) -> tuple[Iterator[tuple[str, Any]], int | None]:
    """(text, label value) pairs of a corpus given like ``capture_corpus`` takes it, and the length if known."""
    from ..pipeline import _iter_records

    is_table = (hasattr(corpus, "columns") and hasattr(corpus, "__getitem__")) or hasattr(corpus, "column_names")
    if by is None:
        recs, _, length = _iter_records(corpus, [] if is_table else None, text_column)
        return ((t, "all") for t, _ in recs), length
    if is_table:
        recs, _, length = _iter_records(corpus, [by], text_column)
    elif labels is not None:
        if not isinstance(labels, Mapping) or by not in labels:
            raise MetricError(
                f"by={by!r} is not among the labels given ({list(labels) if isinstance(labels, Mapping) else labels}); "
                f"pass labels={{{by!r}: [one value per text]}} or by=None."
            )
        recs, _, length = _iter_records(corpus, {by: labels[by]}, text_column)
    else:
        if isinstance(corpus, str):
            raise CorpusError("got a single string; pass a list of texts (or a DataFrame / dataset).")
        recs, _, length = _iter_records(corpus, None, text_column)

    def gen() -> Iterator[tuple[str, Any]]:
        for i, (text, lab) in enumerate(recs):
            if by not in lab:
                raise MetricError(
                    f"text {i} has no {by!r} label: give a DataFrame with a {by!r} column, dicts with a {by!r} key, "
                    f"labels={{{by!r}: [...]}} for a list of texts, or by=None to pool all texts."
                )
            yield text, lab[by]

    return gen(), length


def _plan(corpus: Any, tokenizer: Any, *, by: str | None, labels: Mapping[str, Sequence[Any]] | None,
          text_column: str, batch_size: int, max_length: int, max_tokens: int | None) -> tuple[Iterator[_Batch],
                                                                                                int | None]:
    """Padded batches of the corpus (deterministic in the corpus and settings), and the number of texts if known."""
    import torch

    if batch_size < 1:
        raise MetricError(f"batch_size must be at least 1, got {batch_size}.")
    if max_length < 2:
        raise MetricError(f"max_length must be at least 2 (one token predicts the next), got {max_length}.")
    records, length = _records(corpus, by, labels, text_column)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"

    def pieces() -> Iterator[tuple[int, int, list[int], Any]]:
        total = 0
        for i, (text, value) in enumerate(records):
            if not isinstance(text, str):
                raise CorpusError(f"text {i} is {type(text).__name__}, not a string.")
            if not text.strip():
                continue
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            for c, s in enumerate(range(0, len(ids), max_length)):
                piece = ids[s : s + max_length]
                if max_tokens is not None:
                    piece = piece[: max_tokens - total]
                    if not piece:
                        return
                total += len(piece)
                yield i, c, piece, value

    def batch(rows: list[tuple[int, int, list[int], Any]]) -> _Batch:
        width = max(len(r[2]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, _, piece, _) in enumerate(rows):
            sl = slice(width - len(piece), width) if left else slice(0, len(piece))
            ids[r, sl] = torch.tensor(piece, dtype=torch.long)
            mask[r, sl] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        labels_arr = np.empty(len(rows), dtype=object)
        labels_arr[:] = [r[3] for r in rows]
        return _Batch(ids, mask, positions, np.array([r[0] for r in rows], dtype=np.int64), labels_arr,
                      np.array([r[1] == 0 for r in rows], dtype=bool))

    def gen() -> Iterator[_Batch]:
        block: list[tuple[int, int, list[int], Any]] = []
        seen = False
        for piece in pieces():
            block.append(piece)
            if len(block) == batch_size * BLOCK_BATCHES:
                yield from flush(block)
                block, seen = [], True
        if block:
            yield from flush(block)
            seen = True
        if not seen:
            raise CorpusError("the corpus gave no tokens (empty corpus, or every text was empty).")

    def flush(block: list[tuple[int, int, list[int], Any]]) -> Iterator[_Batch]:
        block = sorted(block, key=lambda r: len(r[2]))  # stable: deterministic
        for s in range(0, len(block), batch_size):
            yield batch(block[s : s + batch_size])

    return gen(), length


def _device(model: Any) -> Any:
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return next(model.parameters()).device


def _token_nll(model: Any, b: _Batch) -> tuple[np.ndarray, np.ndarray]:
    """Next-token NLL ``[B, T-1]`` float64 (0 where not counted) and the bool mask of counted positions.

    Position t predicts token t + 1; it counts when both are real tokens (padding never counts).
    """
    import torch

    dev = _device(model)
    ids = b.input_ids.to(dev)
    mask = b.attention_mask.to(dev)
    out = model(input_ids=ids, attention_mask=mask, position_ids=b.position_ids.to(dev), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    n, t = ids.shape
    nll = torch.zeros((n, t - 1), dtype=torch.float64)
    for r in range(n):  # one row at a time: fp32 temporaries of [T, V], not [B, T, V]
        row = torch.nn.functional.cross_entropy(logits[r, :-1].float(), ids[r, 1:], reduction="none")
        nll[r] = row.double().cpu()
    valid = (b.attention_mask[:, 1:] > 0) & (b.attention_mask[:, :-1] > 0)
    nll = torch.where(valid, nll, torch.zeros((), dtype=torch.float64))
    if not torch.isfinite(nll).all():
        raise MetricError("the model produced a non-finite next-token loss on real tokens; check the model's dtype "
                          "and weights (an fp16 overflow?).")
    return nll.numpy(), valid.numpy()


# ---------------------------------------------------------------------------------------------- accumulation
class _Acc:
    """Per label value: sums of NLL changes ``[C, 1 + n_boot]`` (point + Poisson replicates), token counts
    ``[1 + n_boot]``, clean NLL sums ``[1 + n_boot]``, absolute changes ``[C]`` and text counts."""

    def __init__(self, n_cond: int, n_boot: int, seed: int) -> None:
        self.n_cond, self.n_boot, self.seed = n_cond, n_boot, seed
        self.rows: dict[Any, dict[str, Any]] = {}

    def add(self, b: _Batch, clean: np.ndarray, valid: np.ndarray, changed: list[np.ndarray]) -> None:
        codes, texts = factorize(b.texts)
        n_t = len(texts)

        def per_text(x: np.ndarray) -> np.ndarray:  # [B] -> [texts]
            return np.bincount(codes, weights=x, minlength=n_t)

        count = per_text(valid.sum(axis=1).astype(np.float64))
        started = per_text(b.starts.astype(np.float64))
        clean_sum = per_text(clean.sum(axis=1))
        delta = np.stack([per_text((c - clean).sum(axis=1)) for c in changed]) if changed else np.zeros((0, n_t))
        absd = np.stack([per_text(np.abs(c - clean).sum(axis=1)) for c in changed]) if changed else delta
        text_label = np.empty(n_t, dtype=object)
        text_label[codes] = b.labels
        w = poisson_weights(self.seed, texts, self.n_boot) if self.n_boot else np.zeros((0, n_t))
        lcodes, lvalues = factorize(text_label)
        for j, value in enumerate(lvalues.tolist()):
            sel = lcodes == j
            ws = w[:, sel]
            row = self.rows.get(value)
            if row is None:
                row = self.rows[value] = {"num": np.zeros((self.n_cond, 1 + self.n_boot)),
                                          "den": np.zeros(1 + self.n_boot), "clean": np.zeros(1 + self.n_boot),
                                          "abs": np.zeros(self.n_cond), "texts": 0}
            row["num"][:, 0] += delta[:, sel].sum(axis=1)
            row["num"][:, 1:] += delta[:, sel] @ ws.T
            row["den"][0] += count[sel].sum()
            row["den"][1:] += ws @ count[sel]
            row["clean"][0] += clean_sum[sel].sum()
            row["clean"][1:] += ws @ clean_sum[sel]
            row["abs"] += absd[:, sel].sum(axis=1)
            row["texts"] += int(started[sel].sum())

    def result(self) -> _Effects:
        if not self.rows:
            raise CorpusError("the corpus gave no tokens to predict.")
        keys = sorted(self.rows, key=_sort_key)
        r = [self.rows[k] for k in keys]
        values = np.empty(len(keys), dtype=object)
        values[:] = keys
        return _Effects(values=values, num=np.stack([x["num"] for x in r]), den=np.stack([x["den"] for x in r]),
                        clean=np.stack([x["clean"] for x in r]), absnum=np.stack([x["abs"] for x in r]),
                        docs=np.array([x["texts"] for x in r]))


@dataclass
class _Effects:
    """Accumulated sums: ``num [V, C, 1+B]``, ``den [V, 1+B]``, ``clean [V, 1+B]``, ``absnum [V, C]``, ``docs [V]``."""

    values: np.ndarray
    num: np.ndarray
    den: np.ndarray
    clean: np.ndarray
    absnum: np.ndarray
    docs: np.ndarray

    def take(self, conds: Sequence[int]) -> _Effects:
        """The same sums for some conditions only (in the order given)."""
        idx = list(conds)
        return _Effects(values=self.values, num=self.num[:, idx], den=self.den, clean=self.clean,
                        absnum=self.absnum[:, idx], docs=self.docs)

    def ratio(self, cond: int | Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
        """Mean change per token ``[..., 1+B]`` of condition(s) over label rows (pooled; all when None)."""
        sel = slice(None) if rows is None else rows
        num = self.num[sel].sum(axis=0)[cond]
        den = self.den[sel].sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _interval(series: np.ndarray, ci: float) -> tuple[float, float, float]:
    """(point, low, high) from ``[1 + B]`` (point first, then replicates)."""
    point = float(series[0])
    if len(series) == 1:
        return point, float("nan"), float("nan")
    lo, hi = quantiles(series[1:, None], ci)
    return point, float(lo[0]), float(hi[0])


def _random_interval(per_set: np.ndarray, ci: float, seed: int) -> tuple[float, float, float]:
    """Mean over random sets (``per_set [S, 1+B]``) and its interval: each replicate resamples the texts (its
    column) and the sets (with replacement), so the interval covers both the corpus and the choice of set."""
    point = float(np.nanmean(per_set[:, 0]))
    n_sets, width = per_set.shape
    if width == 1:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng([seed, 0x5E75])
    pick = rng.integers(0, n_sets, size=(width - 1, n_sets))
    with warnings.catch_warnings():  # a replicate that drew no text of this value is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        boot = np.nanmean(per_set[pick, np.arange(1, width)[:, None]], axis=1)
    lo, hi = quantiles(boot[:, None], ci)
    return point, float(lo[0]), float(hi[0])


# ---------------------------------------------------------------------------------------------- the runner
def _moe_layout(model: Any) -> dict[int, int]:
    """{decoder layer: number of experts} of the model's MoE layers."""
    from ..adapters import find_moe_layers, resolve_adapter

    return {m.layer: m.num_experts for m in find_moe_layers(model, resolve_adapter(model))}


def _check_experts(experts: Any, layout: dict[int, int], what: str = "experts") -> dict[int, list[int]]:
    if not isinstance(experts, Mapping) or not experts:
        raise MetricError(f"{what} must be a non-empty mapping {{layer: [expert, ...]}}, got {experts!r}.")
    out: dict[int, list[int]] = {}
    for layer, es in experts.items():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layout:
            raise MetricError(f"{what}: layer {layer!r} is not an MoE layer of this model; MoE layers: "
                              f"{sorted(layout)}.")
        if isinstance(es, (int, np.integer)):
            es = [es]
        es = list(es)
        n = layout[int(layer)]
        bad = [e for e in es if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= int(e) < n]
        if not es or bad:
            raise MetricError(f"{what}: layer {layer} needs expert ids in [0, {n}), got {es!r}.")
        if len(set(es)) != len(es):
            raise MetricError(f"{what}: layer {layer} lists an expert twice: {es!r}.")
        out[int(layer)] = sorted(int(e) for e in es)
    return out


def _random_sets(target: dict[int, list[int]], layout: dict[int, int], n: int,
                 rng: np.random.Generator) -> list[dict[int, list[int]]]:
    """``n`` random sets with as many experts per layer as ``target``, from the other experts when enough."""
    sets = []
    for _ in range(n):
        s = {}
        for layer, es in target.items():
            others = [e for e in range(layout[layer]) if e not in es]
            pool = others if len(others) >= len(es) else list(range(layout[layer]))
            s[layer] = sorted(int(e) for e in rng.choice(pool, size=len(es), replace=False))
        sets.append(s)
    return sets


def _model_dtype(model: Any) -> Any:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _run(model: Any, tokenizer: Any, corpus: Any, conditions: list[Callable[[_Batch], np.ndarray]], *,
         by: str | None, labels: Mapping[str, Sequence[Any]] | None, text_column: str, batch_size: int,
         max_length: int | None, max_tokens: int | None, n_boot: int, seed: int, progress: bool,
         desc: str) -> _Effects:
    """Stream the corpus: per batch one clean forward, then one forward per condition; accumulate changes."""
    import torch

    if n_boot < 0:
        raise MetricError(f"n_boot must be >= 0, got {n_boot}.")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_length = int(max_length or min(int(getattr(cfg, "max_position_embeddings", 2048) or 2048), 2048))
    batches, length = _plan(corpus, tokenizer, by=by, labels=labels, text_column=text_column,
                            batch_size=batch_size, max_length=max_length, max_tokens=max_tokens)
    acc = _Acc(len(conditions), n_boot, seed)
    bar = _progress(progress, length, desc)
    try:
        with torch.inference_mode():
            for b in batches:
                clean, valid = _token_nll(model, b)
                acc.add(b, clean, valid, [f(b) for f in conditions])
                bar.update(b.new_texts)
    finally:
        bar.close()
    return acc.result()


def _progress(show: bool, total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="text", desc=desc, file=sys.stderr, mininterval=1.0, disable=not show)


def _ablated(model: Any, experts: dict[int, list[int]], mode: str) -> Callable[[_Batch], np.ndarray]:
    def run(b: _Batch) -> np.ndarray:
        from ..intervene import intervene

        with intervene(model, ablate=experts, mode=mode):
            return _token_nll(model, b)[0]

    return run


def _repeat(model: Any) -> Callable[[_Batch], np.ndarray]:
    return lambda b: _token_nll(model, b)[0]


def _format_experts(experts: Mapping[int, Sequence[int]]) -> str:
    return "; ".join(f"L{layer}: {', '.join(map(str, es))}" for layer, es in sorted(experts.items()))


# ---------------------------------------------------------------------------------------------- public
def ablation_effect(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    experts: Experts,
    *,
    by: str | None = "lang",
    labels: Mapping[str, Sequence[Any]] | None = None,
    text_column: str = "text",
    mode: str = "reroute",
    n_random: int = 10,
    fp32_floor: bool = True,
    n_boot: int = 200,
    ci: float = 0.95,
    batch_size: int = 16,
    max_length: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Mean change of next-token NLL per token when ``experts`` are ablated, per value of label ``by``.

    Args:
        corpus: what ``capture_corpus`` takes: a list of texts (with ``labels={name: [one per text]}``), a
            pandas/polars DataFrame or ``datasets.Dataset`` with a ``text_column`` and a ``by`` column, or dicts.
            Texts longer than ``max_length`` tokens are cut into chunks (default: the model's context, <= 2048).
        experts: ``{decoder layer: [expert, ...]}``; ablated together with ``intervene(model, ablate=experts,
            mode=mode)`` (``"reroute"``: the router picks the next choice; ``"zero"``; ``"renormalize"``).
        by: the label to group by (``None``: one group ``"all"``).
        n_random: random sets of the same size in the same layers (the control).
        fp32_floor: when the model is not fp32, also run an fp32 copy of it (memory: one more model).

    Returns a frame with one row per (label value, condition); columns ``<by>, condition, set, delta, ci_low,
    ci_high, abs_delta, nll_clean, tokens, docs``. ``delta`` is the mean per-token change of NLL in nats
    (condition minus clean), ``abs_delta`` the mean absolute per-token change, ``nll_clean`` the clean mean
    NLL, ``tokens`` the predicted tokens (padding never counts) and ``docs`` the texts. Conditions:
    ``"ablated"``; ``"random"`` (mean over the random sets; its interval resamples texts and sets);
    ``"random set"`` (each set, ``set`` = its index, the experts in ``attrs["random_sets"]``);
    ``"noise: repeat"`` (the clean forward again); ``"noise: fp32"`` (fp32 copy minus the model's dtype; only
    when they differ). Intervals: ``ci`` Poisson bootstrap over texts (``n_boot`` replicates).
    """
    return _ablation_with_effects(model, tokenizer, corpus, experts, by=by, labels=labels, text_column=text_column,
                                  mode=mode, n_random=n_random, fp32_floor=fp32_floor, n_boot=n_boot, ci=ci,
                                  batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, seed=seed,
                                  progress=progress)[0]


def _effect_frame(eff: _Effects, names: list[str], n_sets: int, by: str | None, ci: float, seed: int,
                  attrs: dict[str, Any]) -> pd.DataFrame:
    col = by or "group"
    rows = []
    n_fixed = len(names)
    for v, value in enumerate(eff.values.tolist()):
        den = eff.den[v, 0]
        base = {col: value, "nll_clean": eff.clean[v, 0] / den if den else np.nan, "tokens": int(den),
                "docs": int(eff.docs[v])}
        one = np.array([v])

        def row(cond: str, s: int, stat: tuple[float, float, float], absd: float,
                base: dict[str, Any] = base) -> dict[str, Any]:
            return {col: base[col], "condition": cond, "set": s, "delta": stat[0], "ci_low": stat[1],
                    "ci_high": stat[2], "abs_delta": absd, **{k: base[k] for k in ("nll_clean", "tokens", "docs")}}

        for c, name in enumerate(names):
            rows.append(row(name, -1, _interval(eff.ratio(c, one), ci), eff.absnum[v, c] / den if den else np.nan))
        if n_sets:
            per_set = np.stack([eff.ratio(n_fixed + s, one) for s in range(n_sets)])
            absd = float(np.mean(eff.absnum[v, n_fixed:])) / den if den else np.nan
            rows.append(row("random", -1, _random_interval(per_set, ci, seed), absd))
            for s in range(n_sets):
                rows.append(row("random set", s, _interval(per_set[s], ci),
                                eff.absnum[v, n_fixed + s] / den if den else np.nan))
    df = pd.DataFrame(rows)
    df.attrs.update(attrs)
    return df


def expert_importance(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    layer: int,
    *,
    experts: Sequence[int] | None = None,
    by: str | None = "lang",
    labels: Mapping[str, Sequence[Any]] | None = None,
    text_column: str = "text",
    mode: str = "reroute",
    n_boot: int = 200,
    ci: float = 0.95,
    batch_size: int = 16,
    max_length: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Each expert of ``layer`` ablated alone (``mode``, default reroute = banned): NLL change per label value.

    One clean forward per batch is shared by all experts, then one intervened forward per expert. A row equals
    ``ablation_effect(..., experts={layer: [e]})``'s ``"ablated"`` row (same texts, same bootstrap replicates).
    Columns: ``layer, expert, <by>, delta, ci_low, ci_high, abs_delta, nll_clean, tokens, docs`` (as in
    ``ablation_effect``); ``experts`` restricts to some experts (default: all of the layer).
    """
    layout = _moe_layout(model)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layout:
        raise MetricError(f"layer {layer!r} is not an MoE layer of this model; MoE layers: {sorted(layout)}.")
    layer = int(layer)
    chosen = list(range(layout[layer])) if experts is None else list(experts)
    for e in chosen:
        _check_experts({layer: [e]}, layout)
    if len(set(chosen)) != len(chosen) or not chosen:
        raise MetricError(f"experts must be distinct expert ids of layer {layer}, got {chosen!r}.")
    conditions = [_ablated(model, {layer: [int(e)]}, mode) for e in chosen]
    eff = _run(model, tokenizer, corpus, conditions, by=by, labels=labels, text_column=text_column,
               batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, n_boot=n_boot, seed=seed,
               progress=progress, desc=f"expert importance, layer {layer} ({len(chosen) + 1} forwards a batch)")
    col = by or "group"
    rows = []
    for c, e in enumerate(chosen):
        for v, value in enumerate(eff.values.tolist()):
            den = eff.den[v, 0]
            point, lo, hi = _interval(eff.ratio(c, np.array([v])), ci)
            rows.append({"layer": layer, "expert": int(e), col: value, "delta": point, "ci_low": lo, "ci_high": hi,
                         "abs_delta": eff.absnum[v, c] / den if den else np.nan,
                         "nll_clean": eff.clean[v, 0] / den if den else np.nan, "tokens": int(den),
                         "docs": int(eff.docs[v])})
    df = pd.DataFrame(rows)
    df.attrs.update({"mode": mode, "n_boot": n_boot, "ci": ci})
    return df


# ---------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Effect:
    """A mean NLL change per token (nats) and its interval."""

    delta: float
    ci_low: float
    ci_high: float

    def __str__(self) -> str:
        return f"{self.delta:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"


@dataclass
class CausalClaim:
    """The causal test of "these experts serve ``value``": ablate them, compare with others and random sets.

    ``holds`` when the target's interval lies above both the other values' pooled effect and the random sets'
    effect on the target (and above the repeat-noise floor). ``frame`` is the full ``ablation_effect`` frame.
    """

    experts: dict[int, list[int]]
    by: str
    value: Any
    mode: str
    target: Effect
    others: Effect
    random: Effect
    noise: Effect
    noise_fp32: Effect | None
    beats_random: float  # share of random sets whose effect on the target is below the target effect
    n_random: int
    holds: bool
    reasons: list[str] = field(default_factory=list)
    frame: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def sentence(self) -> str:
        others = "other languages" if self.by == "lang" else f"other {self.by} values"
        noise = f"noise floor {self.noise}" + ("" if self.noise_fp32 is None else f", fp32 vs dtype {self.noise_fp32}")
        verdict = "the claim holds" if self.holds else "the claim does not hold (" + "; ".join(self.reasons) + ")"
        return (f"ablating experts {{{_format_experts(self.experts)}}} ({self.mode}) raises {self.value}'s NLL by "
                f"{self.target} nats/token, {others} by {self.others}, random sets of the same size by "
                f"{self.random} (the target effect exceeds {self.beats_random:.0%} of {self.n_random} sets; "
                f"{noise}): {verdict}.")

    def summary(self) -> pd.DataFrame:
        """One row per comparison: target, others, random, noise (and fp32 noise)."""
        rows = {"target": self.target, "others": self.others, "random sets": self.random, "noise: repeat": self.noise}
        if self.noise_fp32 is not None:
            rows["noise: fp32"] = self.noise_fp32
        return pd.DataFrame([{"what": k, "delta": e.delta, "ci_low": e.ci_low, "ci_high": e.ci_high}
                             for k, e in rows.items()])

    def __str__(self) -> str:
        return self.sentence

    def _repr_markdown_(self) -> str:
        return self.sentence


def check_claim(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    experts: Experts,
    label_value: Any,
    *,
    by: str = "lang",
    labels: Mapping[str, Sequence[Any]] | None = None,
    text_column: str = "text",
    mode: str = "reroute",
    n_random: int = 10,
    fp32_floor: bool = True,
    n_boot: int = 200,
    ci: float = 0.95,
    batch_size: int = 16,
    max_length: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> CausalClaim:
    """One-call causal test of an expert set picked for ``label_value`` (by ``language_experts``, ``contrast``...).

    Runs ``ablation_effect`` once and compares three numbers: the effect on ``label_value`` (a), the pooled
    effect on every other value of ``by`` (b), the random sets' mean effect on ``label_value`` (c). The claim
    holds when a's interval lies above b's and c's and above the repeat-noise floor. ``n_random`` must be >= 1.
    """
    if n_random < 1:
        raise MetricError("check_claim compares with random sets: n_random must be at least 1.")
    frame, eff, names = _ablation_with_effects(model, tokenizer, corpus, experts, by=by, labels=labels,
                                               text_column=text_column, mode=mode, n_random=n_random,
                                               fp32_floor=fp32_floor, n_boot=n_boot, ci=ci, batch_size=batch_size,
                                               max_length=max_length, max_tokens=max_tokens, seed=seed,
                                               progress=progress)
    return _claim_from(eff, names, n_random, frame, experts=frame.attrs["experts"], by=by, value=label_value,
                       mode=mode, ci=ci, seed=seed)


def _claim_from(eff: _Effects, names: list[str], n_random: int, frame: pd.DataFrame, *, experts: dict[int, list[int]],
                by: str, value: Any, mode: str, ci: float, seed: int) -> CausalClaim:
    """The verdict of ``check_claim`` from accumulated sums: conditions ``names`` first, then ``n_random`` sets."""
    label_value = value
    values = eff.values.tolist()
    if label_value not in values:
        raise MetricError(f"{by}={label_value!r} has no token in this corpus; its values are {values}.")
    if len(values) < 2:
        raise MetricError(f"the corpus has only {by}={label_value!r}; the claim needs other {by} values to compare.")
    v = values.index(label_value)
    one = np.array([v])
    rest = np.array([i for i in range(len(values)) if i != v])
    target = Effect(*_interval(eff.ratio(0, one), ci))
    others = Effect(*_interval(eff.ratio(0, rest), ci))
    noise = Effect(*_interval(eff.ratio(1, one), ci))
    fp32 = Effect(*_interval(eff.ratio(2, one), ci)) if NOISE_FP32 in names else None
    n_fixed = len(names)
    per_set = np.stack([eff.ratio(n_fixed + s, one) for s in range(n_random)])
    random = Effect(*_random_interval(per_set, ci, seed))
    beats = float(np.mean(per_set[:, 0] < target.delta))
    reasons = []
    if not target.ci_low > random.ci_high:
        reasons.append(f"its interval's low end {target.ci_low:+.3f} is not above the random sets' high end "
                       f"{random.ci_high:+.3f}")
    if not target.ci_low > others.ci_high:
        reasons.append(f"its interval's low end {target.ci_low:+.3f} is not above the other values' high end "
                       f"{others.ci_high:+.3f}")
    floor = max(abs(noise.delta), abs(noise.ci_high) if np.isfinite(noise.ci_high) else 0.0)
    if not target.ci_low > floor:
        reasons.append(f"its interval's low end {target.ci_low:+.3f} is not above the noise floor {floor:.3g}")
    return CausalClaim(experts=experts, by=by, value=label_value, mode=mode, target=target,
                       others=others, random=random, noise=noise, noise_fp32=fp32, beats_random=beats,
                       n_random=n_random, holds=not reasons, reasons=reasons, frame=frame)


def _ablation_with_effects(model: Any, tokenizer: Any, corpus: Any, experts: Experts, **kw: Any
                           ) -> tuple[pd.DataFrame, _Effects, list[str]]:
    """``ablation_effect`` that also hands back the accumulated sums (for pooled comparisons)."""
    import torch

    layout = _moe_layout(model)
    target = _check_experts(experts, layout)
    if kw["n_random"] < 0:
        raise MetricError(f"n_random must be >= 0, got {kw['n_random']}.")
    sets = _random_sets(target, layout, kw["n_random"], np.random.default_rng(kw["seed"]))
    conditions = [_ablated(model, target, kw["mode"]), _repeat(model)]
    names = ["ablated", NOISE_REPEAT]
    ref = None
    if kw["fp32_floor"] and _model_dtype(model) not in (None, torch.float32):
        ref = copy.deepcopy(model).to(torch.float32)
        conditions.append(_repeat(ref))
        names.append(NOISE_FP32)
    conditions += [_ablated(model, s, kw["mode"]) for s in sets]
    eff = _run(model, tokenizer, corpus, conditions, by=kw["by"], labels=kw["labels"], text_column=kw["text_column"],
               batch_size=kw["batch_size"], max_length=kw["max_length"], max_tokens=kw["max_tokens"],
               n_boot=kw["n_boot"], seed=kw["seed"], progress=kw["progress"],
               desc=f"ablation ({len(conditions) + 1} forwards a batch)")
    del ref
    frame = _effect_frame(eff, names, len(sets), kw["by"], kw["ci"], kw["seed"],
                          attrs={"experts": target, "mode": kw["mode"], "random_sets": sets, "n_boot": kw["n_boot"],
                                 "ci": kw["ci"]})
    return frame, eff, names


# ---------------------------------------------------------------------------------------------- matrix
@dataclass
class AblationMatrix:
    """Several expert sets ablated over one corpus (one shared clean forward per batch).

    ``frame``: one row per (``set``, ``mode``, evaluated ``<by>`` value) with ``delta, ci_low, ci_high,
    abs_delta`` of the ablation, ``random, random_low, random_high`` (the random sets' mean effect on that value,
    first mode only; NaN for the others), ``noise`` (repeat floor), ``nll_clean, tokens, docs``.
    ``claims``: ``{set: CausalClaim}`` for the first mode, each equal to ``check_claim(..., experts=sets[set],
    label_value=set)`` with the same settings (when the set's name is a value of ``by``; other sets have none).
    ``random_sets``: ``{set: [experts, ...]}`` the control sets drawn.
    """

    frame: pd.DataFrame
    claims: dict[Any, CausalClaim]
    random_sets: dict[Any, list[dict[int, list[int]]]]
    modes: tuple[str, ...]
    by: str

    def matrix(self, value: str = "delta", mode: str | None = None) -> pd.DataFrame:
        """``[set x evaluated value]`` table of one column (``delta``, ``ci_low``, ``random``, ...) for ``mode``."""
        mode = self.modes[0] if mode is None else mode
        if mode not in self.modes:
            raise MetricError(f"mode {mode!r} was not run; modes: {list(self.modes)}.")
        if value not in self.frame.columns:
            raise MetricError(f"no column {value!r}; columns: {list(self.frame.columns)}.")
        sub = self.frame[self.frame["mode"] == mode]
        sets = list(dict.fromkeys(sub["set"]))
        values = list(dict.fromkeys(sub[self.by]))
        return sub.pivot(index="set", columns=self.by, values=value).reindex(index=sets, columns=values)


def ablation_matrix(
    model: Any,
    tokenizer: Any,
    corpus: Any,
    sets: Mapping[Any, Experts],
    *,
    by: str = "lang",
    labels: Mapping[str, Sequence[Any]] | None = None,
    text_column: str = "text",
    modes: Sequence[str] = ("reroute",),
    n_random: int = 5,
    fp32_floor: bool = True,
    n_boot: int = 200,
    ci: float = 0.95,
    batch_size: int = 16,
    max_length: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AblationMatrix:
    """Ablate each of ``sets`` (``{name: {layer: [expert, ...]}}``, e.g. one per language) and measure every
    value of ``by``: the ablation matrix (ablated set x evaluated value) with bootstrap intervals over texts.

    One streamed pass; per batch: the clean forward, the repeat-noise forward (and the fp32 copy for a model in
    another dtype), each set in each of ``modes``, and ``n_random`` random sets of each set's size and layers
    (under ``modes[0]``). Forwards per batch: ``2 + len(sets) * (len(modes) + n_random)`` (+1 for fp32).
    Random sets of a set are drawn as ``check_claim`` draws them (``seed``), so ``claims[name]`` equals
    ``check_claim(model, tokenizer, corpus, sets[name], name, ...)`` with the same settings.
    """
    import torch

    if not isinstance(sets, Mapping) or not sets:
        raise MetricError(f"sets must be a non-empty mapping {{name: {{layer: [expert, ...]}}}}, got {sets!r}.")
    modes = tuple(modes)
    if not modes or len(set(modes)) != len(modes):
        raise MetricError(f"modes must be distinct modes, e.g. ('reroute', 'zero'); got {modes!r}.")
    from ..intervene import MODES

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise MetricError(f"unknown modes {bad}; modes: {list(MODES)}.")
    if n_random < 1:
        raise MetricError("ablation_matrix compares with random sets: n_random must be at least 1.")
    layout = _moe_layout(model)
    targets = {name: _check_experts(es, layout, what=f"sets[{name!r}]") for name, es in sets.items()}
    conditions = [_repeat(model)]
    names = [NOISE_REPEAT]
    ref = None
    if fp32_floor and _model_dtype(model) not in (None, torch.float32):
        ref = copy.deepcopy(model).to(torch.float32)
        conditions.append(_repeat(ref))
        names.append(NOISE_FP32)
    fixed = list(range(len(conditions)))
    ablated: dict[tuple[Any, str], int] = {}
    for mode in modes:
        for name, target in targets.items():
            ablated[(name, mode)] = len(conditions)
            conditions.append(_ablated(model, target, mode))
    drawn: dict[Any, list[dict[int, list[int]]]] = {}
    randoms: dict[Any, list[int]] = {}
    for name, target in targets.items():
        drawn[name] = _random_sets(target, layout, n_random, np.random.default_rng(seed))
        randoms[name] = list(range(len(conditions), len(conditions) + n_random))
        conditions += [_ablated(model, s, modes[0]) for s in drawn[name]]
    eff = _run(model, tokenizer, corpus, conditions, by=by, labels=labels, text_column=text_column,
               batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, n_boot=n_boot, seed=seed,
               progress=progress, desc=f"ablation matrix ({len(conditions) + 1} forwards a batch)")
    del ref
    claim_names = ["ablated", *names]
    values = eff.values.tolist()
    rows: list[dict[str, Any]] = []
    claims: dict[Any, CausalClaim] = {}
    for name, target in targets.items():
        sub = eff.take([ablated[(name, modes[0])], *fixed, *randoms[name]])
        frame = _effect_frame(sub, claim_names, n_random, by, ci, seed,
                              attrs={"experts": target, "mode": modes[0], "random_sets": drawn[name],
                                     "n_boot": n_boot, "ci": ci})
        if name in values and len(values) > 1:
            claims[name] = _claim_from(sub, claim_names, n_random, frame, experts=target, by=by, value=name,
                                       mode=modes[0], ci=ci, seed=seed)
        random = frame[frame["condition"] == "random"].set_index(by)
        noise = frame[frame["condition"] == NOISE_REPEAT].set_index(by)
        for mode in modes:
            c = ablated[(name, mode)]
            for v, value in enumerate(values):
                den = eff.den[v, 0]
                point, lo, hi = _interval(eff.ratio(c, np.array([v])), ci)
                first = mode == modes[0]
                rows.append({"set": name, "mode": mode, by: value, "delta": point, "ci_low": lo, "ci_high": hi,
                             "abs_delta": eff.absnum[v, c] / den if den else np.nan,
                             "random": random.at[value, "delta"] if first else np.nan,
                             "random_low": random.at[value, "ci_low"] if first else np.nan,
                             "random_high": random.at[value, "ci_high"] if first else np.nan,
                             "noise": noise.at[value, "delta"],
                             "nll_clean": eff.clean[v, 0] / den if den else np.nan, "tokens": int(den),
                             "docs": int(eff.docs[v])})
    frame = pd.DataFrame(rows)
    frame.attrs.update({"modes": modes, "n_random": n_random, "n_boot": n_boot, "ci": ci,
                        "experts": targets, "noise_conditions": names})
    return AblationMatrix(frame=frame, claims=claims, random_sets=drawn, modes=modes, by=by)


# ---------------------------------------------------------------------------------------------- steering
def _activation_counts(source: TraceSource, layers: list[int]) -> tuple[np.ndarray, int, int, tuple[int, ...]]:
    """(counts [layers, E] of tokens with each expert among their slots, tokens, E, trace layers)."""
    total: np.ndarray | None = None
    tokens = 0
    num_experts = 0
    trace_layers: tuple[int, ...] = ()
    for chunk in chunks(source):
        trace_layers = tuple(chunk.layers)
        unknown = [x for x in layers if x not in chunk.layers]
        if unknown:
            raise MetricError(f"layers {unknown} are not in the trace; its layers are {list(chunk.layers)}.")
        idx = [chunk.layer_index(x) for x in layers]
        ids = chunk.expert_ids[:, idx, :]
        c = layer_expert_counts(ids, chunk.num_experts)
        total = c if total is None else total + c
        tokens += chunk.num_tokens
        num_experts = chunk.num_experts
    assert total is not None
    return total, tokens, num_experts, trace_layers


def steering_set(trace_a: TraceSource, trace_b: TraceSource, layer: int | Sequence[int], *,
                 top: int | None = 4) -> pd.DataFrame:
    """SteerMoE's expert choice: the risk difference of activation rates between two traces (paired inputs).

    p_a(e) is the share of ``trace_a``'s tokens with expert e among their top-k at the layer (p_b likewise);
    risk difference = p_a - p_b. Experts with the largest positive difference are the ones to promote to move
    behaviour towards A, the most negative ones to suppress. Columns: ``layer, expert, rate_a, rate_b,
    risk_diff, steer`` (``"promote"`` for the ``top`` largest positive differences, ``"suppress"`` for the
    ``top`` most negative, ``""`` otherwise; all experts marked by sign when ``top`` is None), sorted by layer
    then risk difference (descending). Attrs: ``tokens_a, tokens_b``.
    """
    layers = [int(layer)] if isinstance(layer, (int, np.integer)) else [int(x) for x in layer]
    if not layers:
        raise MetricError("steering_set needs at least one layer.")
    if top is not None and (isinstance(top, bool) or int(top) < 1):
        raise MetricError(f"top must be a positive number of experts (or None), got {top!r}.")
    ca, na, ea, _ = _activation_counts(trace_a, layers)
    cb, nb, eb, _ = _activation_counts(trace_b, layers)
    if ea != eb:
        raise MetricError(f"the two traces disagree on the number of experts ({ea} vs {eb}): steering needs the "
                          "same model for both.")
    rate_a, rate_b = ca / na, cb / nb
    rd = rate_a - rate_b
    rows = []
    for li, lay in enumerate(layers):
        order = np.argsort(-rd[li], kind="stable")
        pos = [e for e in order if rd[li, e] > 0]
        neg = [e for e in order[::-1] if rd[li, e] < 0]
        if top is not None:
            pos, neg = pos[: int(top)], neg[: int(top)]
        promote, suppress = set(pos), set(neg)
        for e in order:
            rows.append({"layer": lay, "expert": int(e), "rate_a": rate_a[li, e], "rate_b": rate_b[li, e],
                         "risk_diff": rd[li, e],
                         "steer": "promote" if e in promote else "suppress" if e in suppress else ""})
    df = pd.DataFrame(rows)
    df.attrs.update({"tokens_a": na, "tokens_b": nb})
    return df


def steering_bias(steering: pd.DataFrame, delta: float, *, suppress: bool = True) -> dict[int, dict[int, float]]:
    """``intervene(model, bias=...)`` argument from a ``steering_set`` frame: +delta on the experts to promote,
    -delta on those to suppress (when ``suppress``)."""
    need = {"layer", "expert", "steer"}
    if not need <= set(steering.columns):
        raise MetricError(f"expected a steering_set frame with columns {sorted(need)}, got {list(steering.columns)}.")
    out: dict[int, dict[int, float]] = {}
    for layer, expert, steer in steering[["layer", "expert", "steer"]].itertuples(index=False):
        if steer == "promote" or (suppress and steer == "suppress"):
            out.setdefault(int(layer), {})[int(expert)] = float(delta) if steer == "promote" else -float(delta)
    return out
