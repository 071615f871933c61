"""Trace directories: Parquet shards plus a JSON manifest, written atomically, read lazily.

Layout of a trace directory::

    manifest.json                 format version, model facts, layers, top_k, num_experts, labels, run settings
    shards/part-000000.parquet    one row per real token (see SCHEMA below); shard i holds batches of slice i

Each shard row: ``doc_id int64, position int32, token_id int32, <labels...>,
expert_ids fixed_size_list<fixed_size_list<int16, k>, layers>, weights fixed_size_list<...float32...>``
(int32 ids for more than 32,767 experts) and, when captured with logits,
``router_logits fixed_size_list<fixed_size_list<float16, experts>, layers>``.
DuckDB reads ``expert_ids[layer][slot]`` (1-based), Polars reads ``Array`` columns, pandas reads lists.
``weights`` are float32, or float16 when the model computed them in 16 bits and every value survives the 16-bit
round trip (``weights_dtype`` in the manifest says what was asked; a shard's schema says what it holds); a
float32 column is written with BYTE_STREAM_SPLIT so bf16 values widened to float32 cost about 16 bits on disk.
Row groups hold about ``ROW_GROUP_BYTES`` each, so a reader fetches a document without decoding its whole shard.

``documents.parquet`` (the document index): ``doc_id, shard, row_start, num_rows``, one row per run of a
document's rows in a shard; ``TraceReader.read_documents`` uses it to read only the row groups it needs.

Shards are written to a temporary name and renamed into place, so a shard that exists is complete; the manifest
is rewritten the same way. A finished manifest lists every shard (``shards``: name -> token count and input
hash; ``num_shards``) and each shard's Parquet metadata carries its input hash and the run's fingerprint, so a
reader notices a deleted shard or one copied from another run. One writer at a time: a run holds
``.moe-routing.lock`` in the directory while it writes. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptShardError, ForeignShardError, MissingShardError, TraceError, TraceLockedError
from .trace import RoutingTrace, expert_dtype

FORMAT_NAME = "moe-routing-trace"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
_SHARD_RE = re.compile(r"^part-(\d{6})\.parquet$")
RESERVED_COLUMNS = frozenset({"doc_id", "position", "token_id", "expert_ids", "weights", "router_logits"})
_REQUIRED_MANIFEST_KEYS = ("format", "format_version", "layers", "num_experts", "top_k", "labels", "has_logits")
LOCK_NAME = ".moe-routing.lock"
LOCK_OWNER = ".moe-routing.lock.json"
INPUT_KEY = b"moe_routing.input_sha256"
FINGERPRINT_KEY = b"moe_routing.fingerprint"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_VIEW_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
DOC_INDEX = "documents.parquet"
#: Uncompressed bytes a row group aims at (a document read decodes only the row groups holding its rows).
ROW_GROUP_BYTES = 4 * 2**20
#: Bytes per stored token a shard aims at by default (uncompressed routing columns; see ``TraceLayout``).
SHARD_BYTES = 128 * 2**20
#: What ``weights_dtype`` may ask for: ``auto`` keeps the model's precision (16 bits only when lossless).
WeightsDtype = Literal["auto", "float32", "float16"]
WEIGHTS_DTYPES = ("auto", "float32", "float16")


@dataclass(frozen=True)
class TraceLayout:
    """The shape of a trace without its rows: what a manifest says and what a disk estimate needs.

    A capture's recorder (``TraceLayout.of_recorder``) and an in-memory trace (``TraceLayout.of_trace``) both
    give one, so a manifest is written from the same fields whichever produced the rows.
    """

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    labels: tuple[str, ...] = ()
    has_logits: bool = False
    model_name: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    weights_dtype: str = "float32"

    @classmethod
    def of_trace(cls, trace: RoutingTrace, *, weights_dtype: str = "float32") -> TraceLayout:
        return cls(layers=tuple(trace.layers), num_experts=trace.num_experts, top_k=trace.top_k,
                   labels=tuple(sorted(trace.labels)), has_logits=trace.router_logits is not None,
                   model_name=trace.model_name, meta=dict(trace.meta), weights_dtype=weights_dtype)

    @classmethod
    def of_recorder(cls, rec: Any, *, labels: Sequence[str] = (), meta: Mapping[str, Any] | None = None,
                    weights_dtype: str = "float32") -> TraceLayout:
        """From a ``capture`` recorder before anything ran (``rec.layers, num_experts, top_k, logits``)."""
        adapter = getattr(getattr(rec, "adapter", None), "family", None)
        return cls(layers=tuple(rec.layers), num_experts=int(rec.num_experts), top_k=int(rec.top_k or 1),
                   labels=tuple(sorted(labels)), has_logits=bool(rec.logits), model_name=str(rec.model_name),
                   meta={**({"adapter": adapter} if adapter else {}), **(meta or {})},
                   weights_dtype=weights_dtype)

    def bytes_per_token(self, weight_bytes: int | None = None) -> int:
        """Uncompressed bytes one token takes: doc_id/position/token_id (16), ~8 per label, expert ids
        ``[layers, k]`` (int16 or int32), weights ``[layers, k]`` (2 or 4 bytes), router logits (float16)."""
        wb = weight_bytes if weight_bytes is not None else (4 if self.weights_dtype == "float32" else 2)
        ib = expert_dtype(self.num_experts).itemsize
        n = len(self.layers)
        return 16 + 8 * len(self.labels) + n * self.top_k * (ib + wb) + (n * self.num_experts * 2
                                                                        if self.has_logits else 0)

    def manifest(self, **extra: Any) -> dict[str, Any]:
        from ._version import __version__

        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "moe_routing_version": __version__,
            "model_name": self.model_name,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "labels": sorted(self.labels),
            "has_logits": self.has_logits,
            "weights_dtype": self.weights_dtype,
            "meta": dict(self.meta),
            **extra,
        }


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def shard_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise TraceError(
            f"could not write {path}: {exc.strerror or exc}. Completed shards in {path.parent} are intact; "
            "free disk space (or fix permissions) and re-run the same command to continue."
        ) from exc


def write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files left by writers that no longer run; another live process's in-flight
    temporary files are never touched. Returns the files removed."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TMP_RE.match(p.name)
        if m and int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid"))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class DirectoryLock:
    """An exclusive, non-blocking lock on a trace directory (``filelock`` on ``<dir>/.moe-routing.lock``).

    The operating system releases it when the holder exits, even when killed, so it never goes stale. A second
    writer gets ``TraceLockedError`` naming the lock and the process holding it.
    """

    def __init__(self, directory: str | Path, *, purpose: str = "capture") -> None:
        self.directory = Path(directory)
        self.purpose = purpose
        self._lock: Any = None

    @property
    def lock_path(self) -> Path:
        return self.directory / LOCK_NAME

    def holder(self) -> dict[str, Any] | None:
        """What the current holder wrote about itself (pid, host, purpose, since), if readable."""
        try:
            info = json.loads((self.directory / LOCK_OWNER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def acquire(self) -> DirectoryLock:
        from filelock import FileLock, Timeout

        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            info = self.holder() or {}
            who = (f"process {info.get('pid')} on {info.get('host')} ({info.get('purpose')}, since "
                   f"{info.get('since')})" if info else "another process")
            raise TraceLockedError(
                f"{self.directory} is being written by {who}: it holds the lock {self.lock_path}. Wait for that "
                "run to finish (then re-run this command: a finished trace is reused or resumed), or write to "
                "another directory. The lock is released automatically when its process exits."
            ) from None
        self._lock = lock
        with contextlib.suppress(TraceError):  # the lock itself is what counts; the note is a courtesy
            write_json_atomic(self.directory / LOCK_OWNER, {
                "pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        (self.directory / LOCK_OWNER).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _nested_list(arr: np.ndarray, pa_type: pa.DataType) -> pa.Array:
    """[tokens, a, b] numpy -> fixed_size_list<fixed_size_list<type, b>, a>."""
    _n, a, b = arr.shape
    flat = pa.array(np.ascontiguousarray(arr).reshape(-1), type=pa_type)
    inner = pa.FixedSizeListArray.from_arrays(flat, b)
    return pa.FixedSizeListArray.from_arrays(inner, a)


def _unnest(col: pa.ChunkedArray | pa.Array, a: int, b: int, dtype: Any) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    flat = col.flatten().flatten()
    return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(col), a, b)


def _weights_array(weights: np.ndarray, weights_dtype: str) -> pa.Array:
    """``[tokens, layers, k]`` float32 weights as a nested column: ``float32`` as is; ``float16`` cast (asked
    for, may round); ``lossless16`` float16 when every value survives the round trip, else float32."""
    if weights_dtype not in ("float32", "float16", "lossless16"):
        raise TraceError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}.")
    if weights_dtype == "float32":
        return _nested_list(weights, pa.float32())
    half = weights.astype(np.float16)
    if weights_dtype == "lossless16":
        with np.errstate(invalid="ignore"):
            exact = np.array_equal(half.astype(np.float32), weights, equal_nan=True)
        if not exact:
            return _nested_list(weights, pa.float32())
    return _nested_list(half, pa.float16())


def trace_to_table(trace: RoutingTrace, *, weights_dtype: str = "float32") -> pa.Table:
    """One row per token; see the module docstring for the schema (``weights_dtype``: ``float32``,
    ``float16`` (rounds) or ``lossless16`` (float16 where exact, else float32))."""
    bad = RESERVED_COLUMNS.intersection(trace.labels)
    if bad:
        raise TraceError(f"label names {sorted(bad)} collide with trace columns; rename those labels.")
    cols: dict[str, pa.Array] = {
        "doc_id": pa.array(trace.doc_ids, pa.int64()),
        "position": pa.array(trace.positions, pa.int32()),
        "token_id": pa.array(trace.token_ids, pa.int32()),
    }
    for key, value in trace.labels.items():
        cols[key] = pa.array(value)
    id_type = pa.int32() if trace.expert_ids.dtype == np.int32 else pa.int16()
    cols["expert_ids"] = _nested_list(trace.expert_ids, id_type)
    cols["weights"] = _weights_array(trace.weights, weights_dtype)
    if trace.router_logits is not None:
        cols["router_logits"] = _nested_list(trace.router_logits, pa.float16())
    return pa.table(cols)


def stored_weights_dtype(schema: pa.Schema) -> str:
    """``"float16"`` or ``"float32"``: how a shard stores its weights."""
    t = schema.field("weights").type
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        t = t.value_type
    return "float16" if pa.types.is_float16(t) else "float32"


def write_shard(table: pa.Table, path: Path, *, row_group_bytes: int | None = None) -> None:
    """Write one shard atomically (temporary name, fsync, rename). Deterministic bytes for equal tables.

    Row groups of about ``row_group_bytes`` (uncompressed), with statistics, so readers can skip them; float32
    weights with BYTE_STREAM_SPLIT (16-bit values widened to float32 then compress to about 16 bits)."""
    sink = pa.BufferOutputStream()
    row_group_bytes = ROW_GROUP_BYTES if row_group_bytes is None else row_group_bytes
    rows = max(1, int(row_group_bytes * max(table.num_rows, 1) // max(table.nbytes, 1)))
    split = [] if stored_weights_dtype(table.schema) != "float32" else ["weights.list.element.list.element"]
    pq.write_table(table, sink, compression="zstd", write_statistics=True, row_group_size=rows,
                   use_byte_stream_split=split or False,
                   use_dictionary=[c for c in table.column_names if c != "weights"])
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


def document_runs(doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_id, row_start, num_rows)`` of each run of equal ``doc_ids`` (``[tokens]``), in row order."""
    doc_ids = np.asarray(doc_ids)
    if not len(doc_ids):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
    lengths = np.diff(np.r_[starts, len(doc_ids)])
    return doc_ids[starts].astype(np.int64), starts.astype(np.int64), lengths.astype(np.int64)


def write_document_index(path: Path, runs: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                         fingerprint: str) -> None:
    """``path/documents.parquet`` from ``(shard index, doc_id, row_start, num_rows)`` per shard."""
    docs = [r[1] for r in runs]
    table = pa.table({
        "doc_id": pa.array(np.concatenate(docs) if docs else np.zeros(0, np.int64), pa.int64()),
        "shard": pa.array(np.concatenate([np.full(len(r[1]), r[0], np.int32) for r in runs]) if runs
                          else np.zeros(0, np.int32), pa.int32()),
        "row_start": pa.array(np.concatenate([r[2] for r in runs]) if runs else np.zeros(0, np.int64), pa.int64()),
        "num_rows": pa.array(np.concatenate([r[3] for r in runs]) if runs else np.zeros(0, np.int64), pa.int64()),
    }).replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _atomic_write_bytes(path / DOC_INDEX, sink.getvalue().to_pybytes())


def config_hash(config: Mapping[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def manifest_for(trace_or_layout: RoutingTrace | TraceLayout, **extra: Any) -> dict[str, Any]:
    """The manifest fields of a trace or a ``TraceLayout`` (plus ``extra``)."""
    layout = trace_or_layout if isinstance(trace_or_layout, TraceLayout) else TraceLayout.of_trace(trace_or_layout)
    return layout.manifest(**extra)


def shard_record(tokens: int, input_sha256: str) -> dict[str, Any]:
    """What a finished manifest says about one shard."""
    return {"tokens": int(tokens), "input_sha256": str(input_sha256)}


def with_shard_metadata(table: pa.Table, input_sha256: str, fingerprint: str) -> pa.Table:
    """The table with its input hash and the run's fingerprint in the Parquet schema metadata."""
    meta = {**(table.schema.metadata or {}), INPUT_KEY: input_sha256.encode(), FINGERPRINT_KEY: fingerprint.encode()}
    return table.replace_schema_metadata(meta)


def _trace_inputs_hash(trace: RoutingTrace) -> str:
    h = hashlib.sha256()
    for arr in (trace.doc_ids, trace.positions, trace.token_ids):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _document_splits(doc_ids: np.ndarray, tokens_per_shard: int | None) -> list[tuple[int, int]]:
    """[start, stop) token ranges of about ``tokens_per_shard`` tokens each, cut only where the document changes."""
    n = len(doc_ids)
    if tokens_per_shard is None or n == 0:
        return [(0, n)]
    if tokens_per_shard < 1:
        raise TraceError(f"tokens_per_shard must be >= 1, got {tokens_per_shard}.")
    cuts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])  # first token of each document run
    out, start = [], 0
    for c in cuts[1:].tolist():
        if c - start >= tokens_per_shard:
            out.append((start, c))
            start = c
    out.append((start, n))
    return out


def write_trace(trace: RoutingTrace, path: str | Path, *, overwrite: bool = False,
                tokens_per_shard: int | None = None, weights_dtype: WeightsDtype = "float32") -> Path:
    """Write an in-memory trace as a trace directory: one shard, or shards of about ``tokens_per_shard`` tokens
    (documents never span shards), with a document index. ``weights_dtype="float16"`` stores 16-bit weights
    (rounded); ``"auto"`` stores them in 16 bits only where that is lossless.

    Refuses (without ``overwrite=True``) a directory that holds a trace or shard files already, and one that
    another process is writing.
    """
    path = Path(path)
    existing = sorted(p.name for p in (path / SHARD_DIR).glob("part-*.parquet")) if (path / SHARD_DIR).is_dir() \
        else []
    if (path / MANIFEST).exists() and not overwrite:
        raise TraceError(f"{path} already holds a trace; pass overwrite=True to replace it.")
    if existing and not overwrite:
        raise TraceError(
            f"{path} holds {len(existing)} shard files ({existing[0]}, ...) but no {MANIFEST} (an interrupted "
            "capture, or another tool's files); pass overwrite=True to delete them and write this trace, or "
            "choose another directory."
        )
    if weights_dtype not in WEIGHTS_DTYPES:
        raise TraceError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}.")
    stored = "lossless16" if weights_dtype == "auto" else weights_dtype
    splits = _document_splits(trace.doc_ids, tokens_per_shard)
    with DirectoryLock(path, purpose="write_trace"):
        (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if overwrite:
            (path / MANIFEST).unlink(missing_ok=True)
        for old in (path / SHARD_DIR).glob("part-*.parquet"):
            old.unlink()
        (path / DOC_INDEX).unlink(missing_ok=True)
        manifest = manifest_for(TraceLayout.of_trace(trace, weights_dtype=weights_dtype))
        parts = [trace if len(splits) == 1 else trace.select(np.arange(a, b)) for a, b in splits]
        digests = [_trace_inputs_hash(part) for part in parts]
        fingerprint = config_hash({"manifest": manifest, "inputs": digests})
        records = {}
        runs = []
        for i, (part, digest) in enumerate(zip(parts, digests, strict=True)):
            table = trace_to_table(part, weights_dtype=stored)
            write_shard(with_shard_metadata(table, digest, fingerprint), path / SHARD_DIR / shard_name(i))
            records[shard_name(i)] = shard_record(part.num_tokens, digest)
            runs.append((i, *document_runs(part.doc_ids)))
        write_document_index(path, runs, fingerprint)
        write_json_atomic(path / MANIFEST, {
            **manifest, "complete": True, "num_shards": len(records), "tokens": trace.num_tokens,
            "fingerprint": fingerprint, "shards": records, "document_index": DOC_INDEX,
        })
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json``; raise TraceError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace directory {path} does not exist.")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise TraceError(
            f"{path} has no {MANIFEST}: it is not a trace directory, or its capture never started. "
            "Point at the folder given as --out / out_dir, or re-run the capture."
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{mpath} is not valid JSON ({exc}); the trace cannot be interpreted.") from exc
    if not isinstance(manifest, dict):
        raise TraceError(f"{mpath} must hold a JSON object, got {type(manifest).__name__}.")
    if manifest.get("format") != FORMAT_NAME:
        raise TraceError(f"{mpath} is not a moe-routing trace manifest (format={manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise TraceError(
            f"{path} was written with trace format version {version!r}; this moe_routing reads version "
            f"{FORMAT_VERSION}. Upgrade moe-routing (pip install -U moe-routing) or re-capture."
        )
    missing = [k for k in _REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise TraceError(f"{mpath} lacks required keys {missing}; it is incomplete or damaged.")
    layers = manifest["layers"]
    if not (isinstance(layers, list) and layers and all(isinstance(x, int) and x >= 0 for x in layers)):
        raise TraceError(f"{mpath}: 'layers' must be a non-empty list of layer indices, got {layers!r}.")
    for key in ("num_experts", "top_k"):
        if not isinstance(manifest[key], int) or isinstance(manifest[key], bool) or manifest[key] <= 0:
            raise TraceError(f"{mpath}: {key!r} must be a positive integer, got {manifest[key]!r}.")
    if not (isinstance(manifest["labels"], list) and all(isinstance(x, str) for x in manifest["labels"])):
        raise TraceError(f"{mpath}: 'labels' must be a list of names, got {manifest['labels']!r}.")
    if not isinstance(manifest["has_logits"], bool):
        raise TraceError(f"{mpath}: 'has_logits' must be true or false, got {manifest['has_logits']!r}.")
    records = manifest.get("shards")
    if records is not None:
        ok = isinstance(records, dict) and all(
            isinstance(name, str) and _SHARD_RE.match(name) and isinstance(r, dict)
            and isinstance(r.get("tokens"), int) and isinstance(r.get("input_sha256"), str)
            for name, r in records.items()
        )
        if not ok:
            raise TraceError(f"{mpath}: 'shards' must map shard names to {{tokens, input_sha256}}; it is damaged.")
        if manifest.get("num_shards") != len(records):
            raise TraceError(f"{mpath}: 'num_shards' is {manifest.get('num_shards')!r} but {len(records)} shards "
                             "are listed; the manifest is damaged. Re-run the capture with overwrite=True.")
    return manifest


class TraceReader:
    """Lazy reader of a trace directory: validates the manifest, reads shards one at a time.

    ``read()`` loads everything; ``iter_traces()`` yields one ``RoutingTrace`` per shard (memory bounded);
    ``dataset()`` gives a ``pyarrow.dataset.Dataset`` for DuckDB / Polars scans.

    Reading checks every shard against the manifest's list (token count, input hash, the run's fingerprint):
    a missing shard raises ``MissingShardError``, a shard of another run ``ForeignShardError`` (both name the
    shard; ``skip_corrupt=True`` warns and goes on). Reading a directory that is not complete warns.
    """

    def __init__(self, path: str | Path, *, skip_corrupt: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.skip_corrupt = skip_corrupt
        self.layers: tuple[int, ...] = tuple(self.manifest["layers"])
        self.num_experts: int = self.manifest["num_experts"]
        self.top_k: int = self.manifest["top_k"]
        self.label_names: list[str] = list(self.manifest["labels"])
        self.has_logits: bool = self.manifest["has_logits"]
        self.model_name: str = str(self.manifest.get("model_name", ""))

    def __repr__(self) -> str:
        return (
            f"TraceReader({str(self.path)!r}, model={self.model_name or '?'}, shards={len(self.shards())}, "
            f"layers={list(self.layers)}, experts={self.num_experts}, top_k={self.top_k}, "
            f"complete={self.complete})"
        )

    @property
    def records(self) -> dict[str, dict[str, Any]] | None:
        """Shard name -> ``{tokens, input_sha256}`` from a finished manifest (None for older traces)."""
        records = self.manifest.get("shards")
        return records if isinstance(records, dict) else None

    @property
    def missing_shards(self) -> list[str]:
        """Shards the manifest lists that are not in the directory."""
        if self.records is None:
            return []
        present = {p.name for p in self.shards()}
        return sorted(name for name in self.records if name not in present)

    @property
    def complete(self) -> bool:
        """The capture finished and every shard it wrote is still there."""
        return bool(self.manifest.get("complete", False)) and not self.missing_shards

    def incomplete_reason(self) -> str | None:
        """Why this directory is not a complete trace (None when it is)."""
        if not self.manifest.get("complete", False):
            return (f"{self.path} is incomplete (the capture was interrupted or is still running): it holds the "
                    f"{len(self.shards())} shards written so far. Re-run the capture command to finish it.")
        missing = self.missing_shards
        if missing:
            return (f"{self.path} lacks {len(missing)} of its {len(self.records or {})} shards "
                    f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): they were deleted or moved. "
                    "Re-run the same capture command to rewrite exactly those shards.")
        return None

    def shards(self) -> list[Path]:
        """Shard files in order (by index; independent of which rank wrote them)."""
        sdir = self.path / SHARD_DIR
        if not sdir.is_dir():
            return []
        found = sorted((int(m.group(1)), p) for p in sdir.iterdir() if (m := _SHARD_RE.match(p.name)))
        return [p for _, p in found]

    def _check_schema(self, table: pa.Table, shard: Path) -> None:
        need = ["doc_id", "position", "token_id", "expert_ids", "weights", *self.label_names]
        if self.has_logits:
            need.append("router_logits")
        missing = [c for c in need if c not in table.column_names]
        if missing:
            raise CorruptShardError(
                f"shard {shard} lacks columns {missing} that the manifest promises; it belongs to another "
                "trace or configuration. Move it out of the trace directory or re-capture."
            )
        n_layers, k = len(self.layers), self.top_k
        widths = set()
        for col in ("expert_ids", "weights"):
            t = table.schema.field(col).type
            ok = pa.types.is_fixed_size_list(t) and t.list_size == n_layers
            ok = ok and pa.types.is_fixed_size_list(t.value_type) and 0 < t.value_type.list_size <= k
            if not ok:
                raise CorruptShardError(
                    f"shard {shard}: column {col} has type {t}, expected [{n_layers} layers x {k}] as the "
                    "manifest says; the directory mixes two models or configurations."
                )
            widths.add(t.value_type.list_size)
        if len(widths) != 1:
            raise CorruptShardError(f"shard {shard}: expert_ids and weights have different widths {sorted(widths)}.")

    def _check_origin(self, meta: Mapping[bytes, bytes] | None, num_rows: int, shard: Path) -> None:
        """The shard is the one the manifest lists: same token count, input hash and run fingerprint."""
        records = self.records
        if records is None:
            return
        record = records.get(shard.name)
        fix = ("Move it out of the trace directory and re-run the same capture command to rewrite it, or read "
               "with skip_corrupt=True.")
        if record is None:
            if self.manifest.get("complete", False):
                raise ForeignShardError(f"shard {shard} is not one of the {len(records)} shards this trace's "
                                        f"manifest lists: it was copied in from elsewhere. {fix}")
            return
        meta = meta or {}
        got_input = meta.get(INPUT_KEY, b"").decode(errors="replace")
        got_fp = meta.get(FINGERPRINT_KEY, b"").decode(errors="replace")
        want_fp = str(self.manifest.get("fingerprint", ""))
        if got_input != record["input_sha256"] or (want_fp and got_fp and got_fp != want_fp):
            raise ForeignShardError(f"shard {shard} was written by another run (its input hash or fingerprint "
                                    f"differs from what the manifest records for it). {fix}")
        if num_rows != record["tokens"]:
            raise ForeignShardError(f"shard {shard} holds {num_rows} tokens but the manifest records "
                                    f"{record['tokens']} for it. {fix}")

    def verify(self) -> list[CorruptShardError]:
        """Check every shard against the manifest from the Parquet footers alone (no data is read): one error
        per missing, foreign or unreadable shard; empty when the directory is what its manifest says."""
        problems: list[CorruptShardError] = []
        missing = self.missing_shards
        if missing:
            problems.append(MissingShardError(f"{self.path}: shards {', '.join(missing)} are listed in the manifest "
                                              "but missing; re-run the same capture command to rewrite them."))
        for shard in self.shards():
            try:
                pf = pq.ParquetFile(shard)
                self._check_origin(pf.schema_arrow.metadata, pf.metadata.num_rows, shard)
            except CorruptShardError as exc:
                problems.append(exc)
            except (OSError, pa.ArrowException, ValueError) as exc:
                problems.append(CorruptShardError(f"shard {shard} is unreadable ({exc}); delete it and re-run the "
                                                  "same capture command to rewrite it."))
        return problems

    def read_shard(self, shard: Path, *, layers: Sequence[int] | None = None,
                   columns: Collection[str] | None = None) -> RoutingTrace:
        """One shard as a RoutingTrace; CorruptShardError naming the shard when it cannot be read.

        ``columns`` (``weights``, ``router_logits``, ``token_id`` and label names) decodes only those besides
        ``expert_ids, doc_id, position``: weights not asked for are zeros (``meta["weights_read"]`` False),
        token ids -1, labels and logits absent."""
        try:
            pf = pq.ParquetFile(shard)
            keep = None if columns is None else [c for c in pf.schema_arrow.names
                                                 if c in {"expert_ids", "doc_id", "position", *columns}]
            table = pf.read(columns=keep) if keep is not None else pq.read_table(shard)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise CorruptShardError(
                f"shard {shard} is truncated or corrupted ({exc}); the other shards are readable. Delete it "
                "and re-run the same capture command to rewrite it, or read with skip_corrupt=True."
            ) from exc
        self._check_schema(table if columns is None else pf.schema_arrow.empty_table(), shard)
        self._check_origin(pf.schema_arrow.metadata, table.num_rows, shard)
        trace = self._table_to_trace(table, shard)
        return trace if layers is None else trace.select(layers=layers)

    def _table_to_trace(self, table: pa.Table, shard: Path) -> RoutingTrace:
        """Rows of a shard (all of them or some; all columns or a projection) as a RoutingTrace."""
        cols = set(table.column_names)
        n_layers = len(self.layers)
        width = table.schema.field("expert_ids").type.value_type.list_size
        try:
            ids = _unnest(table["expert_ids"], n_layers, width, expert_dtype(self.num_experts))
            w = _unnest(table["weights"], n_layers, width, np.float32) if "weights" in cols else \
                np.zeros(ids.shape, np.float32)
            if width < self.top_k:  # a shard captured before the recorder saw a wider layer: empty slots
                ids = np.concatenate([ids, np.full((len(ids), n_layers, self.top_k - width), -1, ids.dtype)], 2)
                w = np.concatenate([w, np.zeros((len(w), n_layers, self.top_k - width), w.dtype)], 2)
            logits = None
            if self.has_logits and "router_logits" in cols:
                e = table.schema.field("router_logits").type.value_type.list_size
                logits = _unnest(table["router_logits"], n_layers, e, np.float16)
            raw_meta = self.manifest.get("meta")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            return RoutingTrace(
                expert_ids=ids,
                weights=w,
                layers=self.layers,
                num_experts=self.num_experts,
                token_ids=table["token_id"].to_numpy() if "token_id" in cols else np.full(len(ids), -1, np.int32),
                positions=table["position"].to_numpy(),
                doc_ids=table["doc_id"].to_numpy(),
                labels={k: table[k].to_numpy(zero_copy_only=False) for k in self.label_names if k in cols},
                router_logits=logits,
                model_name=self.model_name,
                meta=dict(meta or {}) if "weights" in cols else {**(meta or {}), "weights_read": False},
            )
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise CorruptShardError(f"shard {shard} holds values that do not form a valid trace: {exc}") from exc

    def document_index(self) -> pa.Table | None:
        """The document index (``doc_id, shard, row_start, num_rows``) when this trace has a valid one."""
        ipath = self.path / DOC_INDEX
        if not ipath.exists():
            return None
        try:
            table = pq.read_table(ipath)
        except (OSError, pa.ArrowException, ValueError):
            return None
        fp = (table.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode(errors="replace")
        if fp != str(self.manifest.get("fingerprint", "")):
            return None  # left by another run: never trusted
        return table

    def read_documents(self, doc_ids: Sequence[int] | np.ndarray, *,
                       layers: Sequence[int] | None = None) -> RoutingTrace:
        """The tokens of some documents (``doc_ids``), in trace order, reading only the row groups that hold
        them (through the document index; a trace without one is filtered by Parquet row-group statistics).

        Raises ``TraceError`` naming document ids the trace does not have."""
        want = np.unique(np.asarray(doc_ids, dtype=np.int64))
        index = self.document_index()
        shards = {int(m.group(1)): p for p in self.shards() if (m := _SHARD_RE.match(p.name))}
        parts: list[RoutingTrace] = []
        found: set[int] = set()
        if index is not None:
            docs = index["doc_id"].to_numpy()
            hit = np.isin(docs, want)
            sel = {c: index[c].to_numpy()[hit] for c in ("doc_id", "shard", "row_start", "num_rows")}
            found = set(sel["doc_id"].tolist())
            for s in sorted(set(sel["shard"].tolist())):
                on = sel["shard"] == s
                shard = shards.get(int(s))
                if shard is None:
                    raise MissingShardError(f"{self.path}: shard {shard_name(int(s))} holds documents "
                                            f"{sorted(set(sel['doc_id'][on].tolist()))[:10]} but is missing; re-run "
                                            "the same capture command to rewrite it.")
                parts.append(self._read_rows(shard, sel["row_start"][on], sel["num_rows"][on], want))
        else:
            for shard in self.shards():
                try:
                    table = pq.read_table(shard, filters=[("doc_id", "in", want.tolist())])
                except (OSError, pa.ArrowException, ValueError) as exc:
                    raise CorruptShardError(f"shard {shard} is unreadable ({exc}).") from exc
                if table.num_rows:
                    pf = pq.ParquetFile(shard)
                    self._check_origin(pf.schema_arrow.metadata, pf.metadata.num_rows, shard)
                    parts.append(self._table_to_trace(table, shard))
                    found.update(np.unique(table["doc_id"].to_numpy()).tolist())
        absent = sorted(set(want.tolist()) - found)
        if absent:
            raise TraceError(f"{self.path} has no document(s) {absent[:10]}{' ...' if len(absent) > 10 else ''}; "
                             "document ids are the trace's doc_ids (see documents.parquet).")
        trace = RoutingTrace.concat(parts)
        return trace if layers is None else trace.select(layers=layers)

    def _read_rows(self, shard: Path, starts: np.ndarray, lengths: np.ndarray, want: np.ndarray) -> RoutingTrace:
        """Rows ``[start, start+length)`` of a shard, decoding only the row groups that hold them."""
        try:
            pf = pq.ParquetFile(shard)
            self._check_schema(pf.schema_arrow.empty_table(), shard)
            self._check_origin(pf.schema_arrow.metadata, pf.metadata.num_rows, shard)
            sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], dtype=np.int64)
            group_start = np.r_[0, np.cumsum(sizes)[:-1]]
            rows = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lengths, strict=True)])
            group_of = np.searchsorted(group_start, rows, side="right") - 1
            groups = np.unique(group_of)
            table = pf.read_row_groups(groups.tolist())
        except CorruptShardError:
            raise
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise CorruptShardError(f"shard {shard} is unreadable ({exc}); delete it and re-run the same capture "
                                    "command to rewrite it.") from exc
        offset = np.r_[0, np.cumsum(sizes[groups])[:-1]]  # where each read group starts in ``table``
        local = rows - group_start[group_of] + offset[np.searchsorted(groups, group_of)]
        table = table.take(pa.array(local))
        got = table["doc_id"].to_numpy()
        if not np.isin(got, want).all():
            raise CorruptShardError(f"the document index of {self.path} does not match shard {shard} (it points "
                                    "at rows of other documents); delete documents.parquet to read by scan.")
        return self._table_to_trace(table, shard)

    def iter_traces(self, *, layers: Sequence[int] | None = None, _stacklevel: int = 2,
                    columns: Collection[str] | None = None) -> Iterator[RoutingTrace]:
        """Yield one RoutingTrace per shard, in order. Missing, foreign or corrupt shards raise (or warn, with
        ``skip_corrupt``); a directory whose capture has not finished warns."""
        missing = self.missing_shards
        if missing:
            exc = MissingShardError(
                f"{self.path}: shards {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} are listed in "
                f"the manifest but missing ({len(missing)} of {len(self.records or {})}); reading the rest would "
                "silently use less data. Re-run the same capture command to rewrite exactly those shards, or "
                "read with skip_corrupt=True."
            )
            if not self.skip_corrupt:
                raise exc
            warnings.warn(f"skipping: {exc}", stacklevel=_stacklevel)
        elif not self.manifest.get("complete", False):
            warnings.warn(self.incomplete_reason() or "", stacklevel=_stacklevel)
        for shard in self.shards():
            try:
                yield self.read_shard(shard, layers=layers, columns=columns)
            except CorruptShardError as exc:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping: {exc}", stacklevel=_stacklevel)

    def read(self, *, layers: Sequence[int] | None = None) -> RoutingTrace:
        """The whole trace in memory."""
        parts = list(self.iter_traces(layers=layers, _stacklevel=3))
        if not parts:
            raise TraceError(f"{self.path} holds no readable shards yet.")
        return RoutingTrace.concat(parts)

    def dataset(self):
        """A ``pyarrow.dataset.Dataset`` over all shards (for DuckDB ``FROM ds`` or ``polars.scan_pyarrow_dataset``)."""
        import pyarrow.dataset as ds

        return ds.dataset([str(p) for p in self.shards()], format="parquet")

    def duckdb(self, connection: Any = None, *, view: str = "trace"):
        """A DuckDB connection with a view ``trace`` over all shards (out-of-core SQL; arrays are 1-based).

        Example: ``r.duckdb().sql("select count(*) from trace where expert_ids[1][1] = 3")``.
        """
        import duckdb

        if not isinstance(view, str) or not _VIEW_RE.match(view):
            raise TraceError(f"view name {view!r} is not a plain SQL identifier; use letters, digits and _ only.")
        shards = self.shards()
        if not shards:
            raise TraceError(f"{self.path} holds no shards yet; there is nothing to query.")
        reason = self.incomplete_reason()
        if reason:
            warnings.warn(reason, stacklevel=2)
        con = connection or duckdb.connect()
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in shards)
        con.execute(f'create or replace view "{view}" as select * from read_parquet([{files}])')
        return con

    @property
    def num_tokens(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.shards())


def open_trace(path: str | Path, **kwargs: Any) -> TraceReader:
    """Open a trace directory lazily (nothing is read but the manifest)."""
    return TraceReader(path, **kwargs)
