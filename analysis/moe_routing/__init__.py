"""moe_routing: capture, store, analyse and show how Mixture-of-Experts models route their tokens."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    CaptureError,
    CorpusError,
    CorruptShardError,
    MetricError,
    MoERoutingError,
    TraceError,
    UnsupportedModelError,
)
from .trace import RoutingTrace

__all__ = [
    "CaptureError",
    "CorpusError",
    "CorruptShardError",
    "MetricError",
    "MoERoutingError",
    "RoutingTrace",
    "TraceError",
    "UnsupportedModelError",
    "__version__",
]
