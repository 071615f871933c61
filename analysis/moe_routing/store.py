"""Trace directories: Parquet shards plus a JSON manifest, written atomically, read lazily.

Layout of a trace directory::

    manifest.json                 format version, model facts, layers, top_k, num_experts, labels, run settings
    shards/part-000000.parquet    one row per real token (see SCHEMA below); shard i holds batches of slice i

Each shard row: ``doc_id int64, position int32, token_id int32, <labels...>,
expert_ids fixed_size_list<fixed_size_list<int16, k>, layers>, weights fixed_size_list<...float32...>``
and, when captured with logits, ``router_logits fixed_size_list<fixed_size_list<float16, experts>, layers>``.
DuckDB reads ``expert_ids[layer][slot]`` (1-based), Polars reads ``Array`` columns, pandas reads lists.

Shards are written to a temporary name and renamed into place, so a shard that exists is complete; the manifest
is rewritten the same way. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptShardError, TraceError
from .trace import RoutingTrace

FORMAT_NAME = "moe-routing-trace"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
_SHARD_RE = re.compile(r"^part-(\d{6})\.parquet$")
RESERVED_COLUMNS = frozenset({"doc_id", "position", "token_id", "expert_ids", "weights", "router_logits"})
_REQUIRED_MANIFEST_KEYS = ("format", "format_version", "layers", "num_experts", "top_k", "labels", "has_logits")


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
        tmp.unlink(missing_ok=True)
        raise TraceError(
            f"could not write {path}: {exc.strerror or exc}. Completed shards in {path.parent} are intact; "
            "free disk space (or fix permissions) and re-run the same command to continue."
        ) from exc


def write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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


def trace_to_table(trace: RoutingTrace) -> pa.Table:
    """One row per token; see the module docstring for the schema."""
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
    cols["expert_ids"] = _nested_list(trace.expert_ids, pa.int16())
    cols["weights"] = _nested_list(trace.weights, pa.float32())
    if trace.router_logits is not None:
        cols["router_logits"] = _nested_list(trace.router_logits, pa.float16())
    return pa.table(cols)


def write_shard(table: pa.Table, path: Path) -> None:
    """Write one shard atomically (temporary name, fsync, rename). Deterministic bytes for equal tables."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    _atomic_write_bytes(path, sink.getvalue().to_pybytes())


def config_hash(config: Mapping[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def manifest_for(trace: RoutingTrace, **extra: Any) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "moe_routing_version": __version__,
        "model_name": trace.model_name,
        "layers": list(trace.layers),
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "labels": sorted(trace.labels),
        "has_logits": trace.router_logits is not None,
        "meta": trace.meta,
        **extra,
    }


def write_trace(trace: RoutingTrace, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an in-memory trace as a one-shard trace directory."""
    path = Path(path)
    if (path / MANIFEST).exists() and not overwrite:
        raise TraceError(f"{path} already holds a trace; pass overwrite=True to replace it.")
    (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for old in (path / SHARD_DIR).glob("part-*.parquet"):
        old.unlink()
    write_shard(trace_to_table(trace), path / SHARD_DIR / shard_name(0))
    write_json_atomic(path / MANIFEST, manifest_for(trace, complete=True, num_shards=1, tokens=trace.num_tokens))
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
    return manifest


class TraceReader:
    """Lazy reader of a trace directory: validates the manifest, reads shards one at a time.

    ``read()`` loads everything; ``iter_traces()`` yields one ``RoutingTrace`` per shard (memory bounded);
    ``dataset()`` gives a ``pyarrow.dataset.Dataset`` for DuckDB / Polars scans.
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
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

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
        for col, width in (("expert_ids", k), ("weights", k)):
            t = table.schema.field(col).type
            ok = pa.types.is_fixed_size_list(t) and t.list_size == n_layers
            ok = ok and pa.types.is_fixed_size_list(t.value_type) and t.value_type.list_size == width
            if not ok:
                raise CorruptShardError(
                    f"shard {shard}: column {col} has type {t}, expected [{n_layers} layers x {width}] as the "
                    "manifest says; the directory mixes two models or configurations."
                )

    def read_shard(self, shard: Path, *, layers: Sequence[int] | None = None) -> RoutingTrace:
        """One shard as a RoutingTrace; CorruptShardError naming the shard when it cannot be read."""
        try:
            table = pq.read_table(shard)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise CorruptShardError(
                f"shard {shard} is truncated or corrupted ({exc}); the other shards are readable. Delete it "
                "and re-run the same capture command to rewrite it, or read with skip_corrupt=True."
            ) from exc
        self._check_schema(table, shard)
        n_layers = len(self.layers)
        try:
            ids = _unnest(table["expert_ids"], n_layers, self.top_k, np.int16)
            w = _unnest(table["weights"], n_layers, self.top_k, np.float32)
            logits = None
            if self.has_logits:
                e = table.schema.field("router_logits").type.value_type.list_size
                logits = _unnest(table["router_logits"], n_layers, e, np.float16)
            meta = self.manifest.get("meta") if isinstance(self.manifest.get("meta"), dict) else {}
            trace = RoutingTrace(
                expert_ids=ids,
                weights=w,
                layers=self.layers,
                num_experts=self.num_experts,
                token_ids=table["token_id"].to_numpy(),
                positions=table["position"].to_numpy(),
                doc_ids=table["doc_id"].to_numpy(),
                labels={k: table[k].to_numpy(zero_copy_only=False) for k in self.label_names},
                router_logits=logits,
                model_name=self.model_name,
                meta=dict(meta),
            )
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise CorruptShardError(f"shard {shard} holds values that do not form a valid trace: {exc}") from exc
        return trace if layers is None else trace.select(layers=layers)

    def iter_traces(self, *, layers: Sequence[int] | None = None) -> Iterator[RoutingTrace]:
        """Yield one RoutingTrace per shard, in order. Corrupt shards raise (or warn, with skip_corrupt)."""
        for shard in self.shards():
            try:
                yield self.read_shard(shard, layers=layers)
            except CorruptShardError as exc:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping: {exc}", stacklevel=2)

    def read(self, *, layers: Sequence[int] | None = None) -> RoutingTrace:
        """The whole trace in memory."""
        if not self.complete:
            warnings.warn(
                f"{self.path} is incomplete (the capture was interrupted or is still running): reading the "
                f"{len(self.shards())} shards written so far. Re-run the capture command to finish it.",
                stacklevel=2,
            )
        parts = list(self.iter_traces(layers=layers))
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

        con = connection or duckdb.connect()
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in self.shards())
        con.execute(f"create or replace view {view} as select * from read_parquet([{files}])")
        return con

    @property
    def num_tokens(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.shards())


def open_trace(path: str | Path, **kwargs: Any) -> TraceReader:
    """Open a trace directory lazily (nothing is read but the manifest)."""
    return TraceReader(path, **kwargs)
