"""capture_corpus(): stream a corpus through a model and write its routing to a trace directory.

The corpus is turned into a deterministic plan: texts -> token chunks (long texts are split at ``max_length``,
with a notice) -> batches of ``batch_size`` chunks -> shards of ``batches_per_shard`` batches. Shard ``i`` is a
pure function of the corpus and the settings, so an interrupted run re-run with the same command skips the
shards that exist (each is written atomically) and a ``torchrun`` job splits shards between ranks
(``i % world_size == rank``) and produces the same files as one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from .capture import capture
from .errors import CorpusError, TraceError
from .store import (
    MANIFEST,
    SHARD_DIR,
    TraceReader,
    config_hash,
    manifest_for,
    shard_name,
    trace_to_table,
    write_json_atomic,
    write_shard,
)

_INPUT_KEY = b"moe_routing.input_sha256"


@dataclass
class _Chunk:
    text_index: int
    chunk: int
    ids: list[int]
    labels: dict[str, Any]


def _iter_records(data: Any, labels: Sequence[str] | Mapping[str, Sequence[Any]] | None,
                  text_column: str) -> tuple[Iterator[tuple[str, dict[str, Any]]], list[str], int | None]:
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

    def gen() -> Iterator[tuple[str, dict[str, Any]]]:
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
        for c, piece in enumerate(pieces):
            if max_tokens is not None:
                piece = piece[: max_tokens - total]
                if not piece:
                    return
            total += len(piece)
            yield _Chunk(i, c, piece, {n: lab.get(n) for n in label_names})
        if max_tokens is not None and total >= max_tokens:
            return


def _batched(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _inputs_hash(batches: list[list[_Chunk]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for ch in batch:
            h.update(json.dumps([ch.text_index, ch.chunk, ch.ids, ch.labels], default=str).encode())
    return h.hexdigest()


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
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} PB"


def _model_facts(model: Any) -> dict[str, Any]:
    import transformers

    from . import __version__

    cfg = model.config
    return {
        "model_name": str(getattr(cfg, "name_or_path", "") or "") or type(model).__name__,
        "model_type": getattr(cfg, "model_type", ""),
        "revision": getattr(cfg, "_commit_hash", None),
        "config_hash": config_hash(cfg.to_dict()),
        "weights_id": getattr(model, "moe_routing_weights_id", None),
        "versions": {"moe_routing": __version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


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
    batches_per_shard: int = 16,
    overwrite: bool = False,
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
        batches_per_shard: batches written per Parquet shard (memory holds one shard at a time).
        overwrite: replace a trace already in ``out_dir`` (otherwise a complete one is returned as is and an
            interrupted one is resumed).

    Every token row carries ``text_index`` (the input's position in the corpus) and ``chunk`` labels besides
    the corpus labels and ``phase``. Returns a ``TraceReader`` over ``out_dir``.
    """
    out = Path(out_dir)
    rank, world = _dist()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1.")
    cfg_max = int(getattr(model.config.get_text_config(), "max_position_embeddings", 2048) or 2048)
    max_length = int(max_length or min(cfg_max, 2048))
    records, label_names, length = _iter_records(texts_or_dataset, labels, text_column)
    label_names = [n for n in label_names if n not in ("text_index", "chunk", "phase")]
    settings = {
        "batch_size": batch_size, "max_tokens": max_tokens, "max_length": max_length, "logits": logits,
        "batches_per_shard": batches_per_shard, "labels": label_names, "text_column": text_column,
        "padding_side": getattr(tokenizer, "padding_side", "right"),
    }
    facts = _model_facts(model)
    fingerprint = config_hash({"settings": settings, "config_hash": facts["config_hash"],
                               "weights_id": facts["weights_id"]})

    mpath = out / MANIFEST
    if mpath.exists() and not overwrite:
        old = json.loads(mpath.read_text())
        if old.get("fingerprint") != fingerprint:
            raise TraceError(
                f"{out} holds a trace made with other settings or another model (fingerprint "
                f"{old.get('fingerprint')} vs {fingerprint}); pass overwrite=True (--overwrite) to replace it, "
                "or choose another output directory."
            )
        if old.get("complete"):
            print(f"[moe-routing] {out} is already complete ({old.get('tokens')} tokens); nothing to do "
                  "(overwrite=True to redo).", file=sys.stderr)
            return TraceReader(out)
    if rank == 0:
        if overwrite and (out / SHARD_DIR).exists():
            for p in (out / SHARD_DIR).glob("part-*.parquet"):
                p.unlink()
            for p in (out / "ranks").glob("rank-*.json") if (out / "ranks").exists() else []:
                p.unlink()
        (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (out / SHARD_DIR).glob(".part-*.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    _barrier()

    stats = {"empty": 0, "chunked": 0}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    chunks = _plan_chunks(records, tokenizer, max_length, max_tokens, label_names, stats)
    shards = _batched(_batched(chunks, batch_size), batches_per_shard)

    total_tokens = max_tokens
    if length is not None and max_tokens is None and length <= 200_000:
        total_tokens = None  # counted lazily by the bar below
    with capture(model, logits=logits) as rec:
        n_layers, k = len(rec.layers), rec.top_k or 1
        per_tok = n_layers * k * 6 + 24 + (n_layers * rec.num_experts * 2 if logits else 0)
        if rank == 0:
            est = f"~{_human(per_tok * total_tokens)} for {total_tokens} tokens" if total_tokens else \
                f"~{_human(per_tok * 1_000_000)} per million tokens"
            print(f"[moe-routing] capturing {facts['model_name'] or type(model).__name__}: {n_layers} MoE layers "
                  f"x top-{k} of {rec.num_experts} experts -> {out} ({est} before compression)", file=sys.stderr)
            manifest = {
                **manifest_for(_empty_trace(rec)), **facts, "settings": settings, "fingerprint": fingerprint,
                "labels": sorted([*label_names, "text_index", "chunk", "phase"]), "has_logits": logits,
                "complete": False, "world_size": world, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            write_json_atomic(mpath, manifest)
        bar = _progress(progress and rank == 0, total_tokens, length)
        written = skipped = tokens_here = 0
        doc = 0
        try:
            for s, shard in enumerate(shards):
                n_docs = sum(len(b) for b in shard)
                n_tok = sum(len(c.ids) for b in shard for c in b)
                first_doc, doc = doc, doc + n_docs
                if s % world != rank:
                    bar.update(n_tok)
                    continue
                path = out / SHARD_DIR / shard_name(s)
                digest = _inputs_hash(shard)
                if path.exists():
                    _check_existing(path, digest)
                    skipped += 1
                    bar.update(n_tok)
                    continue
                rec.clear()
                rec.start_docs_at(first_doc)
                with torch.inference_mode():
                    for batch in shard:
                        ids, mask = _pad(batch, pad_id, left)
                        before = rec.tokens_recorded
                        model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
                        rec.check_recorded(before, int(mask.sum()))  # all planned tokens, or raise
                        bar.update(sum(len(c.ids) for c in batch))
                flat = [c for b in shard for c in b]
                per_doc = {n: [c.labels[n] for c in flat] for n in label_names}
                per_doc["text_index"] = [c.text_index for c in flat]
                per_doc["chunk"] = [c.chunk for c in flat]
                trace = rec.trace(clear=True)
                local = trace.doc_ids - first_doc
                trace = trace.with_labels(**{n: np.asarray(v)[local] for n, v in per_doc.items()})
                table = trace_to_table(trace)
                table = table.replace_schema_metadata({**(table.schema.metadata or {}), _INPUT_KEY: digest.encode()})
                write_shard(table, path)
                written += 1
                tokens_here += trace.num_tokens
        finally:
            bar.close()
    if stats["empty"]:
        warnings.warn(f"{stats['empty']} empty texts were skipped.", stacklevel=2)
    if stats["chunked"]:
        print(f"[moe-routing] {stats['chunked']} texts were longer than max_length={max_length} tokens and were "
              "split into chunks (label 'chunk'); nothing was truncated.", file=sys.stderr)
    (out / "ranks").mkdir(exist_ok=True)
    write_json_atomic(out / "ranks" / f"rank-{rank:03d}.json",
                      {"rank": rank, "world_size": world, "shards_written": written, "shards_skipped": skipped,
                       "tokens_written": tokens_here})
    _barrier()
    if rank == 0:
        reader = TraceReader(out)
        if not reader.shards():
            raise CorpusError("the corpus produced no tokens (empty corpus, or every text was empty).")
        manifest = json.loads(mpath.read_text())
        manifest.update(
            complete=True, num_shards=len(reader.shards()), tokens=reader.num_tokens,
            ranks=[json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))],
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        write_json_atomic(mpath, manifest)
    _barrier()
    return TraceReader(out)


def _check_existing(path: Path, digest: str) -> None:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise TraceError(f"shard {path} is unreadable ({exc}); delete it and re-run to rewrite it.") from exc
    if meta.get(_INPUT_KEY, b"").decode() != digest:
        raise TraceError(
            f"shard {path} was captured from different input than this corpus gives for it now (the corpus or "
            "tokenizer changed); pass overwrite=True (--overwrite) or use a new output directory."
        )


def _empty_trace(rec: Any):
    from .trace import RoutingTrace

    k = rec.top_k or 1
    return RoutingTrace.from_arrays(np.zeros((0, len(rec.layers), k)), np.zeros((0, len(rec.layers), k)),
                                    layers=rec.layers, num_experts=rec.num_experts, model_name=rec.model_name)


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(show: bool, total_tokens: int | None, length: int | None):
    if not show:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="capture", file=sys.stderr,
                mininterval=1.0, smoothing=0.1, postfix=None if length is None else {"texts": length})


def estimate_trace_bytes(num_tokens: int, num_layers: int, top_k: int, num_experts: int, logits: bool) -> int:
    """Uncompressed bytes a trace of this size needs (ids int16 + weights fp32 + per-token columns)."""
    per = num_layers * top_k * 6 + 24 + (num_layers * num_experts * 2 if logits else 0)
    return math.ceil(per * num_tokens)
