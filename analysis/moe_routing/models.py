"""load_model(): a Hugging Face id, a local path, or the embedded demo model ("demo", "demo-untrained")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import SettingError, UnsupportedModelError

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
        raise SettingError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32.")
    return value


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """'demo' names -> the cached demo model directory (trained on first use); anything else unchanged."""
    name = str(name_or_path)
    if name in DEMO_NAMES:
        from .demo import demo_model_path

        return str(demo_model_path(DEMO_NAMES[name]))
    return name


def weights_id(path: str | os.PathLike) -> str:
    """Deprecated: use ``moe_routing.identity.files_id`` (traces now record ``identity.weights_digest``, taken
    from the weights themselves). Names, sizes and mtimes of a local directory's weight files, else ``path``."""
    from .identity import files_id

    return files_id(path) or str(path)


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
    from .identity import remember_source

    remember_source(model, name=str(name_or_path), path=path, revision=revision)
    return model, tokenizer
