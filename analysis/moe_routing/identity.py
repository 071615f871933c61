"""One place for model facts: display name, config hash, weights digest, dtype, source files.

A trace directory records ``model_identity(model)``; a later run resumes it only when the fields in
``IDENTITY_FIELDS`` are equal, so two models built ``from_config`` with other seeds, or weights changed in memory
(fine-tuning, a merged LoRA), never reuse each other's traces, while the same model loaded from ``dir/`` or
``./dir`` does. Nothing is attached to the model object and its config is never rewritten: what ``load_model``
knows about where a model came from is kept here, in a weak mapping that forgets the model with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The facts that must be equal for a trace to be resumed or reused (the name is display only).
IDENTITY_FIELDS = ("weights_digest", "config_hash", "dtype")

#: Elements read from every non-router tensor for the digest (router tensors are read whole).
SAMPLE_ELEMENTS = 512

#: Config keys that say where or how a model was loaded, not what it computes (dtype is its own field).
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
    "_attn_implementation_autoset",
})

_SOURCES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def remember_source(model: Any, *, name: str, path: str, revision: str | None = None) -> None:
    """Note how ``load_model`` loaded ``model`` (the name the user gave, the resolved path, the hub commit)."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None) or revision
    local = Path(path).is_dir()
    _SOURCES[model] = {
        "name": _normalise_name(name),
        "path": str(Path(path).resolve()) if local else str(path),
        "files_id": files_id(path) if local else (f"{path}@{commit}" if commit else None),
    }


def source_of(model: Any) -> dict[str, Any]:
    """What ``load_model`` noted about ``model`` (empty for a model built another way)."""
    try:
        return dict(_SOURCES.get(model, {}))
    except TypeError:  # not weak-referenceable
        return {}


def _normalise_name(name: str) -> str:
    """A local path spelled ``dir/`` or ``./dir`` names the same model: one spelling for display."""
    name = str(name)
    if name and os.path.exists(name):
        return os.path.normpath(name)
    return name


def model_name(model: Any) -> str:
    """The name to show for ``model``: what was passed to ``load_model``, else the config's path, else the class."""
    name = source_of(model).get("name")
    if name:
        return str(name)
    cfg = getattr(model, "config", None)
    raw = getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "")
    return _normalise_name(str(raw)) if raw else type(model).__name__


def _strip(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    return obj


def config_hash(model_or_config: Any) -> str:
    """sha256 (16 hex digits) of the config without where/how it was loaded (path, versions, dtype)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    blob = json.dumps(_strip(data), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def files_id(path: str | os.PathLike) -> str | None:
    """A cheap identity of a local model directory's weight files (names, sizes, mtimes); None elsewhere.

    Lets a caller see that a cached trace is stale without loading the model (``demo_runs`` does)."""
    p = Path(path)
    if not p.is_dir():
        return None
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    blob = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _router_tensor_names(model: Any) -> set[int]:
    """ids of the parameters and buffers of every router (read whole by the digest)."""
    from .adapters import find_moe_layers, resolve_adapter
    from .errors import MoERoutingError

    try:
        layers = find_moe_layers(model, resolve_adapter(model))
    except MoERoutingError:
        return set()
    out: set[int] = set()
    for layer in layers:
        if layer.router is not None:
            out.update(id(t) for t in layer.router.parameters())
            out.update(id(t) for t in layer.router.buffers())
    return out


def weights_digest(model: Any, *, full: bool = False) -> str:
    """sha256 (16 hex digits) of the model's tensors.

    Hashes every parameter's and buffer's name, shape and dtype, every router tensor byte for byte, and
    ``SAMPLE_ELEMENTS`` evenly spaced elements of every other tensor (``full=True``: all of them). Any change
    to a router, and fine-tuning or a merged LoRA (which change every element of the matrices they touch), give
    another digest; one edited element outside the routers may not. Costs a few MB of reads, even for a 30B
    model; tensors on the ``meta`` device (offloaded) contribute their name, shape and dtype only.
    """
    import torch

    routers = _router_tensor_names(model)
    h = hashlib.sha256()
    pieces: list[tuple[str, torch.Tensor | None]] = []
    seen: set[int] = set()
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        pieces.append((f"{name}:{tuple(t.shape)}:{t.dtype}", None if t.device.type == "meta" else t))
    # one host copy per device instead of one per tensor
    by_device: dict[Any, list[int]] = {}
    views: list[torch.Tensor | None] = []
    for i, (_, t) in enumerate(pieces):
        if t is None or t.numel() == 0:
            views.append(None)
            continue
        flat = t.detach().reshape(-1)
        if not (full or id(t) in routers) and flat.numel() > SAMPLE_ELEMENTS:
            step = flat.numel() // SAMPLE_ELEMENTS
            flat = flat[:: step][:SAMPLE_ELEMENTS]
        raw = flat.contiguous().view(torch.uint8)
        views.append(raw)
        by_device.setdefault(raw.device, []).append(i)
    host: dict[int, bytes] = {}
    for idxs in by_device.values():
        parts = [v for i in idxs if (v := views[i]) is not None]
        cat = torch.cat(parts).cpu().numpy()
        offset = 0
        for i, v in zip(idxs, parts, strict=True):
            host[i] = cat[offset : offset + v.numel()].tobytes()
            offset += v.numel()
    for i, (desc, _) in enumerate(pieces):
        h.update(desc.encode())
        h.update(host.get(i, b""))
    return h.hexdigest()[:16]


def model_dtype(model: Any) -> str:
    """The dtype most of the model's floating-point parameters have (``"bfloat16"``, ``"float32"``, ...)."""
    counts: Counter[str] = Counter()
    for p in model.parameters():
        if p.dtype.is_floating_point:
            counts[str(p.dtype).removeprefix("torch.")] += p.numel()
    return counts.most_common(1)[0][0] if counts else "none"


def model_identity(model: Any) -> dict[str, Any]:
    """Facts a trace records about its model: ``name, model_type, revision, config_hash, weights_digest, dtype,
    files_id`` (``files_id`` only for a local directory loaded with ``load_model``)."""
    cfg = getattr(model, "config", None)
    src = source_of(model)
    return {
        "name": model_name(model),
        "model_type": getattr(cfg, "model_type", "") if cfg is not None else "",
        "revision": getattr(cfg, "_commit_hash", None),
        "config_hash": config_hash(model) if cfg is not None else "",
        "weights_digest": weights_digest(model),
        "dtype": model_dtype(model),
        "files_id": src.get("files_id"),
    }


def tokenizer_facts(tokenizer: Any) -> dict[str, Any]:
    """What a trace records about its tokenizer: ``name_or_path`` (an absolute path for a local directory),
    ``class``, ``vocab_size`` (``len(tokenizer)``), ``padding_side``."""
    raw = str(getattr(tokenizer, "name_or_path", "") or "")
    path = str(Path(raw).resolve()) if raw and Path(raw).is_dir() else raw
    try:
        size: int | None = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    return {"name_or_path": path, "class": type(tokenizer).__name__, "vocab_size": size,
            "padding_side": getattr(tokenizer, "padding_side", None)}


def _tokenizer_sources(source: Any) -> tuple[list[str], str]:
    """Where a trace's tokenizer can be loaded from (first choice first) and how to name the source."""
    from .models import resolve_model_path
    from .store import MANIFEST, TraceReader, read_manifest
    from .trace import RoutingTrace

    manifest: Mapping[str, Any] | None = None
    if isinstance(source, TraceReader):
        manifest, what = source.manifest, f"the trace {source.path}"
    elif isinstance(source, RoutingTrace):
        names = [str(source.meta.get("tokenizer") or ""), source.model_name]
        return [n for n in names if n], f"the trace of {source.model_name or 'an unnamed model'}"
    elif isinstance(source, (str, os.PathLike)) and (Path(source) / MANIFEST).is_file():
        manifest, what = read_manifest(Path(source)), f"the trace {source}"
    elif isinstance(source, (str, os.PathLike)):
        return [resolve_model_path(source)], f"the model {source}"
    else:
        from .errors import SettingError

        raise SettingError(f"load_tokenizer takes a trace directory, a TraceReader, a RoutingTrace or a model "
                           f"name/path, got {type(source).__name__}.")
    raw_tok, raw_meta = manifest.get("tokenizer"), manifest.get("meta")
    tok: Mapping[str, Any] = raw_tok if isinstance(raw_tok, dict) else {}
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    names = [str(tok.get("name_or_path") or ""), str(meta.get("tokenizer") or ""),
             str(manifest.get("model_name") or "")]
    out: list[str] = []
    for n in names:
        if n and n not in out:
            out.append(n)
    model_name = str(manifest.get("model_name") or "")
    if model_name:
        resolved = resolve_model_path(model_name) if model_name.startswith("demo") else model_name
        if resolved not in out:
            out.append(resolved)
    return out, what


def load_tokenizer(trace_or_path: Any, **kwargs: Any) -> Any:
    """The tokenizer of a trace (directory, ``TraceReader``, ``RoutingTrace``) or of a model (name or path).

    A trace's manifest records the tokenizer it was captured with (``tokenizer.name_or_path``); it is loaded
    with ``transformers.AutoTokenizer`` (``kwargs`` pass through). ``UnsupportedModelError`` names every place
    tried when none loads."""
    from transformers import AutoTokenizer

    from .errors import UnsupportedModelError

    places, what = _tokenizer_sources(trace_or_path)
    errors = []
    for place in places:
        try:
            return AutoTokenizer.from_pretrained(place, **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(f"{place}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise UnsupportedModelError(
        f"could not load the tokenizer of {what}; tried {'; '.join(errors) or 'nothing (none recorded)'}. Pass "
        "the model's directory or hub id instead (it must hold tokenizer files)."
    )
