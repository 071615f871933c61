"""routing_stability: does a token's routing depend on what else is in its batch, and on the weights' dtype?

Capture records exactly what the router decided in the batch that ran. Whether the *same text* is routed the
same way in another batch is a property of the model's arithmetic: padding adds masked positions, a larger batch
changes the matrix shapes and so the kernels' summation order, and in 16-bit floats (bfloat16, float16) those
rounding differences are large enough to flip near-tied router scores. This module measures that, like
``metrics.causal``, by running the model (through ``capture``) rather than reading a stored trace.

For each dtype, the reference is the texts run one by one (batch 1, no padding) in that dtype; every other
(batch size, padding side) run is compared with it token by token, per MoE layer, and every run is also
compared with the float32 reference (what the dtype itself changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import MetricError

PaddingSide = Literal["right", "left"]

#: Columns of ``routing_stability``'s frame.
STABILITY_COLUMNS = (
    "dtype", "batch_size", "padding_side", "layer", "tokens", "top1_changed", "topk_changed",
    "max_weight_diff", "top1_vs_fp32", "topk_vs_fp32",
)  # fmt: skip


def _dtype(value: Any) -> Any:
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(str(value), str(value))
    out = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise MetricError(f"routing_stability: unknown dtype {value!r}; use float32, bfloat16 or float16.")
    return out


def _run(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, side: str,
         max_length: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Capture ``texts`` in consecutive batches of ``batch_size`` padded on ``side``: top-1 ``[tokens, layers]``,
    sorted top-k ids ``[tokens, layers, k]``, weights ``[tokens, layers, k]`` (slots by weight), layers."""
    import torch

    from ..capture import capture
    from ..models import to_input_device
    from ..trace import RoutingTrace

    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        with torch.inference_mode(), capture(model) as rec:
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start:start + batch_size])
                batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=max_length is not None,
                                  max_length=max_length)
                model(**to_input_device(model, batch))
        trace: RoutingTrace = rec.trace().sorted_by_weight()
    finally:
        tokenizer.padding_side = old
    ids = np.sort(trace.expert_ids, axis=2)
    weights = trace.weights if trace.has_weights else np.full(trace.expert_ids.shape, np.nan, np.float32)
    return trace.top1(), ids, weights, list(trace.layers)


def routing_stability(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    padding_sides: Sequence[PaddingSide] = ("right", "left"),
    dtypes: Sequence[Any] | None = None,
    max_length: int | None = 256,
) -> pd.DataFrame:
    """Share of tokens whose routing changes with batch composition and padding side, per layer and dtype.

    Args:
        model, tokenizer: a loaded MoE causal LM (any placement) and its tokenizer (it must have a pad token).
        texts: the texts, run in this order; batches are consecutive slices (so a text's neighbours and the
            padding it gets change with the batch size).
        batch_sizes: batch sizes to compare; 1 (the reference, no padding) is always run.
        padding_sides: ``"right"`` and/or ``"left"``.
        dtypes: weight dtypes to run in (default: the model's own dtype and float32). The model is converted in
            place and restored at the end, every parameter and buffer to its own dtype and exact values (a
            tensor that a conversion would round, e.g. float32 weights run in bfloat16, is copied to the host
            first and copied back; 16-bit -> float32 -> 16-bit is exact and needs no copy).
        max_length: truncate each text to this many tokens (None: no truncation).

    Returns a frame with one row per (dtype, batch_size, padding_side, layer): ``tokens`` compared,
    ``top1_changed`` / ``topk_changed`` (share of tokens whose first-choice expert / set of k experts differs
    from the same dtype's batch-1 run), ``max_weight_diff`` (largest routing-weight difference, slots ordered
    by weight, among tokens whose top-k set is unchanged), ``top1_vs_fp32`` / ``topk_vs_fp32`` (the same shares
    against the float32 batch-1 run). Batch 1 rows compare the reference with itself in the first two columns
    (0 by construction) and show the dtype's own effect in the last two.
    """
    import torch

    texts = [str(t) for t in texts]
    if not texts:
        raise MetricError("routing_stability needs at least one text.")
    sizes = sorted({int(b) for b in batch_sizes} | {1})
    if sizes[0] < 1:
        raise MetricError(f"routing_stability: batch sizes must be >= 1, got {list(batch_sizes)}.")
    sides = list(dict.fromkeys(padding_sides))
    bad = [s for s in sides if s not in ("right", "left")]
    if bad or not sides:
        raise MetricError(f"routing_stability: padding_sides must be 'right' and/or 'left', got {list(padding_sides)}.")
    if tokenizer.pad_token is None:
        raise MetricError("routing_stability: the tokenizer has no pad token; set tokenizer.pad_token first.")
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    wanted = [own, torch.float32] if dtypes is None else [_dtype(d) for d in dtypes]
    order = list(dict.fromkeys([torch.float32, *wanted]))  # float32 first: every run is compared with it

    rows: list[dict[str, Any]] = []
    fp32_ref: tuple[np.ndarray, np.ndarray] | None = None
    saved = _snapshot(model, order)
    try:
        for dtype in order:
            model.to(dtype)
            ref_top1, ref_ids, ref_w, layers = _run(model, tokenizer, texts, 1, sides[0], max_length)
            if dtype == torch.float32:
                fp32_ref = (ref_top1, ref_ids)
            if dtype not in wanted:
                continue
            assert fp32_ref is not None
            for size in sizes:
                for side in sides if size > 1 else sides[:1]:
                    if size == 1:
                        top1, ids, w = ref_top1, ref_ids, ref_w
                    else:
                        top1, ids, w, _ = _run(model, tokenizer, texts, size, side, max_length)
                    if top1.shape != ref_top1.shape:
                        raise MetricError(f"routing_stability: batch {size} ({side}) recorded {top1.shape[0]} "
                                          f"tokens, batch 1 {ref_top1.shape[0]}; the tokenizer must not add "
                                          "tokens that depend on the batch.")
                    same_set = (ids == ref_ids).all(axis=2)
                    diff = np.abs(w.astype(np.float64) - ref_w.astype(np.float64)).max(axis=2)
                    for j, layer in enumerate(layers):
                        keep = same_set[:, j]
                        rows.append({
                            "dtype": str(dtype).removeprefix("torch."), "batch_size": size,
                            "padding_side": side if size > 1 else "none", "layer": int(layer),
                            "tokens": int(top1.shape[0]),
                            "top1_changed": float(np.mean(top1[:, j] != ref_top1[:, j])),
                            "topk_changed": float(np.mean(~keep)),
                            "max_weight_diff": float(np.nanmax(diff[keep, j])) if keep.any() else float("nan"),
                            "top1_vs_fp32": float(np.mean(top1[:, j] != fp32_ref[0][:, j])),
                            "topk_vs_fp32": float(np.mean(~(ids[:, j] == fp32_ref[1][:, j]).all(axis=1))),
                        })  # fmt: skip
    finally:
        _restore(model, saved)
    return pd.DataFrame(rows, columns=list(STABILITY_COLUMNS))


def _lossless(src: Any, dst: Any) -> bool:
    """Whether every value of floating dtype ``src`` survives a round trip through ``dst``."""
    import torch

    if src == dst:
        return True
    wider = {torch.float16: (torch.float32, torch.float64), torch.bfloat16: (torch.float32, torch.float64),
             torch.float32: (torch.float64,)}
    return dst in wider.get(src, ())


def _snapshot(model: Any, dtypes: Sequence[Any]) -> dict[tuple[str, str], tuple[Any, Any]]:
    """Each floating parameter and buffer (non-persistent ones too): ``(kind, name) -> (dtype, host copy or
    None)``; the copy is taken only when a conversion to one of ``dtypes`` would round it."""
    out: dict[tuple[str, str], tuple[Any, Any]] = {}
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t is None or not t.is_floating_point():
                continue
            lossy = any(not _lossless(t.dtype, d) for d in dtypes)
            out[(kind, name)] = (t.dtype, t.detach().to("cpu", copy=True) if lossy else None)
    return out


def _restore(model: Any, saved: dict[tuple[str, str], tuple[Any, Any]]) -> None:
    """Put every tensor of ``_snapshot`` back: its own dtype, and its exact values where a copy was taken."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("param", name) in saved:
                dtype, copy = saved[("param", name)]
                p.data = (copy if copy is not None else p.data).to(device=p.device, dtype=dtype)
        for name, b in list(model.named_buffers()):
            if ("buffer", name) in saved:
                dtype, copy = saved[("buffer", name)]
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                module._buffers[leaf] = (copy if copy is not None else b).to(device=b.device, dtype=dtype)


def stability_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """``routing_stability``'s frame averaged over layers (token-weighted): one row per dtype, batch, side."""
    if frame.empty:
        raise MetricError("stability_summary: the frame is empty.")
    keys = ["dtype", "batch_size", "padding_side"]
    shares = ["top1_changed", "topk_changed", "top1_vs_fp32", "topk_vs_fp32"]
    out = frame.groupby(keys, sort=False)[shares].mean()
    out["max_weight_diff"] = frame.groupby(keys, sort=False)["max_weight_diff"].max()
    return out.reset_index()
