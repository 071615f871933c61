"""Trace sources of ``moe_routing.metrics``: what a metric accepts, normalised once, read chunk by chunk.

A source is a :class:`~moe_routing.trace.RoutingTrace`, a trace directory (``str`` / ``os.PathLike``), the
``TraceReader`` that ``capture_corpus`` / ``open_trace`` return (its options, e.g. ``skip_corrupt=True``, are
kept), or a sequence of ``RoutingTrace`` chunks (treated like shards). :func:`as_source` turns a path into one
``TraceReader`` (the manifest is read once per metric call, whatever the metric reads afterwards).

:func:`chunks` yields ``RoutingTrace`` chunks (one per shard of a directory). A metric says which columns it
reads (``columns``: ``weights``, ``router_logits``, ``token_id`` and label names; ``expert_ids``, ``doc_id`` and
``position`` always come): a directory then decodes only those. Documents never span shards, so sequence
metrics look at neighbouring tokens inside a chunk only. :func:`token_blocks` cuts a chunk into blocks of
bounded size, so temporaries stay ``O(block)`` whatever the source.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..errors import MetricError, TraceError
from ..trace import RoutingTrace

if TYPE_CHECKING:
    from ..store import TraceReader

TraceSource = Union[RoutingTrace, "TraceReader", str, "os.PathLike[str]", Sequence[RoutingTrace]]
Label = Union[str, Callable[[RoutingTrace], np.ndarray]]  # noqa: UP007

#: Column sets metrics ask for (see :func:`chunks`).
WEIGHTS: frozenset[str] = frozenset({"weights"})
LOGITS: frozenset[str] = frozenset({"router_logits"})
TOKENS: frozenset[str] = frozenset({"token_id"})

#: Decisions handled per block by the count primitives (bounds temporaries, keeps them in cache: measured
#: fastest around 2**17 on a 2-core x86 box).
BLOCK_DECISIONS = 1 << 17


def _reader(source: Any) -> TraceReader | None:
    """The ``TraceReader`` of a source that is one or names a trace directory; None for in-memory sources."""
    from ..store import TraceReader

    if isinstance(source, TraceReader):
        return source
    if isinstance(source, (str, os.PathLike)):
        return TraceReader(os.fspath(source))
    return None


def as_source(source: TraceSource, **reader_options: Any) -> TraceSource:
    """The source with a trace directory path opened once as a ``TraceReader`` (``reader_options`` such as
    ``skip_corrupt=True`` go to it); other sources come back as they are."""
    if isinstance(source, (str, os.PathLike)):
        from ..store import TraceReader

        return TraceReader(os.fspath(source), **reader_options)
    return source


def label_columns(*labels: Label | None) -> frozenset[str] | None:
    """The columns the labels read: their names; None (everything) when one is a function of the chunk."""
    out: set[str] = set()
    for label in labels:
        if label is None:
            continue
        if callable(label):
            return None
        out.add(label)
    return frozenset(out)


def needs(*labels: Label | None, weights: bool = False, logits: bool = False, tokens: bool = False
          ) -> frozenset[str] | None:
    """The ``columns`` of :func:`chunks` for a metric that reads these labels (and weights / logits / token ids);
    None (everything) when a label is a function of the chunk."""
    cols = label_columns(*labels)
    if cols is None:
        return None
    return cols | (WEIGHTS if weights else frozenset()) | (LOGITS if logits else frozenset()) | \
        (TOKENS if tokens else frozenset())


def _raw_chunks(source: TraceSource, layers: Sequence[int] | None, columns: Collection[str] | None
                ) -> Iterator[RoutingTrace]:
    if isinstance(source, RoutingTrace):
        yield source if layers is None else source.select(layers=layers)
    elif (reader := _reader(source)) is not None:
        yield from reader.iter_traces(layers=None if layers is None else list(layers), columns=columns)
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        for chunk in source:
            if not isinstance(chunk, RoutingTrace):
                raise MetricError(f"a sequence of chunks must hold RoutingTrace objects, got {type(chunk).__name__}.")
            yield chunk if layers is None else chunk.select(layers=layers)
    else:
        raise MetricError(
            f"expected a RoutingTrace, a trace directory (path or TraceReader) or a list of RoutingTrace chunks, "
            f"got {type(source).__name__}."
        )


def chunks(source: TraceSource, *, layers: Sequence[int] | None = None,
           columns: Collection[str] | None = None) -> Iterator[RoutingTrace]:
    """The trace as an iterator of ``RoutingTrace`` chunks (one per shard for a directory).

    ``columns``: what the caller reads besides ids, doc ids and positions (None: everything); a directory
    decodes only those (unread weights are zeros and ``meta["weights_read"]`` is False; ranking refuses them).
    Checks that every chunk has the layers, experts and k of the first; raises ``MetricError`` when the trace
    holds no token at all.
    """
    first: RoutingTrace | None = None
    seen = False
    for chunk in _raw_chunks(source, layers, None if columns is None else frozenset(columns)):
        if first is None:
            first = chunk
        elif (chunk.layers, chunk.num_experts, chunk.top_k) != (first.layers, first.num_experts, first.top_k):
            raise TraceError(
                "shards disagree on the model layout: "
                f"layers {first.layers} / {chunk.layers}, num_experts {first.num_experts} / {chunk.num_experts}, "
                f"top_k {first.top_k} / {chunk.top_k}."
            )
        if chunk.num_tokens:
            seen = True
            yield chunk
    if not seen:
        raise MetricError("the trace holds no tokens: there is nothing to measure (check the capture or the filter).")


def read_all(source: TraceSource, *, layers: Sequence[int] | None = None) -> RoutingTrace:
    """The whole trace in memory (for the metrics that need every token at once: probes, resampling)."""
    if isinstance(source, RoutingTrace):
        out = source if layers is None else source.select(layers=layers)
    elif (reader := _reader(source)) is not None:
        out = reader.read(layers=None if layers is None else list(layers))
    else:
        out = RoutingTrace.concat(list(chunks(source, layers=layers)))
    if out.num_tokens == 0:
        raise MetricError("the trace holds no tokens: there is nothing to measure (check the capture or the filter).")
    return out


def fold(source: TraceSource, init: Callable[[RoutingTrace], Any], update: Callable[[Any, RoutingTrace], None],
         *, layers: Sequence[int] | None = None, columns: Collection[str] | None = None) -> tuple[Any, RoutingTrace]:
    """Run ``update(state, chunk)`` over the chunks; ``state = init(first_chunk)``. Returns (state, first chunk)."""
    state: Any = None
    first: RoutingTrace | None = None
    for chunk in chunks(source, layers=layers, columns=columns):
        if first is None:
            first = chunk
            state = init(chunk)
        update(state, chunk)
    assert first is not None
    return state, first


def token_blocks(n: int, per_token: int, min_items: int = 0) -> Iterator[slice]:
    """Slices over ``n`` tokens holding about ``max(BLOCK_DECISIONS, 4 * min_items)`` items each.

    ``min_items``: the size of the per-block output (a bincount's minlength), so that large outputs are not
    re-allocated for tiny blocks.
    """
    step = max(1, max(BLOCK_DECISIONS, 4 * min_items) // max(1, per_token))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


# ---------------------------------------------------------------------------------------------- per chunk
def label_of(chunk: RoutingTrace, label: Label) -> np.ndarray:
    """Per-token label values ``[tokens]``: a label name of the trace, or a function of the chunk."""
    if callable(label):
        arr = np.asarray(label(chunk))
        if arr.shape != (chunk.num_tokens,):
            raise MetricError(f"a label function must return one value per token ({chunk.num_tokens}), got {arr.shape}.")
        return arr
    return chunk.label(label)


def label_name(label: Label) -> str:
    """The name of a label: itself, or a label function's ``label_name`` / ``__name__``."""
    if isinstance(label, str):
        return label
    return str(getattr(label, "label_name", getattr(label, "__name__", "label")))


def require_weights(trace: RoutingTrace, what: str) -> None:
    if not trace.has_weights:
        raise MetricError(
            f"{what} needs routing weights, but this trace has no weights (an import that records expert ids "
            "only, e.g. vLLM). Use a count-based variant, or capture the model with moe_routing to get weights."
        )


def require_logits(trace: RoutingTrace, what: str) -> np.ndarray:
    if trace.router_logits is None:
        raise MetricError(f"{what} needs router logits, but this trace has none: capture with logits=True.")
    return trace.router_logits
