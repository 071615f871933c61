"""moe_routing: capture, store, analyse and show how Mixture-of-Experts models route their tokens.

    import moe_routing as mr
    model, tokenizer = mr.load_model("demo")
    with mr.capture(model) as rec:
        model(**tokenizer(texts, return_tensors="pt", padding=True))
    trace = rec.trace()                      # RoutingTrace [tokens, moe_layers, k]
    mr.metrics.load_balance(trace)
"""

from __future__ import annotations

from . import metrics
from ._version import __version__
from .adapters import ADAPTERS, Adapter, supported_families
from .atlas import atlas
from .capture import Recorder, capture
from .errors import (
    CaptureError,
    CorpusError,
    CorruptShardError,
    InterventionError,
    MetricError,
    MoERoutingError,
    TraceError,
    UnsupportedModelError,
)
from .intervene import Intervention, intervene
from .models import load_model
from .pipeline import capture_corpus
from .store import TraceReader, open_trace
from .trace import RoutingTrace

_LAZY = {"plots", "corpora", "imports", "demo", "report", "demo_pipeline"}
_LAZY.add("testing")  # mr.testing: assert_traces_equal, synthetic_trace, tiny_moe, routing_proxy


def __getattr__(name: str):
    """Heavier sub-packages (plotly, seaborn, datasets) load on first use: ``mr.plots``, ``mr.corpora``, ..."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'moe_routing' has no attribute {name!r}")


__all__ = [
    "ADAPTERS",
    "Adapter",
    "CaptureError",
    "CorpusError",
    "CorruptShardError",
    "Intervention",
    "InterventionError",
    "MetricError",
    "MoERoutingError",
    "Recorder",
    "RoutingTrace",
    "TraceError",
    "TraceReader",
    "UnsupportedModelError",
    "__version__",
    "atlas",
    "capture",
    "capture_corpus",
    "intervene",
    "load_model",
    "metrics",
    "open_trace",
    "plots",
    "supported_families",
]
from .demo_pipeline import open_runs  # noqa: E402
from .identity import load_tokenizer  # noqa: E402
from .pipeline import trace_status  # noqa: E402

__all__ += ["load_tokenizer", "open_runs", "trace_status"]
