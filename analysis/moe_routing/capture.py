"""Capture what every router decided, with hooks that never change the model's outputs.

``with capture(model) as rec: model(**batch)`` installs

- a forward pre-hook and a forward hook on the model you call (they read ``input_ids``/``attention_mask``/
  cache position from the call itself, then collect the batch once the forward returns);
- per MoE layer, a hook chosen by the adapter table (``adapters.py``): by default a forward pre-hook on the
  experts module, which sees exactly the ``(top_k_index, top_k_weights)`` the experts are run with;
- with ``logits=True``, a forward hook on each router for its raw logits.

Records stay on the model's device during a forward (no per-layer synchronisation); at the end of each forward
they are copied to the host once. Padding tokens are dropped using the call's own attention mask. Hooks never
return a value and are always removed in ``finally``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import (
    Adapter,
    MoELayer,
    _is_transformers_model,
    find_moe_layers,
    resolve_adapter,
    unwrap_model,
    wrapper_error,
)
from .errors import (
    CaptureError,
    CompiledModelError,
    IncompleteCaptureError,
    UnsupportedGenerationError,
    UnsupportedModelError,
)
from .readings import (
    READINGS,
    read_doge_product_keys,
    read_experts_args,
    read_jetmoe_sorted,
    read_onehot_capacity,
    read_router_scores,
    read_skip_zero_weight,
)
from .trace import NO_EXPERT, RoutingTrace

# ---------------------------------------------------------------------------------------------- readings
# The read functions live in readings.py (each Reading of the adapter table holds its own); these names stay for
# code that imported them from here.
_read_experts_args = read_experts_args
_read_onehot_capacity = read_onehot_capacity
_read_skip_zero_weight = read_skip_zero_weight
_read_router_scores = read_router_scores
_read_jetmoe_sorted = read_jetmoe_sorted
_read_doge_product_keys = read_doge_product_keys
READERS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    name: r.read for name, r in READINGS.items() if r.hook == "pre"}
OUTPUT_READERS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    name: r.read for name, r in READINGS.items() if r.hook == "post"}


# ---------------------------------------------------------------------------------------------- the recorder
@dataclass
class _Call:
    """Facts of one forward call of the top model, gathered before it runs."""

    batch: int
    seq: int
    mask: torch.Tensor  # bool [batch, seq]: real tokens of this call (on the model's device until flushed)
    positions: torch.Tensor  # int [batch, seq]
    token_ids: torch.Tensor | None  # int [batch, seq]
    decode: bool
    encoder_skipped: bool = False  # encoder_outputs were passed: an MoE encoder legitimately did not run
    segments: np.ndarray | None = None  # int [batch, seq]: document index within a packed row (None: one per row)


@dataclass
class _Generate:
    """One ``generate()`` call in progress: its rows' documents, prompts and prompt lengths."""

    prompt_lengths: np.ndarray | None  # real prompt tokens per input row [prompts]
    prompt_tokens: list[np.ndarray] | None  # real prompt token ids per input row
    input_width: int | None  # width of the input_ids generate() was given (None: inputs_embeds)
    first_prompt: int  # prompt id of input row 0
    first_batch: int  # index into Recorder._batches of this call's first record
    docs: np.ndarray | None = None  # [rows] document of each generate row
    max_pos: np.ndarray | None = None  # [rows] highest position recorded so far
    rows_per_prompt: int = 1
    lengths: dict[int, int] = field(default_factory=dict)


@dataclass
class _Forward:
    """One forward of the top model, as recorded by its hooks: tensors still on the model's device."""

    call: _Call
    ids: list[torch.Tensor]  # per captured layer, int [batch*seq, k]
    weights: list[torch.Tensor]  # per captured layer, float [batch*seq, k]
    logits: list[torch.Tensor]  # per captured layer, float [batch*seq, E] (empty unless logits=True)


# Forwards kept on the device before their records are moved to the host in one copy (also at trace(), at the end
# of generate() and whenever the recorder is asked for counts): bounds device memory, amortises host copies.
FLUSH_EVERY = 64


class Recorder:
    """Collects routing decisions across forward calls; ``trace()`` returns them as a RoutingTrace.

    Each forward's records stay on the model's device (``_Forward``) until ``FLUSH_EVERY`` forwards are waiting
    or a result is asked for; they are then moved to the host in one copy and turned into arrays, runs of decode
    steps of the same shape in one vectorised pass.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, moe_layers: list[MoELayer], *, logits: bool,
                 model_name: str) -> None:
        self.model = model
        self.adapter = adapter
        self.moe_layers = moe_layers
        self.layers = tuple(m.layer for m in moe_layers)
        self.num_experts = max(m.num_experts for m in moe_layers)
        self.logits = logits
        self.model_name = model_name
        self._top_k = _config_top_k(model)
        self._call: _Call | None = None
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending_logits: dict[int, torch.Tensor] = {}
        self._raw: list[_Forward] = []
        self._batches: list[dict[str, np.ndarray]] = []
        self._next_doc = 0
        self._next_prompt = 0
        self._last_docs: np.ndarray | None = None
        self._gen: _Generate | None = None
        self.num_calls = 0
        self._tokens_recorded = 0

    @property
    def adapter_facts(self) -> dict[str, Any]:
        """The adapter row used (family, reading, rule, documentation fields) and the layers captured."""
        return {**self.adapter.facts, "layers": list(self.layers), "num_experts": self.num_experts}

    @property
    def top_k(self) -> int | None:
        """The largest number of slots per token seen (or the config's top-k before any forward)."""
        self._flush()
        return self._top_k

    @top_k.setter
    def top_k(self, value: int | None) -> None:
        self._top_k = value

    @property
    def tokens_recorded(self) -> int:
        """Real tokens recorded by all forwards so far (never decreases on clear)."""
        self._flush()
        return self._tokens_recorded

    # ---- bookkeeping used by capture_corpus
    def start_docs_at(self, doc_id: int) -> None:
        """The next new sequence gets this document id (then +1 per batch row)."""
        self._flush()
        self._next_doc = int(doc_id)

    @property
    def num_tokens(self) -> int:
        self._flush()
        return sum(len(b["doc_ids"]) for b in self._batches)

    def check_recorded(self, before: int, planned: int) -> None:
        """Raise unless the forwards since ``tokens_recorded == before`` recorded exactly ``planned`` tokens."""
        got = self.tokens_recorded - before
        if got != planned:
            raise IncompleteCaptureError(
                f"a forward was given {planned} real tokens but capture recorded {got}: this forward ran without "
                "the hooks (was the model compiled before capture? Install hooks first (enter capture), then "
                "compile), or the model called is not the one passed to capture(). Nothing of this batch is kept."
            )

    # ---- hooks (run per forward / per layer: no host synchronisation, no per-layer Python beyond a stash)
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending.clear()
        self._pending_logits.clear()
        self._call = _describe_call(module, args, kwargs)

    def _on_experts(self, layer: int, reader: Callable[..., tuple[torch.Tensor, ...]],
                    sig: inspect.Signature) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._call is None:
                return None
            index, weights = reader(args, kwargs, sig)
            self._stash(layer, index, weights)
            return None

        return hook

    def _on_router_scores(self, layer: int) -> Callable[[nn.Module, tuple, Any], None]:
        read = self.adapter.reading.read

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._call is None:
                return None
            k = self._top_k or int(getattr(module, "top_k", 1))
            index, weights, logits = read(module, output, k)
            self._stash(layer, index, weights)
            if self.logits and logits is not None:
                self._pending_logits[layer] = _keep(logits)
            return None

        return hook

    def _on_router(self, layer: int, out_index: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._call is None:
                return None
            logits = output[out_index] if isinstance(output, (tuple, list)) else output
            self._pending_logits[layer] = _keep(logits)
            return None

        return hook

    def _stash(self, layer: int, index: torch.Tensor, weights: torch.Tensor) -> None:
        if not (isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor)):
            raise CaptureError(
                f"layer {layer}: the router handed the experts {type(index).__name__}/{type(weights).__name__}, "
                "not tensors; this layout needs its own row in moe_routing.adapters."
            )
        if index.dim() != 2:
            index = index.reshape(-1, index.shape[-1]) if index.dim() > 1 else index[:, None]
        if weights.shape != index.shape:
            weights = weights.reshape(index.shape[0], -1)
            if weights.shape != index.shape:
                raise CaptureError(
                    f"layer {layer}: routing weights {tuple(weights.shape)} do not match expert ids "
                    f"{tuple(index.shape)}; the router returns something unexpected for the {self.adapter.family} "
                    "adapter."
                )
        self._pending[layer] = (_keep(index), _keep(weights))

    def _on_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is None:
            return None
        try:
            if self._check_complete(call):
                self._record(call)
        finally:
            self._pending.clear()
            self._pending_logits.clear()
        return None

    # ---- per forward: check what the hooks saw, keep it on the device
    def _check_complete(self, call: _Call) -> bool:
        """Whether this forward routed every captured layer (False: an MoE encoder legitimately skipped)."""
        if len(self._pending) == len(self.layers):
            return True
        missing = [m.layer for m in self.moe_layers if m.layer not in self._pending]
        if len(missing) == len(self.moe_layers) and call.encoder_skipped:
            return False  # a decoder pass of an encoder-decoder model given encoder_outputs: its MoE encoder did not run
        some = "" if len(missing) == len(self.moe_layers) else " (other layers did)"
        raise CompiledModelError(
            f"this forward ran without the hooks of MoE layers {missing}{some}: was the model compiled before "
            "capture? Install hooks first (enter capture), then compile; a graph compiled earlier (also for "
            "another instance of this model class) skips hooks added later (torch._dynamo.reset() drops it). "
            "A truncated model or a layer skipped at run time gives the same error."
        )

    def _record(self, call: _Call) -> None:
        """Check the row counts, start a generate()'s documents, keep the forward's tensors (no host copy)."""
        n_rows = call.batch * call.seq
        ids = [self._pending[la][0] for la in self.layers]
        for layer, idx in zip(self.layers, ids, strict=True):
            if idx.shape[0] != n_rows:
                raise CaptureError(
                    f"layer {layer} routed {idx.shape[0]} rows but the call had batch "
                    f"{call.batch} x seq {call.seq} = {n_rows} tokens; this model reshapes tokens in a way the "
                    "adapter does not know."
                )
        logits: list[torch.Tensor] = []
        if self.logits:
            if len(self._pending_logits) != len(self.layers):
                raise CaptureError("router logits were requested but some routers did not report them.")
            logits = [self._pending_logits[la] for la in self.layers]
        if self._gen is not None:
            self._start_generate_rows(self._gen, call)
        self._raw.append(_Forward(call, ids, [self._pending[la][1] for la in self.layers], logits))
        self.num_calls += 1
        if len(self._raw) >= FLUSH_EVERY:
            self._flush()

    # ---- records to host arrays
    def _flush(self) -> None:
        """Move the forwards kept on the device to the host (one copy) and turn them into record batches."""
        if not self._raw:
            return
        raw, self._raw = self._raw, []
        tensors: list[torch.Tensor] = []
        for f in raw:
            tensors += [*f.ids, *f.weights, *f.logits, f.call.mask, f.call.positions]
            if f.call.token_ids is not None:
                tensors.append(f.call.token_ids)
        host = iter(_to_host_many(tensors))
        n = len(self.layers)
        for f in raw:
            f.ids = [next(host) for _ in range(n)]
            f.weights = [next(host) for _ in range(n)]
            f.logits = [next(host) for _ in f.logits]
            f.call.mask, f.call.positions = next(host), next(host)
            if f.call.token_ids is not None:
                f.call.token_ids = next(host)
        i = 0
        while i < len(raw):  # runs of same-shape decode steps at once, anything else forward by forward
            j = i + 1
            if self._can_vectorise(raw[i]):
                key = _run_key(raw[i])
                while j < len(raw) and _run_key(raw[j]) == key:
                    j += 1
            if j - i > 1:
                self._collect_run(raw[i:j])
            else:
                self._collect(raw[i])
            i = j

    def _can_vectorise(self, f: _Forward) -> bool:
        return f.call.decode and len({t.shape[1] for t in f.ids}) == 1 and len({t.shape[1] for t in f.logits}) <= 1 \
            and (self._gen is None or self._gen.prompt_lengths is not None)

    def _collect(self, f: _Forward) -> None:
        """One forward's host records -> one record batch (ids, weights, documents, positions, phase, logits)."""
        call = f.call
        ids, w = self._routing_arrays(f.ids, f.weights)
        rows = np.flatnonzero(call.mask.reshape(-1).numpy())
        positions = call.positions.reshape(-1).numpy()[rows].astype(np.int32)
        row_of = rows // call.seq
        doc_ids, phase, prompt = self._documents(call, rows, row_of, positions)
        batch = {"expert_ids": ids[rows], "weights": w[rows], "doc_ids": doc_ids, "positions": positions,
                 "token_ids": _token_array(call.token_ids, rows), "phase": phase}
        if prompt is not None:
            batch["prompt"] = prompt
        if self.logits:
            batch["router_logits"] = _logit_array(f.logits, call.batch * call.seq)[rows]
        self._append(batch)

    def _collect_run(self, run: list[_Forward]) -> None:
        """Consecutive decode forwards of one shape -> one record batch, bookkeeping vectorised across them."""
        call = run[0].call
        n_rows, n_layers = call.batch * call.seq, len(self.layers)
        gen = self._gen
        mask = torch.stack([f.call.mask.reshape(-1) for f in run]).reshape(-1).numpy()
        rows = np.flatnonzero(mask)
        pos_all = torch.stack([f.call.positions.reshape(-1) for f in run]).reshape(-1).numpy()
        positions = pos_all[rows].astype(np.int32)
        step_of, row_of = np.divmod(rows, n_rows)
        row_of //= call.seq
        if gen is not None and not self._continues(gen, step_of * call.batch + row_of, positions, len(run),
                                                   call.batch):
            for f in run:  # a forward re-ran positions already recorded: the exact forward-by-forward path
                self._collect(f)
            return
        ids = torch.stack([t for f in run for t in f.ids]).view(len(run), n_layers, n_rows, -1)
        w = torch.stack([t.to(torch.float32) for f in run for t in f.weights]).view(len(run), n_layers, n_rows, -1)
        k = ids.shape[-1]
        if self._top_k is None or k > self._top_k:
            self._top_k = k
        ids_np = ids.transpose(1, 2).reshape(-1, n_layers, k).numpy().astype(np.int16)[rows]
        w_np = w.transpose(1, 2).reshape(-1, n_layers, k).numpy()[rows]
        if gen is not None:
            assert gen.docs is not None and gen.prompt_lengths is not None
            prompt_row = row_of // gen.rows_per_prompt
            phase = np.where(positions < gen.prompt_lengths[prompt_row], "prefill", "decode")
            doc_ids, prompt = gen.docs[row_of], (gen.first_prompt + prompt_row).astype(np.int64)
        else:
            doc_ids, prompt = self._row_docs(call, decode=True)[row_of], None
            phase = np.full(len(rows), "decode")
        tok = None if call.token_ids is None else torch.stack([f.call.token_ids.reshape(-1) for f in run
                                                               if f.call.token_ids is not None])
        batch = {"expert_ids": ids_np, "weights": w_np, "doc_ids": doc_ids, "positions": positions,
                 "token_ids": _token_array(tok if tok is None or len(tok) == len(run) else None, rows),
                 "phase": phase}
        if prompt is not None:
            batch["prompt"] = prompt
        if self.logits:
            lg = torch.stack([t for f in run for t in f.logits]).view(len(run), n_layers, n_rows, -1)
            batch["router_logits"] = lg.transpose(1, 2).reshape(-1, n_layers, lg.shape[-1]).to(
                torch.float32).numpy().astype(np.float16)[rows]
        self._append(batch)

    def _continues(self, gen: _Generate, slot: np.ndarray, positions: np.ndarray, steps: int, batch: int) -> bool:
        """Whether every forward of a run starts each row after what was recorded; if so, record its positions."""
        assert gen.max_pos is not None
        pos = positions.astype(np.int64)
        start = np.full(steps * batch, np.iinfo(np.int64).max, dtype=np.int64)
        end = np.full(steps * batch, -1, dtype=np.int64)
        np.minimum.at(start, slot, pos)
        np.maximum.at(end, slot, pos)
        seen = np.maximum.accumulate(np.vstack([gen.max_pos[None, :], end.reshape(steps, batch)]), axis=0)
        if (start.reshape(steps, batch) <= seen[:-1]).any():
            return False
        gen.max_pos[:] = seen[-1]
        return True

    def _routing_arrays(self, ids_l: list[torch.Tensor], w_l: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer host ids/weights -> int16 / float32 ``[tokens, layers, k]`` (shorter k padded with -1 / 0)."""
        ks = {idx.shape[1] for idx in ids_l}
        k = max(ks)
        if len(ks) == 1:  # one stack per batch instead of a copy per layer
            ids = torch.stack(ids_l, dim=1).numpy().astype(np.int16)
            w = torch.stack([x.to(torch.float32) for x in w_l], dim=1).numpy()
        else:  # layers with different k (hunyuan per-layer top-k): pad the shorter ones with empty slots
            n_rows = ids_l[0].shape[0]
            ids = np.full((n_rows, len(ids_l), k), NO_EXPERT, dtype=np.int16)
            w = np.zeros((n_rows, len(ids_l), k), dtype=np.float32)
            for j, (idx, wt) in enumerate(zip(ids_l, w_l, strict=True)):
                ids[:, j, : idx.shape[1]] = idx.numpy()
                w[:, j, : idx.shape[1]] = wt.to(torch.float32).numpy()
        if self._top_k is None or k > self._top_k:
            self._top_k = k
        return ids, w

    def _documents(self, call: _Call, rows: np.ndarray, row_of: np.ndarray, positions: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Document id, phase and (inside generate) prompt of each kept token of one forward."""
        if self._gen is not None:
            return self._generate_rows(call, row_of, positions)
        if call.segments is not None and not call.decode:  # packed rows: a document per position run
            seg = call.segments.reshape(-1)[rows]
            per_row = np.zeros(call.batch, dtype=np.int64)
            np.maximum.at(per_row, row_of, seg + 1)
            base = self._next_doc + np.concatenate([[0], np.cumsum(per_row)[:-1]])
            self._next_doc += int(per_row.sum())
            self._last_docs = base + per_row - 1  # a later decode step continues each row's last document
            return base[row_of] + seg, np.full(len(rows), "prefill"), None
        phase = np.full(len(rows), "decode" if call.decode else "prefill")
        return self._row_docs(call, decode=call.decode)[row_of], phase, None

    def _row_docs(self, call: _Call, *, decode: bool) -> np.ndarray:
        """The document of each row: a decode step continues the last forward's rows, else new documents."""
        if decode and self._last_docs is not None and len(self._last_docs) == call.batch:
            row_docs = self._last_docs
        else:
            row_docs = np.arange(self._next_doc, self._next_doc + call.batch, dtype=np.int64)
            self._next_doc += call.batch
        self._last_docs = row_docs
        return row_docs

    def _append(self, batch: dict[str, np.ndarray]) -> None:
        self._batches.append(batch)
        self._tokens_recorded += len(batch["doc_ids"])

    # ---- generate()
    def _wrap_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        """``model.generate`` for the duration of the capture: maps its forwards onto the returned sequences."""

        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._gen is not None:
                raise UnsupportedGenerationError("generate() called itself on the captured model; not supported.")
            self._check_generation_mode(kwargs)
            self._flush()
            self._gen = gen = self._start_generate(args, kwargs)
            try:
                out = generate(*args, **kwargs)
                self._flush()
            except BaseException:
                try:  # keep what the forwards that ran recorded, as before the failure
                    self._flush()
                except Exception:
                    self._raw.clear()
                raise
            finally:
                self._gen = None
            sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
            if isinstance(sequences, torch.Tensor):
                self._finish_generate(gen, sequences)
            return out

        return wrapped

    def _check_generation_mode(self, kwargs: dict) -> None:
        cfg = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        num_beams = kwargs.get("num_beams", getattr(cfg, "num_beams", 1)) or 1
        how = ("capture generate()'s inputs and the returned sequences instead: run generate outside capture, then "
               "`with capture(model) as rec: model(input_ids=out, attention_mask=out_mask)` records every position "
               "of every returned sequence once.")
        if int(num_beams) > 1:
            raise UnsupportedGenerationError(
                f"beam search (num_beams={num_beams}) is not supported inside capture: the cache reorders beams "
                f"between steps, so a beam slot's forwards are not one sequence. {how}"
            )
        if kwargs.get("assistant_model") is self.model:
            raise UnsupportedGenerationError(
                f"assisted decoding with the captured model as its own assistant mixes draft and verify forwards. {how}"
            )

    def _start_generate(self, args: tuple, kwargs: dict) -> _Generate:
        ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids", kwargs.get("inputs"))
        mask = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        lengths = tokens = width = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            width = ids.shape[1]
            real = mask.to(torch.bool).cpu() if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else \
                torch.ones(ids.shape, dtype=torch.bool)
            lengths = real.sum(dim=1).numpy().astype(np.int64)
            tokens = [row[r].numpy() for row, r in zip(ids.cpu(), real, strict=True)]
        elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            real = mask.to(torch.bool).cpu() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else \
                torch.ones(embeds.shape[:2], dtype=torch.bool)
            lengths = real.sum(dim=1).numpy().astype(np.int64)
        return _Generate(prompt_lengths=lengths, prompt_tokens=tokens, input_width=width,
                         first_prompt=self._next_prompt, first_batch=len(self._batches))

    def _generate_rows(self, call: _Call, row_of: np.ndarray, positions: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Documents, phases and prompts of one forward inside generate(); drops records it supersedes."""
        gen = self._gen
        assert gen is not None and gen.docs is not None and gen.max_pos is not None
        # A forward that starts at a position already recorded for a row replaces everything from there on:
        # use_cache=False re-runs the whole sequence, assisted decoding / prompt lookup re-run rejected drafts.
        start = np.full(call.batch, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(start, row_of, positions.astype(np.int64))
        redo = start <= gen.max_pos
        if redo.any():
            cut = np.full(call.batch, np.iinfo(np.int64).max, dtype=np.int64)
            cut[redo] = start[redo]
            self._drop_generated(gen, cut)
            gen.max_pos[redo] = start[redo] - 1
        np.maximum.at(gen.max_pos, row_of, positions.astype(np.int64))
        prompt_row = row_of // gen.rows_per_prompt
        if gen.prompt_lengths is not None:
            is_prompt = positions < gen.prompt_lengths[prompt_row]
        else:
            first = not self._batches[gen.first_batch:]
            is_prompt = np.full(len(positions), first)
        phase = np.where(is_prompt, "prefill", "decode")
        return gen.docs[row_of], phase, (gen.first_prompt + prompt_row).astype(np.int64)

    def _start_generate_rows(self, gen: _Generate, call: _Call) -> None:
        """At each forward inside generate(): the first one gives each row a document; the batch must not change."""
        if gen.docs is None:  # the first forward: one document per generate row
            gen.docs = np.arange(self._next_doc, self._next_doc + call.batch, dtype=np.int64)
            self._next_doc += call.batch
            gen.max_pos = np.full(call.batch, -1, dtype=np.int64)
            n_prompts = len(gen.prompt_lengths) if gen.prompt_lengths is not None else call.batch
            if call.batch % n_prompts:
                raise UnsupportedGenerationError(
                    f"generate() ran its first forward on {call.batch} rows for {n_prompts} prompts; capture cannot "
                    "tell which prompt each row continues."
                )
            gen.rows_per_prompt = call.batch // n_prompts
            self._next_prompt += n_prompts
        if call.batch != len(gen.docs):
            raise UnsupportedGenerationError(
                f"generate() changed its batch from {len(gen.docs)} to {call.batch} rows between forwards (a custom "
                "decoding loop?); capture cannot follow rows across that change."
            )

    def _drop_generated(self, gen: _Generate, cut: np.ndarray) -> None:
        """Drop this generate's records at positions >= ``cut[row]`` (one value per generate row)."""
        assert gen.docs is not None
        for i in range(gen.first_batch, len(self._batches)):
            b = self._batches[i]
            keep = b["positions"] < cut[b["doc_ids"] - gen.docs[0]]
            if not keep.all():
                self._tokens_recorded -= int((~keep).sum())
                self._batches[i] = {key: v[keep] for key, v in b.items()}

    def _finish_generate(self, gen: _Generate, sequences: torch.Tensor) -> None:
        """Keep each fed position of each returned sequence once; check the ids against the sequences."""
        if gen.docs is None:
            return  # no forward of the captured model ran (e.g. an encoder-decoder's decoder-only passes)
        seqs = sequences.cpu().numpy()
        if seqs.shape[0] != len(gen.docs) or gen.prompt_lengths is None:
            raise UnsupportedGenerationError(
                f"generate() returned {seqs.shape[0]} sequences for {len(gen.docs)} rows it ran; capture cannot "
                "map its forwards onto them."
            )
        new = seqs.shape[1] - (gen.input_width or 0)
        plen = np.repeat(gen.prompt_lengths, gen.rows_per_prompt)
        fed = plen + new - 1  # the last generated token is never fed back
        self._drop_generated(gen, fed)
        recs = [b for b in self._batches[gen.first_batch:] if len(b["doc_ids"])]
        docs = np.concatenate([b["doc_ids"] for b in recs]) if recs else np.zeros(0, np.int64)
        pos = np.concatenate([b["positions"] for b in recs]) if recs else np.zeros(0, np.int32)
        tok = np.concatenate([b["token_ids"] for b in recs]) if recs else np.zeros(0, np.int32)
        for r, d in enumerate(gen.docs):
            sel = docs == d
            got = np.sort(pos[sel])
            if len(got) != fed[r] or (got != np.arange(fed[r])).any():
                raise UnsupportedGenerationError(
                    f"generate() row {r}: capture recorded positions {got.tolist()[:20]} but the returned sequence "
                    f"fed positions 0..{fed[r] - 1}; this generation mode is not supported inside capture."
                )
            if gen.prompt_tokens is not None:
                want = np.concatenate([gen.prompt_tokens[r // gen.rows_per_prompt],
                                       seqs[r, gen.input_width:]])[: fed[r]]
                order = np.argsort(pos[sel], kind="stable")
                if (tok[sel][order] != want).any():
                    raise UnsupportedGenerationError(
                        f"generate() row {r}: the token ids capture recorded differ from the returned sequence; "
                        "this generation mode is not supported inside capture."
                    )

    # ---- results
    def trace(self, *, labels: dict[str, Sequence[Any]] | None = None, clear: bool = False) -> RoutingTrace:
        """Everything captured so far as one RoutingTrace (``[tokens, layers, k]``, real tokens only).

        ``labels`` maps a name to one value per captured document (e.g. per prompt) or per token.
        ``clear=True`` empties the recorder afterwards (bounded memory for long runs).
        """
        self._flush()
        if not self._batches:
            raise CaptureError(
                "nothing was captured: run the model inside the `with capture(model) as rec:` block "
                "(call the same model object you passed to capture)."
            )
        k = max(b["expert_ids"].shape[2] for b in self._batches)

        def pad(a: np.ndarray, fill: Any) -> np.ndarray:
            if a.shape[2] == k:
                return a
            out = np.full((*a.shape[:2], k), fill, dtype=a.dtype)
            out[:, :, : a.shape[2]] = a
            return out

        cat = {key: np.concatenate([b[key] for b in self._batches]) for key in self._batches[0] if
               key not in ("expert_ids", "weights", "prompt")}
        ids = np.concatenate([pad(b["expert_ids"], NO_EXPERT) for b in self._batches])
        w = np.concatenate([pad(b["weights"], 0.0) for b in self._batches])
        all_labels: dict[str, np.ndarray] = {"phase": cat.pop("phase")}
        if any("prompt" in b for b in self._batches):  # generate(): the input row each sequence continues
            all_labels["prompt"] = np.concatenate(
                [b.get("prompt", np.full(len(b["doc_ids"]), -1, dtype=np.int64)) for b in self._batches])
        for name, values in (labels or {}).items():
            all_labels[name] = _expand_label(name, values, cat["doc_ids"])
        trace = RoutingTrace(
            expert_ids=ids,
            weights=w,
            layers=self.layers,
            num_experts=self.num_experts,
            token_ids=cat["token_ids"],
            positions=cat["positions"],
            doc_ids=cat["doc_ids"],
            labels=all_labels,
            router_logits=cat.get("router_logits"),
            model_name=self.model_name,
            meta={"adapter": self.adapter.family},
        )
        if clear:
            self.clear()
        return trace

    def clear(self) -> None:
        """Drop everything recorded so far (counters such as ``tokens_recorded`` keep counting)."""
        self._flush()
        self._batches.clear()


# ---------------------------------------------------------------------------------------------- helpers
def _keep(t: torch.Tensor) -> torch.Tensor:
    """Detach and copy on the tensor's own device (asynchronous on CUDA: no synchronisation per layer).

    The copy protects the record from in-place changes the model may make after the hook ran.
    """
    return t.detach().clone()


def _to_host_many(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Move many small tensors to the host with one copy per (device, dtype) and one synchronisation per batch."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type != "cpu":
            groups.setdefault((t.device, t.dtype), []).append(i)
    if not groups:
        return tensors
    out = list(tensors)
    copies = []
    for idxs in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idxs])
        copies.append((flat.to("cpu", non_blocking=True), idxs))
    for device in {d for d, _ in groups}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif hasattr(torch, device.type) and hasattr(getattr(torch, device.type), "synchronize"):
            getattr(torch, device.type).synchronize()
    for host, idxs in copies:
        offset = 0
        for i in idxs:
            size = tensors[i].numel()
            out[i] = host[offset : offset + size].view(tensors[i].shape)
            offset += size
    return out


def _run_key(f: _Forward) -> tuple:
    """Forwards with equal keys are stacked in one pass (same shapes, dtypes and optional parts)."""
    c = f.call
    return (c.batch, c.seq, c.decode, c.token_ids is None, f.ids[0].shape[1], f.ids[0].dtype, f.weights[0].dtype,
            f.logits[0].shape[1] if f.logits else None)


def _token_array(token_ids: torch.Tensor | None, rows: np.ndarray) -> np.ndarray:
    """The token id of each kept row (``-1`` when the model was called with inputs_embeds)."""
    if token_ids is None:
        return np.full(len(rows), -1, dtype=np.int32)
    return token_ids.reshape(-1).numpy()[rows].astype(np.int32)


def _logit_array(logits: list[torch.Tensor], n_rows: int) -> np.ndarray:
    """Per-layer host router logits -> float16 ``[rows, layers, experts]`` (narrower layers padded with NaN)."""
    logit_rows = [x.reshape(n_rows, -1) for x in logits]
    width = max(x.shape[1] for x in logit_rows)
    lg = np.full((n_rows, len(logit_rows), width), np.nan, dtype=np.float16)
    for j, x in enumerate(logit_rows):
        lg[:, j, : x.shape[1]] = x.to(torch.float32).numpy()
    return lg


def _config_top_k(model: nn.Module) -> int | None:
    cfg: Any = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for a in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "moe_k"):
        v = getattr(cfg, a, None)
        if isinstance(v, int) and v > 0:
            return v
        if isinstance(v, (list, tuple)) and v:
            return int(max(v))
    return None


def _expand_label(name: str, values: Sequence[Any], doc_ids: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if len(arr) == len(doc_ids):
        return arr
    docs = np.unique(doc_ids)
    if docs.size and docs.min() >= 0 and docs.max() < len(arr):
        return arr[doc_ids]
    raise CaptureError(
        f"label {name!r} has {len(arr)} values; give one per document ({len(docs)} captured) or one per token "
        f"({len(doc_ids)})."
    )


_CALL_SIGS: dict[Any, inspect.Signature] = {}


def _signature(module: nn.Module) -> inspect.Signature:
    """``inspect.signature(module.forward)``, cached per forward function (shared by a class's instances)."""
    forward = module.forward
    key = getattr(forward, "__func__", forward)
    sig = _CALL_SIGS.get(key)
    if sig is None:
        sig = _CALL_SIGS[key] = inspect.signature(forward)
    return sig


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name; a keyword-only call (what generate() makes) needs no signature binding."""
    if not args and "kwargs" not in kwargs:
        return kwargs
    try:
        bound = dict(_signature(module).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        bound = dict(kwargs)
    extra = bound.pop("kwargs", None)
    if isinstance(extra, dict):
        bound.update(extra)
    return bound


def _describe_call(module: nn.Module, args: tuple, kwargs: dict) -> _Call | None:
    """The facts of one forward call (shapes, real tokens, positions, token ids) as tensors on their device.

    No host synchronisation for the common calls: tensors are copied on their own device (records are moved to
    the host later, many forwards at once).
    """
    bound = _call_arguments(module, args, kwargs)
    input_ids = bound.get("input_ids")
    embeds = bound.get("inputs_embeds")
    encoder_skipped = bound.get("encoder_outputs") is not None
    if isinstance(input_ids, torch.Tensor):
        shape = tuple(input_ids.shape)
    elif isinstance(embeds, torch.Tensor):
        shape = tuple(embeds.shape[:2])
    else:
        if encoder_skipped:
            return None  # a decoder step of an encoder-decoder model: its MoE encoder does not run
        raise CaptureError("capture needs the model to be called with input_ids or inputs_embeds.")
    if len(shape) == 1:
        shape = (1, shape[0])
    batch, seq = shape
    mask = bound.get("attention_mask")
    position_ids = bound.get("position_ids")
    if not (isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == seq
            and position_ids.shape[0] in (1, batch)):
        position_ids = None
    segments = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.shape[0] != batch or mask.shape[1] < seq:
            raise CaptureError(
                f"attention_mask has shape {tuple(mask.shape)} but the inputs are [batch={batch}, seq={seq}]."
            )
        real = mask[:, -seq:].to(torch.bool, copy=True)
        decode = mask.shape[1] > seq
        if seq == 1:  # a decode step: the position is the number of real tokens before it
            positions = mask.sum(dim=1, keepdim=True) - 1
        else:
            positions = (mask.to(torch.int64).cumsum(dim=1) - 1)[:, -seq:]
        if position_ids is not None and not decode:
            segments = _packed_segments(position_ids.expand(batch, seq), real)
            if segments is not None:
                positions = position_ids.expand(batch, seq).clone()
    elif mask is None or isinstance(mask, dict):
        past = _past_length(bound)
        source = input_ids if isinstance(input_ids, torch.Tensor) else embeds
        assert isinstance(source, torch.Tensor)
        device = source.device
        real = torch.ones((batch, seq), dtype=torch.bool, device=device)
        if position_ids is not None:
            positions = position_ids.expand(batch, seq).clone()
        else:
            positions = (past + torch.arange(seq, device=device))[None, :].expand(batch, seq)
        decode = past > 0
        if position_ids is not None and not decode:
            segments = _packed_segments(positions, real)
    else:
        raise CaptureError(
            f"capture reads padding from a 2-D attention_mask [batch, seq]; got a {mask.dim()}-D mask. "
            "Pass the tokenizer's attention_mask (capture drops padding tokens with it)."
        )
    token_ids = input_ids.reshape(batch, seq).clone() if isinstance(input_ids, torch.Tensor) else None
    if positions.device != real.device:  # position_ids given on another device than the inputs
        positions = positions.to(real.device)
    return _Call(batch=batch, seq=seq, mask=real, positions=positions.to(torch.int64),
                 token_ids=token_ids, decode=bool(decode), encoder_skipped=encoder_skipped, segments=segments)


def _packed_segments(positions: torch.Tensor, real: torch.Tensor) -> np.ndarray | None:
    """Document index of each token within its row when a row packs several documents, else None.

    A new document starts wherever a row's position does not continue the previous real token's by one
    (transformers' own packed-sequence rule); padding is skipped. ``positions``/``real``: ``[batch, seq]``.
    """
    pos = positions.cpu().numpy().astype(np.int64)
    keep = real.cpu().numpy()
    seg = np.zeros(pos.shape, dtype=np.int64)
    packed = False
    for r in range(pos.shape[0]):
        idx = np.flatnonzero(keep[r])
        if len(idx) < 2:
            continue
        starts = np.diff(pos[r, idx]) != 1
        if starts.any():
            packed = True
            seg[r, idx] = np.concatenate([[0], np.cumsum(starts)])
    return seg if packed else None


def _past_length(bound: dict) -> int:
    cache_position = bound.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    past = bound.get("past_key_values", bound.get("cache"))  # transformers 5.x calls it `cache`
    if past is not None and hasattr(past, "get_seq_length"):
        try:
            return int(past.get_seq_length())
        except (TypeError, ValueError, AttributeError):
            return 0
    return 0


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or type(model).__name__)


def _is_compiled_wrapper(module: object) -> bool:
    """A torch.compile wrapper (``OptimizedModule``) or a module compiled in place with ``module.compile()``."""
    return (type(module).__name__ == "OptimizedModule" and type(module).__module__.startswith("torch._dynamo")) or \
        getattr(module, "_compiled_call_impl", None) is not None


def _has_cached_graphs(target: nn.Module) -> bool:
    """Whether torch.compile holds graphs for the forward of any module class in ``target`` (made before capture).

    Such graphs are reused for every instance of the class when it is called compiled, and skip hooks added
    after they were made.
    """
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    for cls in {type(m) for m in target.modules()}:
        fn = getattr(cls, "forward", None)
        while fn is not None:
            code = getattr(fn, "__code__", None)
            try:
                if code is not None and _debug_get_cache_entry_list(code):
                    return True
            except (TypeError, RuntimeError):
                return False
            fn = getattr(fn, "__wrapped__", None)
    return False


def _compiled_before(model: object, target: nn.Module) -> tuple[list[str], bool]:
    """(names of compiled wrappers around/inside the model, whether cached compiled graphs exist for it)."""
    names = [type(model).__name__] if model is not target and _is_compiled_wrapper(model) else []
    names += [name or type(target).__name__ for name, m in target.named_modules() if _is_compiled_wrapper(m)]
    return names, bool(names) or _has_cached_graphs(target)


def _force_eager() -> Any:
    """A context in which torch.compile'd code runs eagerly (so hooks run), or None on a torch without it."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return None if set_stance is None else set_stance("force_eager")


# ---------------------------------------------------------------------------------------------- public API
# The models inside a capture() block now (nothing is written onto the user's model to say so).
_CAPTURING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@contextmanager
def capture(
    model: nn.Module,
    *,
    logits: bool = False,
    layers: Sequence[int] | None = None,
    adapter: Adapter | str | None = None,
) -> Iterator[Recorder]:
    """Record every routing decision of ``model`` inside the ``with`` block.

    Args:
        model: a transformers MoE model (the object you call; ``...ForCausalLM`` or its base model).
        logits: also keep the full router logits (float16 ``[tokens, layers, experts]``).
        layers: decoder-layer indices to record (default: every MoE layer).
        adapter: override the adapter-table row (a family name or an ``Adapter``).

    Yields a ``Recorder``; ``rec.trace()`` gives a ``RoutingTrace`` of the real (non-padding) tokens.
    """
    target = unwrap_model(model)
    if not isinstance(target, nn.Module):
        raise wrapper_error(model, CaptureError("capture needs a torch module."))
    row = resolve_adapter(target, adapter)
    try:
        moe_layers = find_moe_layers(target, row)
    except UnsupportedModelError as exc:
        if target is model and not _is_transformers_model(model) and getattr(model, "config", None) is None:
            raise wrapper_error(model, exc) from None
        raise
    if layers is not None:
        wanted = {int(x) for x in layers}
        unknown = wanted - {m.layer for m in moe_layers}
        if unknown:
            raise CaptureError(
                f"layers {sorted(unknown)} are not MoE layers of this model; MoE layers: "
                f"{[m.layer for m in moe_layers]}."
            )
        moe_layers = [m for m in moe_layers if m.layer in wanted]
    if target in _CAPTURING:
        raise CaptureError(
            "this model is already inside a capture() block; nested captures on one model are refused "
            "(use one recorder, or call rec.trace(clear=True) between parts)."
        )
    if logits and row.logits_output is None:
        raise CaptureError(f"the {row.family} adapter cannot read raw router logits.")
    compiled, cached = _compiled_before(model, target)
    if compiled:
        warnings.warn(
            f"this model ({', '.join(compiled[:3])}) was compiled with torch.compile before capture added its "
            "hooks; compiled graphs do not run hooks added later, so capture runs it uncompiled inside this block "
            "(torch.compiler.set_stance('force_eager')). To capture at compiled speed, enter capture() first and "
            "compile inside the block.",
            stacklevel=3,
        )
    rec = Recorder(target, row, moe_layers, logits=logits, model_name=_model_name(target))
    handles = []
    stack = ExitStack()
    saved_generate = vars(target).get("generate")  # an instance attribute of the user's, put back on exit
    _CAPTURING.add(target)
    try:
        if cached:  # graphs compiled before capture skip its hooks: run them eagerly while capturing
            stance = _force_eager()
            if stance is None:
                raise CompiledModelError(
                    "this model was compiled before capture and this torch cannot run compiled code eagerly; "
                    "enter capture() before compiling, or call torch._dynamo.reset() first."
                )
            stack.enter_context(stance)
        if callable(getattr(target, "generate", None)):
            # this block's generate(), removed on exit
            vars(target)["generate"] = rec._wrap_generate(getattr(target, "generate"))  # noqa: B009
        handles.append(target.register_forward_pre_hook(rec._on_call, with_kwargs=True))
        handles.append(target.register_forward_hook(rec._on_return, with_kwargs=True))
        reading = row.reading
        for m in moe_layers:
            if reading.hook == "post":  # the reading returns ids, weights and logits from the module's output
                handles.append(m.module.register_forward_hook(rec._on_router_scores(m.layer)))
                continue
            handles.append(m.module.register_forward_pre_hook(rec._on_experts(m.layer, reading.read, _signature(m.module)),
                                                              with_kwargs=True))
            if logits:
                if m.router is None:
                    raise CaptureError(
                        f"layer {m.layer}: no router module {row.router!r} next to {m.name}; logits=True "
                        "cannot be honoured for this model."
                    )
                handles.append(m.router.register_forward_hook(rec._on_router(m.layer, row.logits_output or 0)))
        yield rec
    finally:
        for h in handles:
            h.remove()
        vars(target).pop("generate", None)
        if saved_generate is not None:
            vars(target)["generate"] = saved_generate
        _CAPTURING.discard(target)
        rec._call = None
        rec._gen = None
        stack.close()
