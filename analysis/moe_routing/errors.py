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


class InterventionError(CaptureError, ValueError):
    """An intervention (ablate / force / bias / where) cannot be applied faithfully to this model or input."""
