"""load_model(): a Hugging Face id, a local path, or the embedded demo model ("demo", "demo-untrained").

Placement: with ``device_map=None`` (the default) a model goes where the hardware is: ``device_map="auto"``
(accelerate spreads the layers over the GPUs, then the CPU) when CUDA or Apple's MPS is present, the CPU
otherwise (``default_device_map``). ``input_device(model)`` is where the inputs of a forward go (the device of
the input embeddings); every place of the project that runs a model moves its tensors there (``to_input_device``).
Before any weight is read, ``check_fits`` compares the memory the weights need (counted on a meta-device copy of
the architecture) with what the chosen devices have, and ``check_device`` refuses a device this machine lacks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import DeviceUnavailableError, ModelTooLargeError, SettingError, UnsupportedModelError

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
    check_memory: bool = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
    eval_mode: bool = True,
    **kwargs: Any,
):
    """Load an MoE causal LM and its tokenizer.

    Args:
        name_or_path: HF id (``"Qwen/Qwen3-30B-A3B"``), local directory, or ``"demo"`` / ``"demo-untrained"``.
        dtype: passed to ``from_pretrained`` (``"auto"``, ``"bfloat16"``, a ``torch.dtype``).
        device_map: ``None`` (default): ``default_device_map()``, i.e. ``"auto"`` when CUDA/MPS is present, else
            the CPU. Otherwise passed through after ``check_device`` (``"cpu"``, ``"cuda:1"``, ``"auto"``, a dict).
        check_memory: refuse (``ModelTooLargeError``) a model whose weights cannot fit the chosen devices.
        trust_remote_code: off by default; turn it on only for repositories you trust.
        revision: a branch, tag or commit of the hub repository.

    Returns ``(model, tokenizer)``; the model is in eval mode (routers such as phimoe sample in training mode).
    The tokenizer pads on the right unless it already says otherwise; capture is padding-side independent.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if device_map is None:
        device_map = default_device_map()
    elif isinstance(device_map, str):
        check_device(device_map)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        common["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        if check_memory:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, **common)
            try:
                need: int | None = weight_bytes(config, dtype)
            except Exception:  # an architecture the meta copy cannot build (remote code, ...): no check
                need = None
            if need is not None:
                check_fits(config, device_map, dtype, offload=bool(kwargs.get("offload_folder")),
                           name=str(name_or_path), need=need)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_parse_dtype(dtype), device_map=None if device_map == "cpu" else device_map, **common,
            **kwargs,
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


# ---------------------------------------------------------------------------------------------------- placement
#: device_map strings that place the whole model without naming a device.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")


def accelerator(*, cuda: bool | None = None, mps: bool | None = None) -> str | None:
    """``"cuda"`` or ``"mps"`` when torch can use one here, else ``None`` (the flags override the probe)."""
    import torch

    if cuda if cuda is not None else torch.cuda.is_available():
        return "cuda"
    if mps if mps is not None else torch.backends.mps.is_available():
        return "mps"
    return None


def default_device_map(*, cuda: bool | None = None, mps: bool | None = None) -> str:
    """What ``load_model(device_map=None)`` uses: ``"auto"`` with an accelerator present, else ``"cpu"``."""
    return "auto" if accelerator(cuda=cuda, mps=mps) else "cpu"


def present_devices() -> str:
    """This machine's devices in words (``"cpu only (torch 2.13.0+cpu)"``, ``"cpu, 2 cuda (NVIDIA H200, ...)"``)."""
    import torch

    parts = ["cpu"]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        parts.append(f"{torch.cuda.device_count()} cuda ({', '.join(names)})")
    if torch.backends.mps.is_available():
        parts.append("mps")
    words = ", ".join(parts) if len(parts) > 1 else "cpu only"
    return f"{words} (torch {torch.__version__})"


def check_device(device: str | None, *, option: str = "device") -> None:
    """DeviceUnavailableError when ``device`` (a ``device_map`` string) names an accelerator this machine lacks.

    ``option`` names the setting in the message (``"--device"`` on the command line). Accepted: ``None``, a strategy of ``DEVICE_MAPS``, ``cuda``, ``cuda:N``, ``N``, ``mps``, ``xpu[:N]``.
    """
    if device is None or device in DEVICE_MAPS:
        return
    kind, _, index = device.partition(":")
    if device.isdigit():
        kind, index = "cuda", device
    if kind not in ("cuda", "mps", "xpu"):
        raise DeviceUnavailableError(
            f"{option} {device!r} is not a device: use cpu, cuda, cuda:N, mps, or a device_map strategy "
            f"({', '.join(DEVICE_MAPS)})."
        )
    import torch

    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError(f"{option} mps: this machine has no usable Apple GPU (MPS); present: "
                                         f"{present_devices()}. Use cpu (or leave the device unset).")
        return
    backend = getattr(torch, kind)
    if not backend.is_available():
        raise DeviceUnavailableError(
            f"{option} {device}: {kind.upper()} is not available on this machine; present: {present_devices()}. "
            f"Use cpu (or leave the device unset: the default picks what is present), or install a {kind} build "
            "of torch (README: Installing a CUDA torch)."
        )
    count = backend.device_count()
    if index and (not index.isdigit() or int(index) >= count):
        raise DeviceUnavailableError(f"{option} {device}: this machine has {count} {kind} device(s) "
                                     f"({kind}:0 to {kind}:{count - 1}).")


def input_device(model: Any) -> Any:
    """The ``torch.device`` a forward's inputs go to: that of the input embeddings (accelerate-spread or not)."""
    import torch

    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        weight = None
    if weight is not None and weight.device.type != "meta":
        return weight.device
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def to_input_device(model: Any, batch: Any) -> Any:
    """``batch`` (a tokenizer's BatchEncoding, a dict of tensors or a tensor) moved to ``input_device(model)``."""
    device = input_device(model)
    if hasattr(batch, "to") and not isinstance(batch, dict):
        return batch.to(device)
    if isinstance(batch, dict):
        if hasattr(batch, "to"):  # BatchEncoding is a dict with .to
            return batch.to(device)
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
    return batch


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "int8": 1}


def weight_bytes(config: Any, dtype: Any = "auto") -> int:
    """Bytes of the model's weights in ``dtype`` (``"auto"``: the config's ``dtype``, else float32), counted on a
    meta-device copy of the architecture (no memory, no download beyond the config)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    numel = sum(p.numel() for p in meta.parameters())
    parsed = _parse_dtype(dtype)
    if parsed is None or parsed == "auto":
        parsed = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(parsed, str):
            parsed = _parse_dtype(parsed)
    return int(numel * _DTYPE_BYTES.get(str(parsed).removeprefix("torch."), 4))


def available_memory(device_map: Any) -> dict[str, int]:
    """Free bytes per device ``device_map`` may use: ``{"cuda:0": ..., "cpu": ...}`` (auto: every GPU and the CPU)."""
    import torch

    out: dict[str, int] = {}
    wanted = {str(v) for v in device_map.values()} if isinstance(device_map, dict) else {str(device_map)}
    spread = bool(wanted & {"auto", "balanced", "balanced_low_0", "sequential"})
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if spread or f"cuda:{i}" in wanted or str(i) in wanted or (i == 0 and "cuda" in wanted):
                out[f"cuda:{i}"] = int(torch.cuda.mem_get_info(i)[0])
    if spread or "cpu" in wanted:
        out["cpu"] = _host_available()
    return out


def _host_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(config: Any, device_map: Any, dtype: Any = "auto", *, offload: bool = False,
               name: str = "the model", available: dict[str, int] | None = None,
               need: int | None = None) -> int:
    """ModelTooLargeError when the weights need more than the devices of ``device_map`` have free; else the bytes.

    ``available`` (bytes per device) defaults to ``available_memory(device_map)``; a ``"disk"`` entry in a
    device_map dict, or ``offload=True`` (an ``offload_folder``), skips the check (accelerate pages from disk);
    ``need`` (bytes) skips counting the weights again.
    """
    if offload or (isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}):
        return 0
    need = weight_bytes(config, dtype) if need is None else need
    have = available if available is not None else available_memory(device_map)
    if not have:
        return need
    total = sum(have.values())
    if need > total:
        gib = 1024**3
        each = ", ".join(f"{k} {v / gib:.1f} GiB free" for k, v in have.items())
        raise ModelTooLargeError(
            f"{name} needs {need / gib:.1f} GiB for its weights in {dtype if dtype != 'auto' else 'its dtype'}, "
            f"but device_map={device_map!r} has {total / gib:.1f} GiB ({each}). Use device_map='auto' to spread it "
            "over every GPU and the CPU, add offload_folder='offload' to page the rest from disk, or load fewer "
            "bytes (dtype='bfloat16', a quantized checkpoint); check_memory=False skips this check."
        )
    return need
