"""Helpers shared by the figure modules: readable names, token strings, argument checks, metric frames."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from ..errors import MetricError, PlotInputError, TraceError
from ..trace import RoutingTrace

# ISO 639-1 (and a few 639-3) codes of the languages the demo corpus and common benchmarks use.
_LANGUAGES: dict[str, str] = {
    "ar": "Arabic",
    "bg": "Bulgarian",
    "bn": "Bengali",
    "ca": "Catalan",
    "cs": "Czech",
    "cy": "Welsh",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "eo": "Esperanto",
    "es": "Spanish",
    "et": "Estonian",
    "eu": "Basque",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "ga": "Irish",
    "gl": "Galician",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "hu": "Hungarian",
    "hy": "Armenian",
    "id": "Indonesian",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "ka": "Georgian",
    "kk": "Kazakh",
    "ko": "Korean",
    "la": "Latin",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "mk": "Macedonian",
    "ms": "Malay",
    "mt": "Maltese",
    "nb": "Norwegian Bokmål",
    "nl": "Dutch",
    "nn": "Norwegian Nynorsk",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sq": "Albanian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "vi": "Vietnamese",
    "zh": "Chinese",
    "zh_hans": "Chinese (Simplified)",
    "zh_hant": "Chinese (Traditional)",
    "pt_br": "Portuguese (Brazil)",
    "en_gb": "English (UK)",
    "en_us": "English (US)",
}


@lru_cache(maxsize=1)
def _gf_languages() -> dict[str, str]:
    """Language names from ``gflanguages`` (a dependency) keyed by lowercase base code; {} when missing."""
    try:
        import gflanguages
    except ImportError:  # pragma: no cover - gflanguages is a project dependency
        return {}
    names: dict[str, str] = {}
    for key, lang in gflanguages.LoadLanguages().items():
        base = key.split("_")[0].lower()
        if lang.name:
            names.setdefault(key.lower(), lang.name)
            names.setdefault(base, lang.name)
    return names


def language_name(code: Any) -> str:
    """Readable name of a language code: ``"de"`` -> ``"German"``, ``"pt-BR"`` -> ``"Portuguese (Brazil)"``.

    Unknown codes come back unchanged (as ``str``).
    """
    text = str(code)
    key = text.replace("-", "_").lower()
    if key in _LANGUAGES:
        return _LANGUAGES[key]
    base = key.split("_")[0]
    if base in _LANGUAGES:
        return _LANGUAGES[base]
    gf = _gf_languages()
    return gf.get(key) or gf.get(base) or text


def label_names(values: Iterable[Any], label: str | None) -> list[str]:
    """Display names of label values; language labels (``lang``, ``language``) get language names."""
    vals = list(values)
    if label is not None and label.lower() in {"lang", "language", "languages", "lang_code"}:
        return [language_name(v) for v in vals]
    return [str(v) for v in vals]


# ---------------------------------------------------------------------------------------------- tokens
TokenSource = Sequence[str] | Mapping[int, str] | Callable[[int], str] | None


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE alphabet: printable stand-in character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _partial_token(raw: str) -> str:
    """A token that holds part of a UTF-8 character: its bytes in hex (``⟨e794⟩``), else its raw string."""
    table = _byte_level_decoder()
    if raw and all(c in table for c in raw):
        return "⟨" + bytes(table[c] for c in raw).hex() + "⟩"
    return raw


def _decode_ids(tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    uniq = [int(i) for i in np.unique(ids) if i >= 0]
    if hasattr(tokenizer, "decode"):
        out = {i: tokenizer.decode([i]) for i in uniq}
        partial = [i for i, s in out.items() if "\ufffd" in s]  # pieces of a multi-byte character decode to "�"
        if partial and hasattr(tokenizer, "convert_ids_to_tokens"):
            for i, raw in zip(partial, tokenizer.convert_ids_to_tokens(partial), strict=True):
                out[i] = _partial_token(str(raw))
        return out
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return dict(zip(uniq, tokenizer.convert_ids_to_tokens(uniq), strict=True))
    raise PlotInputError(f"tokenizer {type(tokenizer).__name__} has neither decode() nor convert_ids_to_tokens().")


def token_strings(trace: RoutingTrace, *, tokenizer: Any = None, tokens: TokenSource = None) -> list[str]:
    """One string per token of ``trace`` (``[tokens]``).

    ``tokens`` may be a sequence aligned with the trace's tokens, a mapping or a callable from token id to
    text; otherwise ``tokenizer.decode([id])`` is used; without either the ids are shown as ``#id``.
    """
    n = trace.num_tokens
    if tokens is not None:
        if callable(tokens):
            return [str(tokens(int(i))) for i in trace.token_ids]
        if isinstance(tokens, Mapping):
            return [str(tokens.get(int(i), f"#{int(i)}")) for i in trace.token_ids]
        out = [str(t) for t in tokens]
        if len(out) != n:
            raise TraceError(f"tokens has {len(out)} strings, the trace has {n} tokens (pass one per token).")
        return out
    if tokenizer is not None:
        table = _decode_ids(tokenizer, trace.token_ids)
        return [table.get(int(i), f"#{int(i)}") for i in trace.token_ids]
    return [f"#{int(i)}" if i >= 0 else f"t{j}" for j, i in enumerate(trace.token_ids)]


def visible(token: str) -> str:
    """Token text with whitespace made visible for hover labels: ``' the\\n'`` -> ``'␣the↵'``."""
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")


def doc_token_index(trace: RoutingTrace, doc_id: int | None, max_tokens: int | None = None) -> np.ndarray:
    """Token indices ``[n]`` of one document in position order (first document of the trace if None)."""
    if trace.num_tokens == 0:
        raise TraceError("the trace holds no tokens.")
    if doc_id is None:
        doc_id = int(trace.doc_ids[0])
    idx = np.flatnonzero(trace.doc_ids == doc_id)
    if idx.size == 0:
        docs = np.unique(trace.doc_ids)
        shown = ", ".join(str(d) for d in docs[:10]) + (" ..." if docs.size > 10 else "")
        raise TraceError(f"doc_id {doc_id} is not in this trace; its documents are {shown}.")
    idx = idx[np.argsort(trace.positions[idx], kind="stable")]
    if max_tokens is not None:
        idx = idx[:max_tokens]
    return idx


# ---------------------------------------------------------------------------------------------- checks
def layer_positions(trace: RoutingTrace, layers: Sequence[int] | int | None) -> list[int]:
    """Positions in the ``layers`` dimension of the requested decoder layers (all MoE layers if None)."""
    if layers is None:
        return list(range(trace.num_layers))
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    return [trace.layer_index(layer) for layer in layers]


def check_expert(trace: RoutingTrace, expert: int) -> int:
    """``expert`` as int; a clear error when the trace's layers have no such routed expert."""
    e = int(expert)
    if not 0 <= e < trace.num_experts:
        raise TraceError(
            f"expert {expert} does not exist; this trace has experts 0..{trace.num_experts - 1}."
        )
    return e


def require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise a :class:`MetricError` naming the missing columns of a metric frame."""
    if not isinstance(frame, pd.DataFrame):
        raise MetricError(f"{what} expects a pandas DataFrame, got {type(frame).__name__}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MetricError(f"{what} needs columns {missing}; the frame has {list(frame.columns)}.")


def check_frame_layer(frame: pd.DataFrame, layer: int) -> None:
    """A clear error when a metric frame has no rows for decoder layer ``layer``."""
    frame_layers(frame, [layer])


def is_trace_source(obj: Any) -> bool:
    """Whether ``obj`` is something the metrics read routing from: a trace, a ``TraceReader``, a trace
    directory path or a list of ``RoutingTrace`` chunks (not a computed frame or array)."""
    import os

    from ..store import TraceReader

    if isinstance(obj, (RoutingTrace, TraceReader, str, os.PathLike)):
        return True
    return isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(x, RoutingTrace) for x in obj)


def metric_frame(obj: Any, metric: str | Callable[..., Any], **kwargs: Any) -> Any:
    """``obj`` itself if it is a frame; otherwise ``metric(obj, **kwargs)``.

    ``metric`` is a function of :mod:`moe_routing.metrics` (or any function from a trace source to the frame
    the plot reads; a name of a ``moe_routing.metrics`` function still works). ``obj`` may then be anything
    the metrics accept: a ``RoutingTrace``, a trace directory, a list of chunks.
    """
    if isinstance(obj, pd.DataFrame):
        return obj
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    if obj is None:
        raise PlotInputError(f"expected a RoutingTrace, a trace directory or a {name}() frame, got None.")
    fn: Any = metric
    if isinstance(metric, str):
        from .. import metrics

        fn = getattr(metrics, metric, None)
        if fn is None:
            raise MetricError(f"moe_routing.metrics has no {metric}(); pass the metric frame instead.")
    return fn(obj, **kwargs)


def category_axis(values: Sequence[Any]) -> dict[str, Any]:
    """Axis settings that show exactly ``values`` (e.g. decoder-layer indices) as categories, in order."""
    return {"type": "category", "categoryorder": "array", "categoryarray": [str(v) for v in values]}


def layer_steps(
    n: int, labels: Sequence[Any], traces_per_layer: int = 1, prefix: str = "layer "
) -> list[dict]:
    """Slider steps that show trace group ``i`` (``traces_per_layer`` traces each) for step ``i``."""
    steps = []
    for i, lab in enumerate(labels):
        vis = [False] * (n * traces_per_layer)
        for j in range(traces_per_layer):
            vis[i * traces_per_layer + j] = True
        steps.append({"method": "restyle", "args": [{"visible": vis}], "label": f"{lab}"})
    return steps


def layer_slider(labels: Sequence[Any], traces_per_layer: int = 1, active: int = 0, **kw: Any) -> dict:
    """A slider over layers (decoder-layer indices as step labels)."""
    return {
        "active": active,
        "currentvalue": {"prefix": "decoder layer ", "font": {"size": 13}},
        "pad": {"t": 40},
        "steps": layer_steps(len(labels), labels, traces_per_layer),
        **kw,
    }


def frame_layers(frame: pd.DataFrame, layers: Sequence[int] | int | None = None) -> list[int]:
    """Decoder layers of a metric frame to show: all (sorted) or the requested ones, checked to exist."""
    available = sorted(int(x) for x in pd.unique(frame["layer"]))
    if layers is None:
        return available
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    for layer in layers:
        if int(layer) not in available:
            raise TraceError(f"layer {layer} is not in this frame; its MoE layers are {available}.")
    return [int(x) for x in layers]
