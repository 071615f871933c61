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


class SettingError(MoERoutingError, ValueError):
    """An argument has a value that cannot work (batch size 0, an unknown dtype, ...)."""


class MissingShardError(CorruptShardError):
    """A shard the manifest lists is not in the trace directory (deleted or never written)."""


class ForeignShardError(CorruptShardError):
    """A shard in the trace directory was not written by the capture the manifest describes."""


class TraceLockedError(TraceError):
    """Another process is writing the same trace directory."""
class CompiledModelError(CaptureError):
    """A forward inside capture ran compiled code that skipped capture's hooks (torch.compile before capture)."""


class IncompleteCaptureError(CaptureError):
    """A forward recorded fewer tokens than it was given: the trace would not be what the model ran."""


class UnsupportedGenerationError(CaptureError):
    """A generate() mode whose forwards capture cannot map one-to-one onto the returned sequences."""


class WrappedModelError(UnsupportedModelError):
    """capture was given a wrapper object around a model and found no transformers model inside it."""
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
class InterventionError(CaptureError, ValueError):
    """An intervention (ablate / force / bias / where) cannot be applied faithfully to this model or input."""
class DeviceUnavailableError(UsageError, SettingError):
    """A device was asked for that this machine does not have (``--device cuda`` on a CPU-only machine)."""


class ModelTooLargeError(SettingError, MemoryError):
    """The model's weights need more memory than the chosen devices have; the text says how much of each."""


class GatedDatasetError(CorpusError):
    """A gated Hugging Face dataset (FLORES+) could not be read: its terms are not accepted or no login."""
