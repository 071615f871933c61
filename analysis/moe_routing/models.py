"""load_model(): a Hugging Face id, a local path, or the embedded demo model ("demo", "demo-untrained")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import UnsupportedModelError

DEMO_NAMES = {"demo": "trained", "demo-trained": "trained", "demo-untrained": "untrained"}


def _parse_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto" or not isinstance(dtype, str):
        return dtype
    try:
        value = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32.")
    return value


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """'demo' names -> the cached demo model directory (trained on first use); anything else unchanged."""
    name = str(name_or_path)
    if name in DEMO_NAMES:
        from .demo import demo_model_path

        return str(demo_model_path(DEMO_NAMES[name]))
    return name


def weights_id(path: str | os.PathLike) -> str:
    """A cheap identity of a model's weights: names, sizes and mtimes of a local directory's weight files,
    or the hub commit hash. Traces record it so that a retrained model never reuses stale traces."""
    import hashlib

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
        blob = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
    return str(path)


def load_model(
    name_or_path: str | os.PathLike = "demo",
    *,
    dtype: Any = "auto",
    device_map: Any = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    eval_mode: bool = True,
    **kwargs: Any,
):
    """Load an MoE causal LM and its tokenizer.

    Args:
        name_or_path: HF id (``"Qwen/Qwen3-30B-A3B"``), local directory, or ``"demo"`` / ``"demo-untrained"``.
        dtype: passed to ``from_pretrained`` (``"auto"``, ``"bfloat16"``, a ``torch.dtype``).
        device_map: passed through (``"auto"`` spreads a large model over the GPUs with accelerate).
        trust_remote_code: off by default; turn it on only for repositories you trust.
        revision: a branch, tag or commit of the hub repository.

    Returns ``(model, tokenizer)``; the model is in eval mode (routers such as phimoe sample in training mode).
    The tokenizer pads on the right unless it already says otherwise; capture is padding-side independent.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        common["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_parse_dtype(dtype), device_map=device_map, **common, **kwargs
        )
    except OSError as exc:
        local = Path(path).exists()
        hint = (
            "the directory exists but lacks config/weights/tokenizer files"
            if local
            else "it is not a local directory and the Hugging Face hub could not be reached (offline?); "
            "download it where there is network (huggingface-cli download ...) and pass the local path"
        )
        raise UnsupportedModelError(f"could not load model {name_or_path!r}: {hint}. ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if eval_mode:
        model.eval()
    model.config.name_or_path = str(name_or_path)
    commit = getattr(model.config, "_commit_hash", None)
    model.moe_routing_weights_id = weights_id(path) if Path(path).is_dir() or not commit else f"{path}@{commit}"
    return model, tokenizer
