"""Import routing recorded by serving engines into RoutingTrace (ids only: engines do not return weights).

- vLLM returns, per request, the routed expert ids as ``int16 [tokens, moe_layers, top_k]`` (prompt and
  generated tokens) without weights or logits: ``from_vllm_routed_experts``.
- SGLang returns ``routed_experts`` per request (``--enable-return-routed-experts``) as base64 of an int32 array
  ``[tokens, moe_layers, top_k]`` in ``meta_info``: ``from_sglang_routed_experts``; and its expert-distribution
  recorder in ``per_token`` mode dumps a ``.pt`` file of per-forward-pass records with ``topk_ids``
  ``[moe_layers, tokens, top_k]``, ``input_ids`` and ``positions``: ``from_sglang_dump`` (read with
  ``torch.load(weights_only=True)``: no arbitrary objects are unpickled).

Imported traces have ``has_weights == False`` and NaN weights; metrics that need weights say so.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TraceError
from .trace import RoutingTrace


def _check_ids(arr: np.ndarray, what: str, num_experts: int) -> np.ndarray:
    if arr.ndim != 3:
        raise TraceError(f"{what} must be [tokens, moe_layers, top_k], got shape {arr.shape}.")
    if arr.size and (arr.min() < -1 or arr.max() >= num_experts):
        raise TraceError(
            f"{what} holds expert ids in [{arr.min()}, {arr.max()}], outside [0, num_experts={num_experts}); "
            "pass the model's routed-expert count as num_experts."
        )
    return arr.astype(np.int16)


def _assemble(per_request: list[np.ndarray], *, layers: Sequence[int] | None, num_experts: int,
              token_ids: Sequence[Sequence[int]] | None, labels: Mapping[str, Sequence[Any]] | None,
              source: str, model_name: str) -> RoutingTrace:
    if not per_request:
        raise TraceError(f"no requests to import from {source}.")
    shapes = {a.shape[1:] for a in per_request}
    if len(shapes) != 1:
        raise TraceError(f"requests disagree on [moe_layers, top_k]: {sorted(shapes)}; they come from different models.")
    ids = np.concatenate(per_request)
    docs = np.concatenate([np.full(len(a), i, dtype=np.int64) for i, a in enumerate(per_request)])
    toks = None
    if token_ids is not None:
        if len(token_ids) != len(per_request):
            raise TraceError(f"token_ids has {len(token_ids)} requests, routing has {len(per_request)}.")
        for i, (t, a) in enumerate(zip(token_ids, per_request, strict=True)):
            if len(t) != len(a):
                raise TraceError(f"request {i}: {len(t)} token ids but {len(a)} routed tokens.")
        toks = np.concatenate([np.asarray(t) for t in token_ids])
    lab = {}
    for name, values in (labels or {}).items():
        if len(values) != len(per_request):
            raise TraceError(f"label {name!r} needs one value per request ({len(per_request)}), got {len(values)}.")
        lab[name] = np.asarray(values)[docs]
    return RoutingTrace.from_arrays(ids, None, layers=layers, num_experts=num_experts, token_ids=toks,
                                    doc_ids=docs, labels=lab, model_name=model_name,
                                    meta={"has_weights": False, "source": source})


def from_vllm_routed_experts(
    routed_experts: Sequence[Any] | Any,
    *,
    num_experts: int,
    layers: Sequence[int] | None = None,
    token_ids: Sequence[Sequence[int]] | None = None,
    labels: Mapping[str, Sequence[Any]] | None = None,
    model_name: str = "",
) -> RoutingTrace:
    """vLLM ``routed_experts`` (one ``int16 [tokens, moe_layers, top_k]`` array per request, or a .npy/.npz file).

    ``layers`` are the decoder-layer indices of the MoE layers (vLLM numbers MoE layers 0..L-1; pass the real
    indices when the model has dense layers, e.g. DeepSeek-V3's ``range(3, 61)``).
    """
    if isinstance(routed_experts, (str, Path)):
        path = Path(routed_experts)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                routed_experts = [z[k] for k in sorted(z.files, key=lambda s: (len(s), s))]
        else:
            routed_experts = [np.load(path, allow_pickle=False)]
    elif isinstance(routed_experts, np.ndarray) and routed_experts.ndim == 3:
        routed_experts = [routed_experts]
    arrays = [_check_ids(np.asarray(a), f"vLLM request {i}", num_experts) for i, a in enumerate(routed_experts)]
    return _assemble(arrays, layers=layers, num_experts=num_experts, token_ids=token_ids, labels=labels,
                     source="vllm", model_name=model_name)


def from_sglang_routed_experts(
    responses: Sequence[Mapping[str, Any]],
    *,
    num_moe_layers: int,
    top_k: int,
    num_experts: int,
    layers: Sequence[int] | None = None,
    labels: Mapping[str, Sequence[Any]] | None = None,
    model_name: str = "",
) -> RoutingTrace:
    """SGLang responses with ``meta_info["routed_experts"]`` (base64 int32, flattened [tokens, layers, top_k])."""
    arrays = []
    for i, resp in enumerate(responses):
        meta = resp.get("meta_info", resp)
        blob = meta.get("routed_experts")
        if blob is None:
            raise TraceError(
                f"response {i} has no meta_info.routed_experts; start SGLang with --enable-return-routed-experts "
                "and send return_routed_experts=True."
            )
        raw = np.frombuffer(base64.b64decode(blob), dtype=np.int32)
        if raw.size % (num_moe_layers * top_k):
            raise TraceError(f"response {i}: {raw.size} ids do not divide into [tokens, {num_moe_layers}, {top_k}].")
        arrays.append(_check_ids(raw.reshape(-1, num_moe_layers, top_k), f"SGLang response {i}", num_experts))
    return _assemble(arrays, layers=layers, num_experts=num_experts, token_ids=None, labels=labels,
                     source="sglang", model_name=model_name)


def from_sglang_dump(path: str | Path, *, num_experts: int, layers: Sequence[int] | None = None,
                     model_name: str = "") -> RoutingTrace:
    """SGLang expert-distribution ``per_token`` dump (``.pt``; records with ``topk_ids [layers, tokens, k]``)."""
    import torch

    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TraceError(f"{path} is not a readable SGLang dump ({type(exc).__name__}: {exc}).") from exc
    records = data.get("records") if isinstance(data, Mapping) else data
    if not isinstance(records, Sequence) or not records:
        raise TraceError(f"{path} holds no per-token records (dump with expert distribution mode 'per_token').")
    arrays, toks, poss, passes = [], [], [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "topk_ids" not in rec:
            raise TraceError(f"{path}: record {i} lacks 'topk_ids'; not a per_token dump.")
        topk = np.asarray(rec["topk_ids"])  # [layers, tokens, k]
        if topk.ndim != 3:
            raise TraceError(f"{path}: record {i} topk_ids has shape {topk.shape}, expected [layers, tokens, k].")
        arr = topk.transpose(1, 0, 2)
        arrays.append(_check_ids(arr, f"{path} record {i}", num_experts))
        n = arr.shape[0]
        toks.append(np.asarray(rec.get("input_ids", np.full(n, -1))))
        poss.append(np.asarray(rec.get("positions", np.arange(n))))
        passes.append(np.full(n, int(rec.get("forward_pass_id", i))))
    ids = np.concatenate(arrays)
    positions = np.concatenate(poss)
    # a new document starts wherever the position does not continue the previous token's
    starts = np.r_[True, positions[1:] != positions[:-1] + 1]
    docs = np.cumsum(starts) - 1
    return RoutingTrace.from_arrays(ids, None, layers=layers, num_experts=num_experts,
                                    token_ids=np.concatenate(toks), doc_ids=docs, positions=positions,
                                    labels={"forward_pass": np.concatenate(passes)}, model_name=model_name,
                                    meta={"has_weights": False, "source": "sglang-dump"})
