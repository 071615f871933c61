"""The project's own error types: every failure a user can cause raises one of these, with the fix in the text."""

from __future__ import annotations


class MoERoutingError(Exception):
    """Base class of every error raised by moe_routing."""


class UnsupportedModelError(MoERoutingError, ValueError):
    """The model is dense, or its MoE layout is not one the adapter table knows."""


class CaptureError(MoERoutingError, RuntimeError):
    """A hook saw something it cannot record faithfully (unexpected router output, nested capture, ...)."""


class TraceError(MoERoutingError, ValueError):
    """A trace (in memory or on disk) is malformed, inconsistent or incompatible."""


class CorruptShardError(TraceError):
    """One Parquet shard of a trace directory cannot be read; the others stay readable."""


class CorpusError(MoERoutingError, ValueError):
    """A corpus is empty, unreadable, or lacks a requested column."""


class MetricError(MoERoutingError, ValueError):
    """A metric was asked for something the trace cannot answer (no weights, unknown layer, ...)."""


class UsageError(MoERoutingError, ValueError):
    """A command-line option or argument has a value that cannot work (``--batch-size 0``, ``--device cuda``
    without CUDA, a malformed ``--param``)."""


class PlotError(MoERoutingError, ValueError):
    """A figure was asked for something it cannot draw (unknown option, empty selection, bad export format)."""


class PlotInputError(PlotError, TypeError):
    """A figure function got an object of the wrong kind (not a figure, trace, frame or tokenizer)."""


class ReportError(MoERoutingError, RuntimeError):
    """Executing or rendering the notebooks failed for a reason outside the notebooks (kernel, browser)."""


class NotebookNotFoundError(ReportError, FileNotFoundError):
    """The notebook folder does not exist, or ``--only`` matches none of its notebooks."""


class BrowserNotFoundError(MoERoutingError, RuntimeError):
    """No Chrome/Chromium for kaleido to render static images with (or for the report's browser checks)."""
