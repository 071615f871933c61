"""Interventions on routing: ablate, ban, force and steer experts inside a ``with`` block.

    with mr.intervene(model, ablate={3: [5, 9]}):                 # reroute (ban): tokens get their next choice
        model(**batch)
    with mr.intervene(model, ablate={3: [5]}, mode="zero"):       # expert 5's output removed, weights kept
    with mr.intervene(model, force={3: [5]}):                     # expert 5 joins every token's top-k
    with mr.intervene(model, bias={3: {5: 2.0}}):                 # steering offset on 5's selection score
    with mr.intervene(model, ablate={3: [5]}, where=mask):        # only where mask [batch, seq] is True

How it acts (see ``readings.py`` for the rules):

- ``reroute``, ``force`` and ``bias`` re-select experts: a forward hook on each touched layer's **router**
  replays the family's own selection rule on edited selection scores and replaces the router's (ids, weights),
  so the experts module runs what was chosen and ``mr.capture`` (which reads the experts' inputs) records it.
  The replay on unedited scores is checked to be bit-identical to the router's own output on the first call of
  each layer; a mismatch refuses the block. The router's logits are returned unchanged.
- ``zero`` and ``renormalize`` keep the selection: a forward pre-hook on the **experts** module (run before any
  other pre-hook, so a capture sees the result) sets the ablated experts' slot weights to 0 and, for
  ``renormalize``, rescales the surviving weights of the token to the original slot-weight sum.
- ``where`` restricts every edit to some tokens: a bool ``[batch, seq]`` tensor (columns are positions in the
  full sequence; columns past its width, e.g. later ``generate()`` steps, are not intervened), or a callable
  ``where(input_ids=[batch, seq] | None, positions=[batch, seq], phase="prefill" | "decode") -> bool [batch, seq]``
  evaluated on every forward call. Edits never leak across batch rows (row ``t`` of the flattened router input is
  ``(t // seq, t % seq)``).

Hooks never touch parameters and are removed in ``finally``: outside the block the model is bit-identical.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, MoELayer, _model_types, find_moe_layers, resolve_adapter
from .capture import _CALL_SIGS, _config_top_k, _past_length, _read_experts_args
from .errors import InterventionError
from .readings import RULES, Edit, Reading, reading_for

MODES = ("reroute", "zero", "renormalize")
Where = torch.Tensor | Callable[..., Any] | None


@dataclass
class _Plan:
    """What to do at one MoE layer."""

    moe: MoELayer
    ban: list[int] = field(default_factory=list)  # reroute: removed from selection
    drop: list[int] = field(default_factory=list)  # zero / renormalize: output removed
    force: list[int] = field(default_factory=list)
    bias: dict[int, float] = field(default_factory=dict)

    @property
    def reselects(self) -> bool:
        return bool(self.ban or self.force or self.bias)


@dataclass
class _CallInfo:
    batch: int
    seq: int
    rows: torch.Tensor | None  # bool [batch * seq] on the CPU, None = every token
    _on: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def rows_on(self, device: torch.device) -> torch.Tensor | None:
        if self.rows is None:
            return None
        if device not in self._on:
            self._on[device] = self.rows.to(device, non_blocking=True)
        return self._on[device]


class Intervention:
    """What ``intervene`` installed; yielded by the ``with`` block.

    Attributes: ``family`` (model_type), ``rule`` (selection rule name or None when nothing re-selects),
    ``mode``, ``layers`` (touched decoder layers), ``calls`` (forward calls of the model seen), ``verified``
    (layers whose replay was checked bit-identical to the router).
    """

    def __init__(self, model: nn.Module, family: str, reading: Reading | None, mode: str, plans: dict[int, _Plan],
                 where: Where) -> None:
        self.model = model
        self.family = family
        self.reading = reading
        self.rule = reading.rule if reading is not None and any(p.reselects for p in plans.values()) else None
        self.mode = mode
        self.plans = plans
        self.layers = tuple(sorted(plans))
        self.where = where
        self.calls = 0
        self.verified: set[int] = set()
        self._call: _CallInfo | None = None
        self._fired: set[int] = set()
        self._edits: dict[tuple[int, torch.device], Edit] = {}
        self._drops: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Intervention(family={self.family!r}, mode={self.mode!r}, layers={list(self.layers)})"

    # ---- the model call
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._fired.clear()
        self._call = _describe(module, args, kwargs, self.where)
        return None

    def _on_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._call = None
        self.calls += 1
        missing = [la for la in self.layers if la not in self._fired]
        if missing:
            raise InterventionError(
                f"the interventions on layers {missing} did not run during this forward of the {self.family} "
                "model (the hooked router/experts modules were bypassed: kernels from the hub "
                "(use_kernels=True), torch.compile before intervene, or a truncated model). Load the model "
                "without kernels and enter intervene() before compiling."
            )
        return None

    def _rows(self, n: int, device: torch.device, layer: int) -> torch.Tensor | None:
        if self.where is None:
            return None
        call = self._call
        if call is None:
            raise InterventionError(
                "intervene(where=...) reads the batch layout from the call of the model you passed; call that "
                "model object (not a submodule) inside the block."
            )
        if n != call.batch * call.seq:
            raise InterventionError(
                f"layer {layer}: the router saw {n} rows but the call had batch {call.batch} x seq {call.seq}; "
                f"where= cannot be mapped onto tokens for this {self.family} model."
            )
        return call.rows_on(device)

    # ---- the per-layer tensors, made once per device
    def _edit(self, layer: int, device: torch.device, num: int) -> Edit:
        key = (layer, device)
        if key not in self._edits:
            plan = self.plans[layer]

            def mask(ids: list[int]) -> torch.Tensor | None:
                if not ids:
                    return None
                m = torch.zeros(num, dtype=torch.bool)
                m[ids] = True
                return m.to(device)

            offset = None
            if plan.bias:
                offset = torch.zeros(num, dtype=torch.float32)
                for e, d in plan.bias.items():
                    offset[e] = d
                offset = offset.to(device)
            self._edits[key] = Edit(ban=mask(plan.ban), force=mask(plan.force), offset=offset)
        return self._edits[key]

    # ---- hooks
    def _router_hook(self, layer: int):
        reading = self.reading
        assert reading is not None

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            self._fired.add(layer)
            if not isinstance(output, (tuple, list)) or len(output) <= max(reading.logits_at, reading.weights_at,
                                                                         reading.ids_at):
                raise InterventionError(
                    f"layer {layer}: the {self.family} router returned {type(output).__name__}, not the "
                    f"(logits, weights, ids) tuple the {reading.rule} replay expects."
                )
            logits, w0, ids0 = output[reading.logits_at], output[reading.weights_at], output[reading.ids_at]
            params = reading.params(module)
            if layer not in self.verified:
                _verify(self.family, reading, layer, logits, params, w0, ids0)
                self.verified.add(layer)
            edit = self._edit(layer, logits.device, logits.shape[-1])
            ids1, w1 = reading.function(logits, params, edit)
            rows = self._rows(ids0.shape[0], ids0.device, layer)
            ids1, w1 = ids1.to(ids0.dtype), w1.to(w0.dtype)
            if rows is not None:
                ids1 = torch.where(rows[:, None], ids1, ids0)
                w1 = torch.where(rows[:, None], w1, w0)
            out = list(output)
            out[reading.ids_at], out[reading.weights_at] = ids1, w1
            return tuple(out) if isinstance(output, tuple) else out

        return hook

    def _experts_hook(self, layer: int, sig: inspect.Signature, renormalize: bool, num: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._fired.add(layer)
            index, weights = _read_experts_args(args, kwargs, sig)
            key = (layer, index.device)
            if key not in self._drops:
                self._drops[key] = torch.tensor(self.plans[layer].drop, dtype=index.dtype, device=index.device)
            hit = torch.isin(index, self._drops[key])
            w = weights.masked_fill(hit, 0)
            if renormalize:
                w32, s0 = w.to(torch.float32), weights.to(torch.float32).sum(dim=-1, keepdim=True)
                s1 = w32.sum(dim=-1, keepdim=True)
                w = torch.where(s1 > 0, w32 * (s0 / s1.clamp_min(torch.finfo(torch.float32).tiny)), w32)
                w = w.to(weights.dtype)
            rows = self._rows(index.shape[0], index.device, layer)
            if rows is not None:
                w = torch.where(rows.view(-1, *([1] * (w.dim() - 1))), w, weights)
            return _replace_weights(args, kwargs, sig, w)

        return hook


# ---------------------------------------------------------------------------------------------- helpers
def _replace_weights(args: tuple, kwargs: dict, sig: inspect.Signature, w: torch.Tensor) -> tuple[tuple, dict]:
    if len(args) >= 3:
        return (args[0], args[1], w, *args[3:]), kwargs
    names = list(sig.parameters)
    name = names[2]
    if len(args) > 2:
        args = (*args[:2], w, *args[3:])
    else:
        kwargs = {**kwargs, name: w}
    return args, kwargs


def _verify(family: str, reading: Reading, layer: int, logits: torch.Tensor, params: dict[str, Any],
            w0: torch.Tensor, ids0: torch.Tensor) -> None:
    """Refuse unless the replay on unedited scores reproduces the router's own (ids, weights) bit for bit."""
    ids, w = reading.function(logits, params)
    same = ids.shape == ids0.shape and torch.equal(ids, ids0) and torch.equal(w.to(w0.dtype), w0)
    if not same and reading.unsorted and ids.shape == ids0.shape:  # slot order is not score order: compare sets
        a, pa = ids.sort(dim=-1)
        b, pb = ids0.sort(dim=-1)
        same = torch.equal(a, b) and torch.equal(w.gather(-1, pa).to(w0.dtype), w0.gather(-1, pb))
    if not same:
        raise InterventionError(
            f"layer {layer}: replaying the {family} router's selection rule ({reading.rule}) on its own logits "
            "does not reproduce its expert ids and weights exactly, so re-selecting experts would not be "
            "faithful for this model (a custom or patched router?). zero/renormalize ablation still works."
        )


def _describe(module: nn.Module, args: tuple, kwargs: dict, where: Where) -> _CallInfo:
    sig = _CALL_SIGS.get(type(module))
    if sig is None:
        sig = _CALL_SIGS[type(module)] = inspect.signature(module.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    extra = bound.pop("kwargs", None)
    if isinstance(extra, dict):
        bound.update(extra)
    input_ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
    if isinstance(input_ids, torch.Tensor):
        shape = tuple(input_ids.shape)
    elif isinstance(embeds, torch.Tensor):
        shape = tuple(embeds.shape[:2])
    else:
        if where is None:
            return _CallInfo(batch=0, seq=0, rows=None)
        raise InterventionError("intervene(where=...) needs the model to be called with input_ids or inputs_embeds.")
    if len(shape) == 1:
        shape = (1, shape[0])
    batch, seq = int(shape[0]), int(shape[1])
    if where is None:
        return _CallInfo(batch=batch, seq=seq, rows=None)
    mask = bound.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        offset = int(mask.shape[1]) - seq
        positions = (mask.to(torch.int64).cumsum(dim=1) - 1)[:, -seq:].clamp_min(0).cpu()
    else:
        offset = _past_length(bound)
        position_ids = bound.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == seq:
            positions = position_ids.expand(batch, seq).cpu()
        else:
            positions = (offset + torch.arange(seq))[None, :].expand(batch, seq)
    phase = "decode" if offset > 0 else "prefill"
    if isinstance(where, torch.Tensor):
        if where.shape[0] != batch:
            raise InterventionError(
                f"where mask has {where.shape[0]} rows but the model was called with batch {batch}; give one "
                "mask row per batch row (or a callable)."
            )
        cols = where.shape[1]
        rows = torch.zeros((batch, seq), dtype=torch.bool)
        lo, hi = min(offset, cols), min(offset + seq, cols)
        if hi > lo:
            rows[:, lo - offset: hi - offset] = where[:, lo:hi].cpu()
    else:
        token_ids = input_ids.reshape(batch, seq).cpu() if isinstance(input_ids, torch.Tensor) else None
        got = where(input_ids=token_ids, positions=positions, phase=phase)
        rows = torch.as_tensor(got)
        if rows.dtype != torch.bool or tuple(rows.shape) != (batch, seq):
            raise InterventionError(
                f"the where callable returned {rows.dtype} {tuple(rows.shape)} for a call of batch {batch} x seq "
                f"{seq} ({phase}); it must return a bool tensor of shape [batch, seq]."
            )
        rows = rows.cpu()
    return _CallInfo(batch=batch, seq=seq, rows=rows.reshape(-1))


def _check_where(where: Where) -> Where:
    if where is None or callable(where):
        return where
    if isinstance(where, torch.Tensor) or hasattr(where, "__array__"):
        t = torch.as_tensor(where)
        if t.dtype != torch.bool or t.dim() != 2:
            raise InterventionError(
                f"where must be a bool [batch, seq] mask or a callable; got a {t.dtype} tensor of shape "
                f"{tuple(t.shape)}."
            )
        return t.cpu()
    raise InterventionError(f"where must be a bool [batch, seq] mask or a callable; got {type(where).__name__}.")


def _as_int(x: Any) -> int | None:
    """``x`` as an int if it is an integer (Python, NumPy or 0-d tensor, not bool), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _layer_of(spec_name: str, layer: Any, by_layer: dict[int, MoELayer]) -> MoELayer:
    la = _as_int(layer)
    if la is None or la not in by_layer:
        raise InterventionError(
            f"{spec_name}: layers [{layer!r}] are not MoE layers of this model; MoE layers: {sorted(by_layer)}."
        )
    return by_layer[la]


def _experts_of(spec_name: str, moe: MoELayer, experts: Any) -> list[int]:
    if isinstance(experts, (int, str)) or not isinstance(experts, (Sequence, set, frozenset, range, torch.Tensor)):
        raise InterventionError(
            f"{spec_name}[{moe.layer}] must be a list of expert ids, e.g. {{{moe.layer}: [0, 3]}}; got {experts!r}."
        )
    out = []
    for e in (experts.tolist() if isinstance(experts, torch.Tensor) else experts):
        e = _as_int(e)
        if e is None or not 0 <= e < moe.num_experts:
            raise InterventionError(
                f"{spec_name}[{moe.layer}]: expert {e!r} does not exist; layer {moe.layer} has experts "
                f"0..{moe.num_experts - 1}."
            )
        if e not in out:
            out.append(int(e))
    return out


def _plans(model: nn.Module, moe_layers: list[MoELayer], ablate: Mapping | None, mode: str, force: Mapping | None,
           bias: Mapping | None) -> dict[int, _Plan]:
    by_layer = {m.layer: m for m in moe_layers}
    plans: dict[int, _Plan] = {}

    def plan(moe: MoELayer) -> _Plan:
        return plans.setdefault(moe.layer, _Plan(moe=moe))

    for name, spec in (("ablate", ablate), ("force", force), ("bias", bias)):
        if spec is not None and not isinstance(spec, Mapping):
            raise InterventionError(f"{name} must be a dict {{layer: ...}}; got {type(spec).__name__}.")
    for layer, experts in (ablate or {}).items():
        moe = _layer_of("ablate", layer, by_layer)
        ids = _experts_of("ablate", moe, experts)
        if ids:
            (plan(moe).ban if mode == "reroute" else plan(moe).drop).extend(ids)
    for layer, experts in (force or {}).items():
        moe = _layer_of("force", layer, by_layer)
        ids = _experts_of("force", moe, experts)
        if ids:
            plan(moe).force.extend(ids)
    for layer, deltas in (bias or {}).items():
        moe = _layer_of("bias", layer, by_layer)
        if not isinstance(deltas, Mapping):
            raise InterventionError(f"bias[{moe.layer}] must be a dict {{expert: delta}}; got {deltas!r}.")
        ids = _experts_of("bias", moe, list(deltas))
        deltas = {_as_int(e): d for e, d in deltas.items()}
        for e in ids:
            d = deltas[e]
            if isinstance(d, bool) or not isinstance(d, numbers.Real) or not math.isfinite(d):
                raise InterventionError(
                    f"bias[{moe.layer}][{e}] must be a finite number (use force= or ablate= for +-inf); got {d!r}."
                )
        if ids:
            plan(moe).bias.update({e: float(deltas[e]) for e in ids})
    k = _config_top_k(model)
    for p in plans.values():
        both = sorted(set(p.force) & (set(p.ban) | set(p.drop)))
        if both:
            raise InterventionError(f"layer {p.moe.layer}: experts {both} are both forced and ablated.")
        if k is not None and len(p.force) > k:
            raise InterventionError(
                f"layer {p.moe.layer}: {len(p.force)} experts forced but tokens choose only top-{k}; force at most {k}."
            )
        if k is not None and p.moe.num_experts - len(p.ban) < k:
            raise InterventionError(
                f"layer {p.moe.layer}: banning {len(p.ban)} of {p.moe.num_experts} experts leaves fewer than the "
                f"top-{k} each token needs; ban at most {p.moe.num_experts - k} (or use mode='zero')."
            )
    return plans


def _check_groups(family: str, reading: Reading, plans: dict[int, _Plan]) -> None:
    """Group-limited routers: refuse bans/forces the family's own rule cannot express."""
    if reading.rule != "sigmoid_bias_group":
        return
    for p in plans.values():
        if not (p.ban or p.force) or p.moe.router is None:
            continue
        params = reading.params(p.moe.router)
        n_group, topk_group, k = params["n_group"], params["topk_group"], params["top_k"]
        size = p.moe.num_experts // n_group
        avail = [size - sum(1 for e in p.ban if e // size == g) for g in range(n_group)]
        if any(size - a > 0 and a < 2 for a in avail) or sum(sorted(avail)[:topk_group]) < k:
            raise InterventionError(
                f"{family} layer {p.moe.layer}: mode 'reroute' banning {p.ban} leaves a group with fewer than 2 "
                f"experts (group scores are top-2 sums) or fewer than top-{k} experts in the {topk_group} kept "
                f"groups (available per group: {avail}); ban fewer experts per group, or use mode='zero'."
            )
        groups = {e // size for e in p.force}
        if len(groups) > topk_group:
            raise InterventionError(
                f"{family} layer {p.moe.layer}: forcing {p.force} needs {len(groups)} groups but the router keeps "
                f"only topk_group={topk_group}; force experts of at most {topk_group} groups."
            )


def _refuse_compiled(model: nn.Module) -> None:
    compiled = type(model).__name__ == "OptimizedModule" or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    )
    if compiled:
        raise InterventionError(
            "this model (or a submodule) was compiled with torch.compile; compiled graphs ignore hooks added "
            "later, so the intervention would silently not happen. Enter intervene() on the uncompiled model."
        )


# ---------------------------------------------------------------------------------------------- public API
@contextmanager
def intervene(
    model: nn.Module,
    *,
    ablate: Mapping[int, Sequence[int]] | None = None,
    mode: str = "reroute",
    force: Mapping[int, Sequence[int]] | None = None,
    bias: Mapping[int, Mapping[int, float]] | None = None,
    where: Where = None,
    adapter: Adapter | str | None = None,
) -> Iterator[Intervention]:
    """Ablate, ban, force or steer experts of ``model`` inside the ``with`` block.

    Args:
        model: a transformers MoE model (the object you call).
        ablate: ``{layer: [expert, ...]}`` experts to remove, how is set by ``mode``.
        mode: ``"reroute"`` (ban: selection as if the expert did not exist, the token gets its next choice),
            ``"zero"`` (its output removed, other slots keep their weights) or ``"renormalize"`` (removed, the
            surviving weights rescaled to the original slot-weight sum).
        force: ``{layer: [expert, ...]}`` experts put into every selected token's top-k (the lowest-ranked slots
            drop), weighted by the family's own normalisation.
        bias: ``{layer: {expert: delta}}`` steering offsets on the selection score (router logit for softmax
            routers, biased sigmoid score for DeepSeek-style routers); weights stay the family's own.
        where: only these tokens: a bool ``[batch, seq]`` mask or a callable of
            ``(input_ids, positions, phase)`` returning one (see the module docstring).
        adapter: override the adapter-table row (as in ``capture``).

    Yields an ``Intervention``. Raises ``InterventionError`` for unknown layers/experts, impossible requests, and
    families/modes that cannot be replayed faithfully.
    """
    if mode not in MODES:
        raise InterventionError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    row = resolve_adapter(model, adapter)
    moe_layers = find_moe_layers(model, row)
    family = next(iter(_model_types(model)), row.family) if row.family != "generic" else row.family
    where = _check_where(where)
    plans = _plans(model, moe_layers, ablate, mode, force, bias)
    found = reading_for([*_model_types(model), row.family, *row.aliases])
    reading = found[1] if found else None
    if any(p.reselects for p in plans.values()):
        what = "reroute" if any(p.ban for p in plans.values()) else ("force" if any(
            p.force for p in plans.values()) else "bias")
        if reading is None:
            raise InterventionError(
                f"{family}: mode {what!r} re-selects experts by replaying the router's selection rule, and "
                f"moe_routing has no faithful replay of the {family} router. Families with one: "
                f"{', '.join(sorted(RULES))}. mode='zero' / 'renormalize' ablation may still work here."
            )
        if _reading_name(row) != "experts_args":
            raise InterventionError(f"{family}: mode {what!r} is not supported for the {_reading_name(row)} reading.")
        for p in plans.values():
            if p.reselects and p.moe.router is None:
                raise InterventionError(
                    f"{family} layer {p.moe.layer}: no router module {row.router!r} next to {p.moe.name}; mode "
                    f"{what!r} cannot be applied."
                )
        _check_groups(family, reading, plans)
    if any(p.drop for p in plans.values()) and _reading_name(row) != "experts_args":
        raise InterventionError(
            f"{family}: mode {mode!r} changes the weights the experts module receives, but this family's experts "
            f"are read through {_reading_name(row)!r}; ablation is not supported for it."
        )
    if getattr(model, "_moe_routing_intervening", False):
        raise InterventionError(
            "this model is already inside an intervene() block; nested interventions are refused (pass all "
            "edits to one intervene call)."
        )
    _refuse_compiled(model)
    iv = Intervention(model, family, reading, mode, plans, where)
    handles = []
    model.__dict__["_moe_routing_intervening"] = True
    try:
        if plans:
            handles.append(model.register_forward_pre_hook(iv._on_call, with_kwargs=True))
            handles.append(model.register_forward_hook(iv._on_return, with_kwargs=True))
        for layer, p in plans.items():
            if p.reselects:
                assert p.moe.router is not None  # checked above
                handles.append(p.moe.router.register_forward_hook(iv._router_hook(layer)))
            if p.drop:
                sig = inspect.signature(p.moe.module.forward)
                handles.append(p.moe.module.register_forward_pre_hook(
                    iv._experts_hook(layer, sig, mode == "renormalize", p.moe.num_experts), with_kwargs=True,
                    prepend=True))
        yield iv
    finally:
        for h in handles:
            h.remove()
        model.__dict__.pop("_moe_routing_intervening", None)
        iv._call = None


def _reading_name(row: Any) -> str:
    """The name of an adapter row's reading (``Adapter.reading`` holds a ``Reading``)."""
    return str(getattr(row.reading, "name", row.reading))
