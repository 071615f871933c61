"""capture_corpus(): stream a corpus through a model and write its routing to a trace directory.

The corpus is turned into a deterministic plan: texts -> token chunks (long texts are split at ``max_length``,
with a notice) -> batches of ``batch_size`` chunks -> shards (``batches_per_shard`` batches, or about
``shard_bytes`` from the real shape). Shard ``i`` is a
pure function of the corpus and the settings, so an interrupted run re-run with the same command skips the
shards that exist (each is written atomically) and a ``torchrun`` job splits shards between ranks
(``i % world_size == rank``) and produces the same files as one process.

The finished manifest lists every shard with its token count and input hash; re-running the same command on a
directory that lost shards rewrites exactly those. One run writes a directory at a time (a lock, held by rank 0);
a resume is refused, naming each setting or model fact that differs, when the trace was made otherwise.

The steps: ``trace_status`` (the one cache/resume decision) -> ``_Run.prepare_directory`` -> ``announce``
(shape and expected size) -> ``begin_manifest`` (from a ``TraceLayout`` of the recorder) -> ``run_shards``
(tokenisation in a prefetch thread, forwards here, Parquet in a writer thread) -> ``finish_manifest``
(verify, document index, complete).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pyarrow.parquet as pq
import torch

from .capture import capture
from .errors import CorpusError, ForeignShardError, MissingShardError, SettingError, TraceError
from .identity import IDENTITY_FIELDS, files_id, model_identity, tokenizer_facts
from .store import (
    DOC_INDEX,
    FINGERPRINT_KEY,
    INPUT_KEY,
    MANIFEST,
    SHARD_BYTES,
    SHARD_DIR,
    WEIGHTS_DTYPES,
    DirectoryLock,
    TraceLayout,
    TraceReader,
    WeightsDtype,
    config_hash,
    human_bytes,
    remove_stale_temporaries,
    shard_name,
    shard_record,
    stored_weights_dtype,
    trace_to_table,
    with_shard_metadata,
    write_document_index,
    write_json_atomic,
    write_shard,
)
from .trace import RoutingTrace

_INPUT_KEY = INPUT_KEY  # kept for older imports


@dataclass
class _Chunk:
    text_index: int
    chunk: int
    ids: list[int]
    labels: dict[str, Any]


def _iter_records(data: Any, labels: Sequence[str] | Mapping[str, Sequence[Any]] | None,
                  text_column: str) -> tuple[Iterator[tuple[Any, dict[str, Any]]], list[str], int | None]:
    """(records, label names, length or None) for a list of texts, a DataFrame, a datasets.Dataset, dicts."""
    if isinstance(data, str):
        raise CorpusError("capture_corpus got a single string; pass a list of texts (or a DataFrame / dataset).")
    columns = None
    if hasattr(data, "columns") and hasattr(data, "__getitem__"):  # pandas / polars DataFrame
        columns = list(data.columns)
    elif hasattr(data, "column_names"):  # datasets.Dataset
        columns = list(data.column_names)
    if columns is not None:
        if text_column not in columns:
            raise CorpusError(f"the corpus has no {text_column!r} column; its columns are {columns}.")
        names = list(labels) if labels is not None else [c for c in columns if c != text_column]
        missing = [n for n in names if n not in columns]
        if missing:
            raise CorpusError(f"label columns {missing} are not in the corpus; its columns are {columns}.")
        texts = list(data[text_column])
        cols = {n: list(data[n]) for n in names}
        return ((t, {n: cols[n][i] for n in names}) for i, t in enumerate(texts)), names, len(texts)
    if isinstance(labels, Mapping):
        texts = list(data)
        for n, values in labels.items():
            if len(values) != len(texts):
                raise CorpusError(f"label {n!r} has {len(values)} values for {len(texts)} texts.")
        return ((t, {n: labels[n][i] for n in labels}) for i, t in enumerate(texts)), list(labels), len(texts)
    if labels:
        raise CorpusError("labels= must map a name to one value per text when the corpus is a list of texts.")
    length = len(data) if hasattr(data, "__len__") else None

    def gen() -> Iterator[tuple[Any, dict[str, Any]]]:
        for item in data:
            if isinstance(item, Mapping):
                yield item.get(text_column), {k: v for k, v in item.items() if k != text_column}
            else:
                yield item, {}

    return gen(), [], length


def _plan_chunks(records: Iterable[tuple[str, dict[str, Any]]], tokenizer: Any, max_length: int,
                 max_tokens: int | None, label_names: list[str], stats: dict[str, int]) -> Iterator[_Chunk]:
    total = 0
    for i, (text, lab) in enumerate(records):
        if not isinstance(text, str):
            raise CorpusError(f"text {i} is {type(text).__name__}, not a string.")
        if not text.strip():
            stats["empty"] += 1
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        pieces = [ids[s : s + max_length] for s in range(0, len(ids), max_length)]
        if len(pieces) > 1:
            stats["chunked"] += 1
        values = {n: lab.get(n) for n in label_names}
        missing = [n for n, v in values.items() if _is_missing(v)]
        if missing:
            raise CorpusError(
                f"text {i} has no value for label(s) {missing} (None / NaN). Fill the missing values (e.g. "
                "df[col].fillna('unknown')) or drop those rows; a missing label is never stored as 'None'."
            )
        for c, piece in enumerate(pieces):
            if max_tokens is not None:
                piece = piece[: max_tokens - total]
                if not piece:
                    return
            total += len(piece)
            yield _Chunk(i, c, piece, values)
        if max_tokens is not None and total >= max_tokens:
            return


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover
        return False


def _batched(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _pad(batch: list[_Chunk], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c.ids) for c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, c in enumerate(batch):
        sl = slice(width - len(c.ids), width) if left else slice(0, len(c.ids))
        ids[r, sl] = torch.tensor(c.ids)
        mask[r, sl] = 1
    return ids, mask


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _human(n: float) -> str:
    return human_bytes(n)


def _model_facts(model: Any, tokenizer: Any = None) -> dict[str, Any]:
    """What the manifest says about the model (``identity.model_identity``), its tokenizer and the versions."""
    import transformers

    from ._version import __version__

    ident = model_identity(model)
    return {
        "model_name": ident["name"],
        "model_type": ident["model_type"],
        "revision": ident["revision"],
        "config_hash": ident["config_hash"],
        "weights_id": ident["weights_digest"],
        "model": ident,
        "tokenizer": tokenizer_facts(tokenizer) if tokenizer is not None else None,
        "versions": {"moe_routing": __version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


def run_fingerprint(settings: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """The hash a trace directory is resumed by: the settings and the model facts in ``IDENTITY_FIELDS``."""
    return config_hash({"settings": dict(settings), "model": {k: identity.get(k) for k in IDENTITY_FIELDS}})


_FIELD_NAMES = {"weights_digest": "model weights", "config_hash": "model config", "dtype": "dtype",
                "files_id": "model weight files"}


def _differences(old: Mapping[str, Any], settings: Mapping[str, Any], identity: Mapping[str, Any],
                 fields: Sequence[str] = IDENTITY_FIELDS, *, all_settings: bool = True) -> list[str]:
    """Each setting or model fact that differs between a trace's manifest and this run, as readable text
    (``all_settings=False``: only the settings given are compared)."""
    diffs = []
    raw_settings = old.get("settings")
    old_settings: dict[str, Any] = raw_settings if isinstance(raw_settings, dict) else {}
    keys = set(settings) | set(old_settings) if all_settings else set(settings)
    for key in sorted(keys):
        if old_settings.get(key) != settings.get(key):
            diffs.append(f"{key}: {old_settings.get(key)!r} in the trace, {settings.get(key)!r} now")
    old_model = old.get("model") if isinstance(old.get("model"), dict) else None
    if old_model is None:
        diffs.append("model: the trace was written by an older moe-routing that did not record the model's "
                     "weights digest")
        return diffs
    for key in fields:
        if old_model.get(key) != identity.get(key):
            diffs.append(f"{_FIELD_NAMES[key]} ({key}): {old_model.get(key)!r} in the trace, "
                         f"{identity.get(key)!r} now")
    if any(d.startswith(("model ", "dtype")) for d in diffs) and old_model.get("name") != identity.get("name"):
        diffs.append(f"model: {old_model.get('name')!r} in the trace, {identity.get('name')!r} now")
    return diffs


# ---------------------------------------------------------------------------------------------- trace_status
TraceState = Literal["complete", "stale", "partial", "absent"]


class TraceStatus(str):
    """One of ``"complete" | "stale" | "partial" | "absent"`` (compares equal to the string), with ``reasons``.

    - ``absent``: no trace there yet (no manifest, no shards);
    - ``stale``: a trace made with other settings, another model or an older moe-routing (or unreadable);
      ``capture_corpus`` refuses to resume it unless told to overwrite;
    - ``partial``: this run's trace, interrupted or missing shards; ``capture_corpus`` finishes it;
    - ``complete``: this run's trace, finished, every shard present; ``capture_corpus`` returns it as is.
    """

    reasons: tuple[str, ...]

    def __new__(cls, state: TraceState, reasons: Sequence[str] = ()) -> TraceStatus:
        obj = super().__new__(cls, state)
        obj.reasons = tuple(reasons)
        return obj

    @property
    def state(self) -> TraceState:
        return cast(TraceState, str(self))

    def __repr__(self) -> str:
        return f"TraceStatus({str(self)!r}{', ' + repr(list(self.reasons)) if self.reasons else ''})"


def _status(out: Path, settings: Mapping[str, Any] | None, identity: Mapping[str, Any], *,
            fields: Sequence[str], fingerprint: str | None) -> TraceStatus:
    """The one cache/resume decision (see ``trace_status``)."""
    mpath = out / MANIFEST
    if not mpath.exists():
        shards = sorted((out / SHARD_DIR).glob("part-*.parquet")) if (out / SHARD_DIR).is_dir() else []
        if shards:
            return TraceStatus("stale", [f"{out} holds {len(shards)} shard files but no {MANIFEST}"])
        return TraceStatus("absent")
    try:
        old = json.loads(mpath.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return TraceStatus("stale", [f"{mpath} is unreadable ({exc})"])
    diffs = _differences(old, settings or {}, identity, fields, all_settings=fingerprint is not None)
    if not diffs and fingerprint is not None and old.get("fingerprint") != fingerprint:
        diffs = [f"fingerprint {old.get('fingerprint')} in the trace, {fingerprint} now"]
    if diffs:
        return TraceStatus("stale", diffs)
    if not old.get("complete"):
        return TraceStatus("partial", ["the capture was interrupted (or is running)"])
    raw_listed = old.get("shards")
    listed: dict[str, Any] = raw_listed if isinstance(raw_listed, dict) else {}
    present = {p.name for p in (out / SHARD_DIR).glob("part-*.parquet")} if (out / SHARD_DIR).is_dir() else set()
    missing = sorted(set(listed) - present)
    if missing:
        return TraceStatus("partial", [f"{len(missing)} shards are missing ({', '.join(missing[:5])}"
                                       f"{', ...' if len(missing) > 5 else ''})"])
    return TraceStatus("complete")


def trace_status(out: str | Path, model: Any, settings: Mapping[str, Any] | None = None) -> TraceStatus:
    """What ``capture_corpus`` would do with ``out``: ``complete | stale | partial | absent``.

    ``model`` is the loaded model (compared by ``identity.IDENTITY_FIELDS``: weights digest, config hash, dtype)
    or a model name / local directory (compared by its weight files, ``identity.files_id``, without loading
    it; a hub id is not compared). ``settings`` are the run settings to compare with those the trace recorded; only the keys given are
    compared (``capture_corpus`` passes all of them and the run's fingerprint). ``.reasons`` says why a trace
    is stale or partial.
    """
    out = Path(out)
    if isinstance(model, (str, os.PathLike)):
        from .models import resolve_model_path

        fid = files_id(resolve_model_path(model))  # None for a hub id: then the settings alone decide
        return _status(out, settings, {"files_id": fid}, fields=("files_id",) if fid else (), fingerprint=None)
    return _status(out, settings, model_identity(model), fields=IDENTITY_FIELDS, fingerprint=None)


# ---------------------------------------------------------------------------------------------- settings
def _check_settings(batch_size: Any, max_tokens: Any, max_length: Any, batches_per_shard: Any,
                    shard_bytes: Any, weights_dtype: Any) -> None:
    for name, value, none_ok in (("batch_size", batch_size, False), ("max_tokens", max_tokens, True),
                                 ("max_length", max_length, True), ("batches_per_shard", batches_per_shard, True),
                                 ("shard_bytes", shard_bytes, False)):
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SettingError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {value!r}.")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise SettingError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}.")


def _stored_weights(weights_dtype: str, model_dtype: str) -> str:
    """How shards store weights: ``auto`` keeps 16 bits (where lossless) for a 16-bit model, else float32."""
    if weights_dtype == "auto":
        return "lossless16" if model_dtype in ("bfloat16", "float16") else "float32"
    return weights_dtype


def _forward_kwargs(model: Any) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model takes it: routing needs no LM head over every position."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class _Batch:
    shard: int
    chunks: list[_Chunk]


@dataclass
class _ShardEnd:
    shard: int
    tokens: int
    docs: int
    digest: str


def _plan(chunks: Iterable[_Chunk], batch_size: int, batches_per_shard: int | None,
          tokens_per_shard: int) -> Iterator[_Batch | _ShardEnd]:
    """Batches of ``batch_size`` chunks, each tagged with its shard, and a ``_ShardEnd`` closing each shard.

    A shard ends after ``batches_per_shard`` batches when that is given, else once it holds
    ``tokens_per_shard`` tokens: a pure function of the corpus and the settings (resume and ranks rely on it)."""
    shard, n_batches, n_tok, n_docs = 0, 0, 0, 0
    h = hashlib.sha256()
    for batch in _batched(chunks, batch_size):
        for ch in batch:
            h.update(json.dumps([ch.text_index, ch.chunk, ch.ids, ch.labels], default=str).encode())
        n_batches += 1
        n_tok += sum(len(c.ids) for c in batch)
        n_docs += len(batch)
        yield _Batch(shard, batch)
        full = n_batches >= batches_per_shard if batches_per_shard is not None else n_tok >= tokens_per_shard
        if full:
            yield _ShardEnd(shard, n_tok, n_docs, h.hexdigest())
            shard, n_batches, n_tok, n_docs, h = shard + 1, 0, 0, 0, hashlib.sha256()
    if n_batches:
        yield _ShardEnd(shard, n_tok, n_docs, h.hexdigest())


_DONE = object()


class _Prefetch:
    """Runs an iterator in a thread (tokenisation overlaps the forward), at most ``depth`` items ahead; its
    exceptions are raised in the caller's thread."""

    def __init__(self, items: Iterator[Any], depth: int = 8) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="moe-routing-tokenize", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the caller
            self._put(_Failure(exc))
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Failure:
    exc: BaseException


@dataclass
class _ShardJob:
    trace: RoutingTrace
    first_doc: int
    chunks: list[_Chunk]
    label_names: list[str]
    path: Path
    digest: str
    fingerprint: str
    weights: str


def _write_job(job: _ShardJob) -> int:
    """Label a shard's trace with its corpus labels and write it; returns its token count."""
    per_doc: dict[str, list[Any]] = {n: [c.labels[n] for c in job.chunks] for n in job.label_names}
    per_doc["text_index"] = [c.text_index for c in job.chunks]
    per_doc["chunk"] = [c.chunk for c in job.chunks]
    local = job.trace.doc_ids - job.first_doc
    trace = job.trace.with_labels(**{n: np.asarray(v)[local] for n, v in per_doc.items()})
    table = with_shard_metadata(trace_to_table(trace, weights_dtype=job.weights), job.digest, job.fingerprint)
    write_shard(table, job.path)
    return trace.num_tokens


class _ShardWriter:
    """Writes shards in a thread (Parquet encoding overlaps the next forward), at most ``depth`` waiting.

    ``submit`` blocks while the queue is full (memory stays flat) and raises, in the caller, an error the
    writer met; ``close`` waits for every queued shard and raises it too."""

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.tokens = 0
        self._thread = threading.Thread(target=self._run, name="moe-routing-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _DONE:
                return
            if self._error is not None:
                continue  # drain: a failed writer writes nothing more
            try:
                self.tokens += _write_job(job)
            except BaseException as exc:  # raised in the caller
                self._error = exc

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: _ShardJob) -> None:
        self.check()
        while self._thread.is_alive():
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                self.check()
        self.check()
        raise TraceError("the shard writer stopped unexpectedly; re-run the same command to continue.")

    def close(self) -> None:
        """Wait for the queued shards; raise the writer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self.check()


# ---------------------------------------------------------------------------------------------- capture_corpus
def capture_corpus(
    model: Any,
    tokenizer: Any,
    texts_or_dataset: Any,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    max_length: int | None = None,
    labels: Sequence[str] | Mapping[str, Sequence[Any]] | None = None,
    text_column: str = "text",
    logits: bool = False,
    batches_per_shard: int | None = None,
    shard_bytes: int = SHARD_BYTES,
    weights_dtype: WeightsDtype = "auto",
    overwrite: bool = False,
    if_stale: Literal["raise", "overwrite"] = "raise",
    progress: bool = True,
) -> TraceReader:
    """Capture routing for a whole corpus into ``out_dir`` (Parquet shards + manifest), memory bounded.

    Args:
        texts_or_dataset: a list of strings, a pandas/polars DataFrame or ``datasets.Dataset`` with a
            ``text_column`` (other columns become labels unless ``labels`` names some), or dicts.
        labels: label columns to keep, or (for a list of texts) a mapping name -> one value per text.
        max_tokens: stop after this many real tokens (deterministic: the same prefix every time).
        max_length: tokens per chunk; longer texts are split into chunks (default: the model's
            ``max_position_embeddings``, capped at 2048).
        batches_per_shard: batches per Parquet shard; by default a shard holds about ``shard_bytes``
            (uncompressed, from the real shape: layers x top-k x the stored dtypes). Memory holds at most three
            (one filling, one queued, one being written).
        weights_dtype: ``"auto"`` stores weights in 16 bits when the model computes in bf16/fp16 (float16 in
            Parquet where every value survives the round trip, else float32: lossless either way), float32 for
            a float32 model; ``"float16"`` rounds them to 16 bits; recorded in the manifest.
        overwrite: replace a trace already in ``out_dir`` (otherwise a complete one is returned as is, one that
            lost shards gets exactly those rewritten, and an interrupted one is resumed).
        if_stale: what to do with a trace made with other settings or another model: ``"raise"`` (the error
            names each field that differs) or ``"overwrite"`` it.

    The decision is ``trace_status`` (complete / stale / partial / absent). Routing needs no LM head: the
    forward runs with ``logits_to_keep=1`` where the model takes it. Tokenisation runs ahead in a thread and
    shards are written by another (bounded queues); an error in either is raised here, and a failed run never
    marks its trace complete. Every token row carries ``text_index`` (the input's position in the corpus) and
    ``chunk`` labels besides the corpus labels and ``phase``; corpus labels are one value per text, and a
    missing one (None / NaN) is refused. A directory another run is writing is refused (``TraceLockedError``).
    Returns a ``TraceReader`` over ``out_dir``; its ``read_documents`` uses the document index.
    """
    out = Path(out_dir)
    rank, world = _dist()
    _check_settings(batch_size, max_tokens, max_length, batches_per_shard, shard_bytes, weights_dtype)
    if if_stale not in ("raise", "overwrite"):
        raise SettingError(f"if_stale must be 'raise' or 'overwrite', got {if_stale!r}.")
    cfg_max = int(getattr(model.config.get_text_config(), "max_position_embeddings", 2048) or 2048)
    max_length = int(max_length or min(cfg_max, 2048))
    records, label_names, length = _iter_records(texts_or_dataset, labels, text_column)
    label_names = [n for n in label_names if n not in ("text_index", "chunk", "phase")]
    settings = {
        "batch_size": batch_size, "max_tokens": max_tokens, "max_length": max_length, "logits": logits,
        "batches_per_shard": batches_per_shard, "labels": label_names, "text_column": text_column,
        "padding_side": getattr(tokenizer, "padding_side", "right"), "weights_dtype": weights_dtype,
        **({"shard_bytes": shard_bytes} if batches_per_shard is None else {}),
    }
    facts = _model_facts(model, tokenizer)
    fingerprint = run_fingerprint(settings, facts["model"])
    lock = DirectoryLock(out) if rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        status = _status(out, settings, facts["model"], fields=IDENTITY_FIELDS, fingerprint=fingerprint)
        if status == "stale" and not overwrite:
            if if_stale == "raise":
                raise TraceError(
                    f"{out} holds a trace made with other settings or another model: " + "; ".join(status.reasons)
                    + ". Pass overwrite=True (--overwrite) to replace it, or choose another output directory."
                )
            if rank == 0:
                print(f"[moe-routing] {out} is stale ({'; '.join(status.reasons)}); capturing again.",
                      file=sys.stderr)
            overwrite = True
        if status == "complete" and not overwrite:
            reader = TraceReader(out)
            foreign = [e for e in reader.verify() if not isinstance(e, MissingShardError)]
            if foreign:
                raise foreign[0]
            if rank == 0:
                print(f"[moe-routing] {out} is already complete ({reader.manifest.get('tokens')} tokens); nothing "
                      "to do (overwrite=True to redo).", file=sys.stderr)
            return reader
        if status == "partial" and rank == 0 and not overwrite:
            what = ("rewriting exactly those" if "missing" in status.reasons[0] else
                    "resuming (the shards written are kept)")
            print(f"[moe-routing] {out}: {status.reasons[0]}; {what}.", file=sys.stderr)
        run = _Run(model=model, tokenizer=tokenizer, out=out, label_names=label_names, length=length,
                   settings=settings, facts=facts, fingerprint=fingerprint, rank=rank, world=world,
                   batch_size=batch_size, max_tokens=max_tokens, max_length=max_length, logits=logits,
                   batches_per_shard=batches_per_shard, shard_bytes=shard_bytes, progress=progress)
        return run.execute(records, overwrite=overwrite)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """One capture_corpus run once the directory is ours (rank 0 holds its lock), as named steps."""

    model: Any
    tokenizer: Any
    out: Path
    label_names: list[str]
    length: int | None
    settings: dict[str, Any]
    facts: dict[str, Any]
    fingerprint: str
    rank: int
    world: int
    batch_size: int
    max_tokens: int | None
    max_length: int
    logits: bool
    batches_per_shard: int | None
    shard_bytes: int
    progress: bool

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST

    def execute(self, records: Iterator[tuple[str, dict[str, Any]]], *, overwrite: bool) -> TraceReader:
        self.prepare_directory(overwrite)
        stats = {"empty": 0, "chunked": 0}
        chunks = _plan_chunks(records, self.tokenizer, self.max_length, self.max_tokens, self.label_names, stats)
        stored = _stored_weights(self.settings["weights_dtype"], self.facts["model"]["dtype"])
        with capture(self.model, logits=self.logits) as rec:
            layout = TraceLayout.of_recorder(
                rec, labels=[*self.label_names, "text_index", "chunk", "phase"],
                meta={"tokenizer": (self.facts.get("tokenizer") or {}).get("name_or_path")},
                weights_dtype="float32" if stored == "float32" else "float16")
            tokens_per_shard = max(1, self.shard_bytes // layout.bytes_per_token())
            self.announce(layout)
            if self.rank == 0:
                self.begin_manifest(layout)
            planned, index, _counts = self.run_shards(rec, _plan(chunks, self.batch_size, self.batches_per_shard,
                                                                tokens_per_shard), stored)
        self.report_corpus(stats)
        _barrier()
        if self.rank == 0:
            self.finish_manifest(planned, index)
        _barrier()
        return TraceReader(self.out)

    def prepare_directory(self, overwrite: bool) -> None:
        """Clear what ``overwrite`` replaces; drop temporaries left by a run killed mid-write."""
        out = self.out
        if self.rank == 0:
            if overwrite and (out / SHARD_DIR).exists():
                for p in (out / SHARD_DIR).glob("part-*.parquet"):
                    p.unlink()
                for p in (out / "ranks").glob("rank-*.json") if (out / "ranks").exists() else []:
                    p.unlink()
            if overwrite:
                (out / DOC_INDEX).unlink(missing_ok=True)
            (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out / SHARD_DIR)  # left by a run killed mid-write; live writers' files stay
            remove_stale_temporaries(out)
        _barrier()

    def announce(self, layout: TraceLayout) -> None:
        """Print the shape and the expected disk size (uncompressed, from the real shape) before any work."""
        if self.rank != 0:
            return
        per_tok = layout.bytes_per_token()
        total = self.max_tokens
        est = (f"~{_human(per_tok * total)} for {total} tokens" if total else
               f"~{_human(per_tok * 1_000_000)} per million tokens")
        print(f"[moe-routing] capturing {self.facts['model_name'] or type(self.model).__name__}: "
              f"{len(layout.layers)} MoE layers x top-{layout.top_k} of {layout.num_experts} experts, "
              f"{per_tok} bytes per token ({layout.weights_dtype} weights) -> {self.out} ({est} before "
              "compression)", file=sys.stderr)

    def begin_manifest(self, layout: TraceLayout) -> None:
        manifest = layout.manifest(
            **self.facts, settings=self.settings, fingerprint=self.fingerprint, complete=False,
            world_size=self.world, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(self.manifest_path, manifest)

    def run_shards(self, rec: Any, plan: Iterator[_Batch | _ShardEnd], stored: str
                   ) -> tuple[dict[str, dict[str, Any]], list[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                              dict[str, int]]:
        """Forward every batch of this rank's shards; a writer thread writes each finished shard."""
        bar = _progress(self.progress and self.rank == 0, self.max_tokens, self.length)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        kwargs = _forward_kwargs(self.model)
        planned: dict[str, dict[str, Any]] = {}
        index: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        counts = {"written": 0, "skipped": 0}
        source = _Prefetch(plan)
        writer = _ShardWriter()
        doc = 0
        mine: list[_Chunk] = []
        lengths: list[int] = []
        state: str | None = None  # this shard: "run", "exists", "other"
        try:
            for item in source:
                if isinstance(item, _Batch):
                    if state is None:
                        path = self.out / SHARD_DIR / shard_name(item.shard)
                        state = ("other" if item.shard % self.world != self.rank else
                                 "exists" if path.exists() else "run")
                        if state == "run":
                            rec.clear()
                            rec.start_docs_at(doc)
                    n_tok = sum(len(c.ids) for c in item.chunks)
                    lengths.extend(len(c.ids) for c in item.chunks)
                    if state == "run":
                        ids, mask = _pad(item.chunks, pad_id, left)
                        before = rec.tokens_recorded
                        with torch.inference_mode():
                            self.model(input_ids=ids.to(self.model.device),
                                       attention_mask=mask.to(self.model.device), **kwargs)
                        rec.check_recorded(before, int(mask.sum()))  # all planned tokens, or raise
                        mine.extend(item.chunks)
                        writer.check()
                    bar.update(n_tok)
                    continue
                name, path = shard_name(item.shard), self.out / SHARD_DIR / shard_name(item.shard)
                planned[name] = shard_record(item.tokens, item.digest)
                rows = np.asarray(lengths, dtype=np.int64)
                index.append((item.shard, np.arange(doc, doc + item.docs, dtype=np.int64),
                              np.r_[0, np.cumsum(rows)[:-1]].astype(np.int64), rows))
                if state == "exists":
                    _check_existing(path, item.digest, self.fingerprint)
                    counts["skipped"] += 1
                elif state == "run":
                    writer.submit(_ShardJob(rec.trace(clear=True), doc, mine, self.label_names, path, item.digest,
                                            self.fingerprint, stored))
                    counts["written"] += 1
                doc += item.docs
                mine, lengths, state = [], [], None
            writer.close()
        except BaseException:
            _close_quietly(writer)  # finish what is queued (complete shards help a resume); this error wins
            raise
        finally:
            source.close()
            bar.close()
        (self.out / "ranks").mkdir(exist_ok=True)
        write_json_atomic(self.out / "ranks" / f"rank-{self.rank:03d}.json",
                          {"rank": self.rank, "world_size": self.world, "shards_written": counts["written"],
                           "shards_skipped": counts["skipped"], "tokens_written": writer.tokens})
        return planned, index, counts

    def report_corpus(self, stats: Mapping[str, int]) -> None:
        if stats["empty"]:
            warnings.warn(f"{stats['empty']} empty texts were skipped.", stacklevel=4)
        if stats["chunked"] and self.rank == 0:
            print(f"[moe-routing] {stats['chunked']} texts were longer than max_length={self.max_length} tokens "
                  "and were split into chunks (label 'chunk'); nothing was truncated.", file=sys.stderr)

    def finish_manifest(self, planned: Mapping[str, dict[str, Any]],
                        index: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Verify every planned shard, write the document index, mark the manifest complete (rank 0)."""
        if not planned:
            raise CorpusError("the corpus produced no tokens (empty corpus, or every text was empty).")
        top_k, stored = _verify_shards(self.out, planned, self.fingerprint)
        write_document_index(self.out, index, self.fingerprint)
        manifest = json.loads(self.manifest_path.read_text())
        manifest.update(
            complete=True, num_shards=len(planned), shards=dict(planned),
            tokens=sum(r["tokens"] for r in planned.values()), top_k=max(top_k, int(manifest["top_k"])),
            weights_stored=stored, document_index=DOC_INDEX,
            ranks=[json.loads(p.read_text()) for p in sorted((self.out / "ranks").glob("rank-*.json"))],
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        write_json_atomic(self.manifest_path, manifest)


def _close_quietly(writer: _ShardWriter) -> None:
    """Wait for the writer after another error (that error is the one the caller sees)."""
    with contextlib.suppress(BaseException):
        writer.close()


def _verify_shards(out: Path, planned: Mapping[str, Mapping[str, Any]], fingerprint: str
                   ) -> tuple[int, dict[str, int]]:
    """Every planned shard is on disk with its planned tokens, input hash and this run's fingerprint, and no
    other shard is; returns the widest k among them (the recorder may widen k after the manifest was begun)
    and how many shards store float16 / float32 weights."""
    present = {p.name for p in (out / SHARD_DIR).glob("part-*.parquet")}
    missing = sorted(set(planned) - present)
    if missing:
        raise TraceError(f"{out}: shards {missing[:10]} were not written (did another rank fail?); the trace is "
                         "not marked complete. Re-run the same command to write them.")
    extra = sorted(present - set(planned))
    if extra:
        raise ForeignShardError(f"{out}: shards {extra[:10]} are not part of this capture (left by a run with more "
                                "shards, or copied in); move them out of the directory and re-run.")
    width = 1
    stored: dict[str, int] = {}
    for name, record in planned.items():
        path = out / SHARD_DIR / name
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        if (meta.get(INPUT_KEY, b"").decode() != record["input_sha256"]
                or meta.get(FINGERPRINT_KEY, b"").decode() != fingerprint):
            raise ForeignShardError(f"shard {path} was not written by this capture; delete it and re-run.")
        if pf.metadata.num_rows != record["tokens"]:
            raise TraceError(
                f"shard {path} holds {pf.metadata.num_rows} tokens but its batches planned {record['tokens']}: "
                "some forward passes were not recorded (a compiled model?); the trace is not marked complete."
            )
        width = max(width, pf.schema_arrow.field("expert_ids").type.value_type.list_size)
        kind = stored_weights_dtype(pf.schema_arrow)
        stored[kind] = stored.get(kind, 0) + 1
    return width, stored


def _check_existing(path: Path, digest: str, fingerprint: str) -> None:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise TraceError(f"shard {path} is unreadable ({exc}); delete it and re-run to rewrite it.") from exc
    if meta.get(INPUT_KEY, b"").decode() != digest:
        raise TraceError(
            f"shard {path} was captured from different input than this corpus gives for it now (the corpus or "
            "tokenizer changed, or the shard was copied from another run); delete that shard and re-run to "
            "rewrite it, or pass overwrite=True (--overwrite), or use a new output directory."
        )
    if meta.get(FINGERPRINT_KEY, b"").decode() != fingerprint:
        raise ForeignShardError(
            f"shard {path} has this corpus's input but was written by a run with another model or settings "
            "(copied from another trace?); delete it and re-run the same command to rewrite it."
        )


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(show: bool, total_tokens: int | None, length: int | None) -> Any:
    if not show:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="capture", file=sys.stderr,
                mininterval=1.0, smoothing=0.1, postfix=None if length is None else {"texts": length})


def estimate_trace_bytes(num_tokens: int, num_layers: int, top_k: int, num_experts: int, logits: bool,
                         *, weight_bytes: int = 4) -> int:
    """Uncompressed bytes a trace of this size needs (``TraceLayout.bytes_per_token``, no labels)."""
    layout = TraceLayout(layers=tuple(range(num_layers)), num_experts=num_experts, top_k=top_k, has_logits=logits)
    return math.ceil(layout.bytes_per_token(weight_bytes) * num_tokens)
