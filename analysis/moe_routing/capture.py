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
from .trace import NO_EXPERT, RoutingTrace

# ---------------------------------------------------------------------------------------------- readings
# Each reader turns what a hook saw into (index [T, k] int, weights [T, k] float) tensors on the model's device.


def _read_experts_args(args: tuple, kwargs: dict, sig: inspect.Signature) -> tuple[torch.Tensor, torch.Tensor]:
    if len(args) >= 3:  # the common call experts(hidden, index, weights): no signature binding needed
        return args[1], args[2]
    bound = sig.bind_partial(*args, **kwargs).arguments
    values = list(bound.values())
    if len(values) < 3:
        raise CaptureError(
            f"the experts module was called with {len(values)} arguments; expected (hidden, index, weights)."
        )
    index, weights = values[1], values[2]
    return index, weights


def _read_onehot_capacity(args: tuple, kwargs: dict, sig: inspect.Signature) -> tuple[torch.Tensor, torch.Tensor]:
    onehot, weights = _read_experts_args(args, kwargs, sig)
    onehot = onehot.reshape(onehot.shape[0], -1)  # [T, E]
    routed = onehot.sum(dim=-1) > 0
    index = torch.where(routed, onehot.argmax(dim=-1), torch.full_like(routed, NO_EXPERT, dtype=torch.long))
    w = torch.where(routed, weights.reshape(-1).to(torch.float32), torch.zeros((), dtype=torch.float32,
                                                                               device=weights.device))
    return index[:, None], w[:, None]


def _read_skip_zero_weight(args: tuple, kwargs: dict, sig: inspect.Signature) -> tuple[torch.Tensor, torch.Tensor]:
    index, weights = _read_experts_args(args, kwargs, sig)
    index = torch.where(weights == 0, torch.full_like(index, NO_EXPERT), index)
    return index, weights


READERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "experts_args": _read_experts_args,
    "onehot_capacity": _read_onehot_capacity,
    "skip_zero_weight": _read_skip_zero_weight,
}


# Output readers: a forward hook on the matched module turns (module, output, k) into (index [T, k], weights [T, k],
# router logits [T, E] or None), for families whose experts never receive (index, weights) as arguments.
def _read_router_scores(module: nn.Module, output: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama4: dense scores [T, E] (0 outside the top-k) scale the experts' input; ids are top-k of the logits."""
    scores, logits = output[0], output[1]
    index = torch.topk(logits, k, dim=-1).indices
    return index, scores.gather(-1, index), logits


def _read_jetmoe_sorted(module: nn.Module, output: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """jetmoe: the router hands the experts an expert-sorted dispatch; scatter it back to [T, k] slots.

    Output: (index_sorted_experts [T*k] -- flat position t*k+slot of each sorted entry, batch_index, batch_gates
    [T*k], expert_size (list, entries per expert), logits [T, E]).
    """
    index_sorted, _, gates, expert_size, logits = output
    k = int(module.top_k)
    sizes = torch.as_tensor(expert_size, device=index_sorted.device)
    experts = torch.repeat_interleave(torch.arange(len(expert_size), device=index_sorted.device), sizes)
    flat_index = torch.empty_like(index_sorted)
    flat_index[index_sorted] = experts
    flat_weights = torch.empty_like(gates)
    flat_weights[index_sorted] = gates
    return flat_index.view(-1, k), flat_weights.view(-1, k), logits


def _read_doge_product_keys(module: nn.Module, output: Any, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """doge: replay DogeCDMoE's product-key top-k on its own router logits ([2, T, num_keys], output 1)."""
    router_logits = output[1]
    n = router_logits.shape[1]
    keys = int(module.num_keys)
    (scores_x, scores_y), (indices_x, indices_y) = router_logits.topk(keys, dim=-1)
    all_scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).view(n, -1)
    all_indices = (indices_x.unsqueeze(-1) * keys + indices_y.unsqueeze(-2)).view(n, -1)
    scores, position = all_scores.topk(int(module.top_k), dim=-1)
    index = all_indices.gather(-1, position)
    weights = torch.nn.functional.softmax(scores, dim=-1)
    if module.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    per_expert = (router_logits[0].unsqueeze(-1) + router_logits[1].unsqueeze(-2)).view(n, -1)  # [T, keys^2]
    return index, weights, per_expert


OUTPUT_READERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {
    "router_scores": _read_router_scores,
    "jetmoe_sorted": _read_jetmoe_sorted,
    "doge_product_keys": _read_doge_product_keys,
}


# ---------------------------------------------------------------------------------------------- the recorder
@dataclass
class _Call:
    """Facts of one forward call of the top model, gathered before it runs."""

    batch: int
    seq: int
    mask: torch.Tensor  # bool [batch, seq]: real tokens of this call
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


class Recorder:
    """Collects routing decisions across forward calls; ``trace()`` returns them as a RoutingTrace."""

    def __init__(self, model: nn.Module, adapter: Adapter, moe_layers: list[MoELayer], *, logits: bool,
                 model_name: str) -> None:
        self.model = model
        self.adapter = adapter
        self.moe_layers = moe_layers
        self.layers = tuple(m.layer for m in moe_layers)
        self.num_experts = max(m.num_experts for m in moe_layers)
        self.logits = logits
        self.model_name = model_name
        self.top_k = _config_top_k(model)
        self._call: _Call | None = None
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending_logits: dict[int, torch.Tensor] = {}
        self._batches: list[dict[str, np.ndarray]] = []
        self._next_doc = 0
        self._next_prompt = 0
        self._last_docs: np.ndarray | None = None
        self._gen: _Generate | None = None
        self.num_calls = 0
        self.tokens_recorded = 0  # real tokens recorded by all forwards so far (never decreases on clear)

    # ---- bookkeeping used by capture_corpus
    def start_docs_at(self, doc_id: int) -> None:
        """The next new sequence gets this document id (then +1 per batch row)."""
        self._next_doc = int(doc_id)

    @property
    def num_tokens(self) -> int:
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

    # ---- hooks
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending.clear()
        self._pending_logits.clear()
        self._call = _describe_call(module, args, kwargs)

    def _on_experts(self, layer: int, reader: Callable, sig: inspect.Signature):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._call is None:
                return None
            index, weights = reader(args, kwargs, sig)
            self._stash(layer, index, weights)
            return None

        return hook

    def _on_router_scores(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._call is None:
                return None
            k = self.top_k or int(getattr(module, "top_k", 1))
            index, weights, logits = OUTPUT_READERS[self.adapter.reading](module, output, k)
            self._stash(layer, index, weights)
            if self.logits and logits is not None:
                self._pending_logits[layer] = _keep(logits)
            return None

        return hook

    def _on_router(self, layer: int, out_index: int):
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
        index = index.reshape(-1, index.shape[-1]) if index.dim() > 1 else index[:, None]
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
            self._collect(call)
        finally:
            self._pending.clear()
            self._pending_logits.clear()
        return None

    def _collect(self, call: _Call) -> None:
        missing = [m.layer for m in self.moe_layers if m.layer not in self._pending]
        if len(missing) == len(self.moe_layers) and call.encoder_skipped:
            return  # a decoder pass of an encoder-decoder model given encoder_outputs: its MoE encoder did not run
        if missing:
            some = "" if len(missing) == len(self.moe_layers) else " (other layers did)"
            raise CompiledModelError(
                f"this forward ran without the hooks of MoE layers {missing}{some}: was the model compiled before "
                "capture? Install hooks first (enter capture), then compile; a graph compiled earlier (also for "
                "another instance of this model class) skips hooks added later (torch._dynamo.reset() drops it). "
                "A truncated model or a layer skipped at run time gives the same error."
            )
        layer_order = [*self.layers, *(layer for layer in self.layers if layer in self._pending_logits)]
        host = _to_host_many([*(self._pending[la][0] for la in self.layers),
                              *(self._pending[la][1] for la in self.layers),
                              *(self._pending_logits[la] for la in layer_order[len(self.layers):])])
        n = len(self.layers)
        self._pending = {la: (host[j], host[n + j]) for j, la in enumerate(self.layers)}
        self._pending_logits = {la: host[2 * n + j] for j, la in enumerate(layer_order[n:])}
        n_rows = call.batch * call.seq
        ks = {idx.shape[1] for idx, _ in self._pending.values()}
        k = max(ks)
        for layer in self.layers:
            if self._pending[layer][0].shape[0] != n_rows:
                raise CaptureError(
                    f"layer {layer} routed {self._pending[layer][0].shape[0]} rows but the call had batch "
                    f"{call.batch} x seq {call.seq} = {n_rows} tokens; this model reshapes tokens in a way the "
                    "adapter does not know."
                )
        if len(ks) == 1:  # one stack per batch instead of a copy per layer
            ids = torch.stack([self._pending[la][0] for la in self.layers], dim=1).numpy().astype(np.int16)
            w = torch.stack([self._pending[la][1].to(torch.float32) for la in self.layers], dim=1).numpy()
        else:  # layers with different k (hunyuan per-layer top-k): pad the shorter ones with empty slots
            ids = np.full((n_rows, len(self.layers), k), NO_EXPERT, dtype=np.int16)
            w = np.zeros((n_rows, len(self.layers), k), dtype=np.float32)
            for j, layer in enumerate(self.layers):
                idx, wt = self._pending[layer]
                ids[:, j, : idx.shape[1]] = idx.numpy()
                w[:, j, : idx.shape[1]] = wt.to(torch.float32).numpy()
        if self.top_k is None or k > self.top_k:
            self.top_k = k
        keep = call.mask.reshape(-1).cpu().numpy()
        rows = np.flatnonzero(keep)
        positions = call.positions.reshape(-1).cpu().numpy()[rows].astype(np.int32)
        row_of = rows // call.seq
        prompt = None
        if self._gen is not None:
            doc_ids, phase, prompt = self._generate_rows(call, row_of, positions)
        elif call.segments is not None and not call.decode:  # packed rows: a document per position run
            seg = call.segments.reshape(-1)[rows]
            per_row = np.zeros(call.batch, dtype=np.int64)
            np.maximum.at(per_row, row_of, seg + 1)
            base = self._next_doc + np.concatenate([[0], np.cumsum(per_row)[:-1]])
            doc_ids = base[row_of] + seg
            self._next_doc += int(per_row.sum())
            self._last_docs = base + per_row - 1  # a later decode step continues each row's last document
            phase = np.full(len(rows), "prefill")
        else:
            if call.decode and self._last_docs is not None and len(self._last_docs) == call.batch:
                row_docs = self._last_docs
            else:
                row_docs = np.arange(self._next_doc, self._next_doc + call.batch, dtype=np.int64)
                self._next_doc += call.batch
            self._last_docs = row_docs
            doc_ids = row_docs[row_of]
            phase = np.full(len(rows), "decode" if call.decode else "prefill")
        batch = {
            "expert_ids": ids[rows],
            "weights": w[rows],
            "doc_ids": doc_ids,
            "positions": positions,
            "token_ids": (
                call.token_ids.reshape(-1).cpu().numpy()[rows].astype(np.int32)
                if call.token_ids is not None
                else np.full(len(rows), -1, dtype=np.int32)
            ),
            "phase": phase,
        }
        if prompt is not None:
            batch["prompt"] = prompt
        if self.logits:
            if len(self._pending_logits) != len(self.layers):
                raise CaptureError("router logits were requested but some routers did not report them.")
            logit_rows = [self._pending_logits[layer].reshape(n_rows, -1) for layer in self.layers]
            width = max(x.shape[1] for x in logit_rows)
            lg = np.full((n_rows, len(self.layers), width), np.nan, dtype=np.float16)
            for j, x in enumerate(logit_rows):
                lg[:, j, : x.shape[1]] = x.to(torch.float32).numpy()
            batch["router_logits"] = lg[rows]
        self._batches.append(batch)
        self.num_calls += 1
        self.tokens_recorded += len(rows)

    # ---- generate()
    def _wrap_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        """``model.generate`` for the duration of the capture: maps its forwards onto the returned sequences."""

        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._gen is not None:
                raise UnsupportedGenerationError("generate() called itself on the captured model; not supported.")
            self._check_generation_mode(kwargs)
            self._gen = self._start_generate(args, kwargs)
            try:
                out = generate(*args, **kwargs)
                gen = self._gen
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
        assert gen is not None
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

    def _drop_generated(self, gen: _Generate, cut: np.ndarray) -> None:
        """Drop this generate's records at positions >= ``cut[row]`` (one value per generate row)."""
        for i in range(gen.first_batch, len(self._batches)):
            b = self._batches[i]
            keep = b["positions"] < cut[b["doc_ids"] - gen.docs[0]]
            if not keep.all():
                self.tokens_recorded -= int((~keep).sum())
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


def _config_top_k(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
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


_CALL_SIGS: dict[type, inspect.Signature] = {}


def _describe_call(module: nn.Module, args: tuple, kwargs: dict) -> _Call | None:
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
        mask = mask.to(torch.bool)
        if mask.shape[0] != batch or mask.shape[1] < seq:
            raise CaptureError(
                f"attention_mask has shape {tuple(mask.shape)} but the inputs are [batch={batch}, seq={seq}]."
            )
        real = mask[:, -seq:]
        positions = (mask.to(torch.int64).cumsum(dim=1) - 1)[:, -seq:]
        decode = mask.shape[1] > seq
        if position_ids is not None and not decode:
            segments = _packed_segments(position_ids.expand(batch, seq), real)
            if segments is not None:
                positions = position_ids.expand(batch, seq)
    elif mask is None or isinstance(mask, dict):
        past = _past_length(bound)
        real = torch.ones((batch, seq), dtype=torch.bool)
        if position_ids is not None:
            positions = position_ids.expand(batch, seq)
        else:
            positions = (past + torch.arange(seq))[None, :].expand(batch, seq)
        decode = past > 0
        if position_ids is not None and not decode:
            segments = _packed_segments(positions, real)
    else:
        raise CaptureError(
            f"capture reads padding from a 2-D attention_mask [batch, seq]; got a {mask.dim()}-D mask. "
            "Pass the tokenizer's attention_mask (capture drops padding tokens with it)."
        )
    token_ids = input_ids.reshape(batch, seq) if isinstance(input_ids, torch.Tensor) else None
    return _Call(batch=batch, seq=seq, mask=real.cpu(), positions=positions.cpu(),
                 token_ids=None if token_ids is None else token_ids.cpu(), decode=bool(decode),
                 encoder_skipped=encoder_skipped, segments=segments)


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
    if getattr(target, "_moe_routing_capturing", False):
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
    target._moe_routing_capturing = True
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
            target.generate = rec._wrap_generate(target.generate)
        handles.append(target.register_forward_pre_hook(rec._on_call, with_kwargs=True))
        handles.append(target.register_forward_hook(rec._on_return, with_kwargs=True))
        for m in moe_layers:
            if row.reading in OUTPUT_READERS:
                handles.append(m.module.register_forward_hook(rec._on_router_scores(m.layer)))
                continue
            reader = READERS[row.reading]
            sig = inspect.signature(m.module.forward)
            handles.append(m.module.register_forward_pre_hook(rec._on_experts(m.layer, reader, sig),
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
        target._moe_routing_capturing = False
        rec._call = None
        rec._gen = None
        stack.close()
