"""capture_corpus(): stream a corpus through a model and write its routing to a trace directory.

The corpus is turned into a deterministic plan: texts -> token chunks (long texts are split at ``max_length``,
with a notice) -> batches of ``batch_size`` chunks -> shards of ``batches_per_shard`` batches. Shard ``i`` is a
pure function of the corpus and the settings, so an interrupted run re-run with the same command skips the
shards that exist (each is written atomically) and a ``torchrun`` job splits shards between ranks
(``i % world_size == rank``) and produces the same files as one process.

The finished manifest lists every shard with its token count and input hash; re-running the same command on a
directory that lost shards rewrites exactly those. One run writes a directory at a time (a lock, held by rank 0);
a resume is refused, naming each setting or model fact that differs, when the trace was made otherwise.
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
from .errors import CorpusError, ForeignShardError, MissingShardError, SettingError, TraceError
from .identity import IDENTITY_FIELDS, model_identity
from .store import (
    FINGERPRINT_KEY,
    INPUT_KEY,
    MANIFEST,
    SHARD_DIR,
    DirectoryLock,
    TraceReader,
    config_hash,
    manifest_for,
    remove_stale_temporaries,
    shard_name,
    shard_record,
    trace_to_table,
    with_shard_metadata,
    write_json_atomic,
    write_shard,
)

_INPUT_KEY = INPUT_KEY  # kept for older imports


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
    """What the manifest says about the model (``model``: ``identity.model_identity``) and the versions."""
    import transformers

    from . import __version__

    ident = model_identity(model)
    return {
        "model_name": ident["name"],
        "model_type": ident["model_type"],
        "revision": ident["revision"],
        "config_hash": ident["config_hash"],
        "weights_id": ident["weights_digest"],
        "model": ident,
        "versions": {"moe_routing": __version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


def run_fingerprint(settings: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """The hash a trace directory is resumed by: the settings and the model facts in ``IDENTITY_FIELDS``."""
    return config_hash({"settings": dict(settings), "model": {k: identity.get(k) for k in IDENTITY_FIELDS}})


_FIELD_NAMES = {"weights_digest": "model weights", "config_hash": "model config", "dtype": "dtype"}


def _differences(old: Mapping[str, Any], settings: Mapping[str, Any], identity: Mapping[str, Any]) -> list[str]:
    """Each setting or model fact that differs between a trace's manifest and this run, as readable text."""
    diffs = []
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    for key in sorted(set(settings) | set(old_settings)):
        if old_settings.get(key) != settings.get(key):
            diffs.append(f"{key}: {old_settings.get(key)!r} in the trace, {settings.get(key)!r} now")
    old_model = old.get("model") if isinstance(old.get("model"), dict) else None
    if old_model is None:
        diffs.append("model: the trace was written by an older moe-routing that did not record the model's "
                     "weights digest")
        return diffs
    for key in IDENTITY_FIELDS:
        if old_model.get(key) != identity.get(key):
            diffs.append(f"{_FIELD_NAMES[key]} ({key}): {old_model.get(key)!r} in the trace, "
                         f"{identity.get(key)!r} now")
    if any(d.startswith(("model ", "dtype")) for d in diffs) and old_model.get("name") != identity.get("name"):
        diffs.append(f"model: {old_model.get('name')!r} in the trace, {identity.get('name')!r} now")
    return diffs


def _check_settings(batch_size: Any, max_tokens: Any, max_length: Any, batches_per_shard: Any) -> None:
    for name, value, none_ok in (("batch_size", batch_size, False), ("max_tokens", max_tokens, True),
                                 ("max_length", max_length, True), ("batches_per_shard", batches_per_shard, False)):
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SettingError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {value!r}.")


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
        overwrite: replace a trace already in ``out_dir`` (otherwise a complete one is returned as is, one that
            lost shards gets exactly those rewritten, and an interrupted one is resumed).

    Every token row carries ``text_index`` (the input's position in the corpus) and ``chunk`` labels besides
    the corpus labels and ``phase``; corpus labels are one value per text, and a missing one (None / NaN) is
    refused. A directory another run is writing is refused (``TraceLockedError``), and so is resuming a trace
    made with other settings or another model (the error names each field that differs).
    Returns a ``TraceReader`` over ``out_dir``.
    """
    out = Path(out_dir)
    rank, world = _dist()
    _check_settings(batch_size, max_tokens, max_length, batches_per_shard)
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
    fingerprint = run_fingerprint(settings, facts["model"])
    lock = DirectoryLock(out) if rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _capture_locked(model, tokenizer, out, records, label_names, length, settings, facts, fingerprint,
                               rank=rank, world=world, batch_size=batch_size, max_tokens=max_tokens,
                               max_length=max_length, logits=logits, batches_per_shard=batches_per_shard,
                               overwrite=overwrite, progress=progress)
    finally:
        if lock is not None:
            lock.release()


def _capture_locked(model: Any, tokenizer: Any, out: Path, records: Iterator[tuple[str, dict[str, Any]]],
                    label_names: list[str], length: int | None, settings: dict[str, Any], facts: dict[str, Any],
                    fingerprint: str, *, rank: int, world: int, batch_size: int, max_tokens: int | None,
                    max_length: int, logits: bool, batches_per_shard: int, overwrite: bool,
                    progress: bool) -> TraceReader:
    """capture_corpus once the directory is ours (rank 0 holds its lock)."""
    mpath = out / MANIFEST
    if mpath.exists() and not overwrite:
        try:
            old = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise TraceError(f"{mpath} is unreadable ({exc}); pass overwrite=True (--overwrite) to start "
                             "again, or choose another output directory.") from exc
        if old.get("fingerprint") != fingerprint:
            diffs = _differences(old, settings, facts["model"]) or [
                f"fingerprint {old.get('fingerprint')} in the trace, {fingerprint} now"]
            raise TraceError(
                f"{out} holds a trace made with other settings or another model: " + "; ".join(diffs)
                + ". Pass overwrite=True (--overwrite) to replace it, or choose another output directory."
            )
        if old.get("complete"):
            reader = TraceReader(out)
            missing = reader.missing_shards
            foreign = [e for e in reader.verify() if not isinstance(e, MissingShardError)]
            if foreign:
                raise foreign[0]
            if not missing:
                print(f"[moe-routing] {out} is already complete ({old.get('tokens')} tokens); nothing to do "
                      "(overwrite=True to redo).", file=sys.stderr)
                return reader
            if rank == 0:
                print(f"[moe-routing] {out} lacks {len(missing)} of its shards ({', '.join(missing[:5])}"
                      f"{', ...' if len(missing) > 5 else ''}); rewriting exactly those.", file=sys.stderr)
    if rank == 0:
        if overwrite and (out / SHARD_DIR).exists():
            for p in (out / SHARD_DIR).glob("part-*.parquet"):
                p.unlink()
            for p in (out / "ranks").glob("rank-*.json") if (out / "ranks").exists() else []:
                p.unlink()
        (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / SHARD_DIR)  # left by a run killed mid-write; live writers' files stay
        remove_stale_temporaries(out)
    _barrier()

    stats = {"empty": 0, "chunked": 0}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    chunks = _plan_chunks(records, tokenizer, max_length, max_tokens, label_names, stats)
    shards = _batched(_batched(chunks, batch_size), batches_per_shard)

    total_tokens = max_tokens
    if length is not None and max_tokens is None and length <= 200_000:
        total_tokens = None  # counted lazily by the bar below
    planned: dict[str, dict[str, Any]] = {}
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
                digest = _inputs_hash(shard)
                planned[shard_name(s)] = shard_record(n_tok, digest)
                if s % world != rank:
                    bar.update(n_tok)
                    continue
                path = out / SHARD_DIR / shard_name(s)
                if path.exists():
                    _check_existing(path, digest, fingerprint)
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
                table = with_shard_metadata(trace_to_table(trace), digest, fingerprint)
                write_shard(table, path)
                written += 1
                tokens_here += trace.num_tokens
        finally:
            bar.close()
    if stats["empty"]:
        warnings.warn(f"{stats['empty']} empty texts were skipped.", stacklevel=3)
    if stats["chunked"]:
        print(f"[moe-routing] {stats['chunked']} texts were longer than max_length={max_length} tokens and were "
              "split into chunks (label 'chunk'); nothing was truncated.", file=sys.stderr)
    (out / "ranks").mkdir(exist_ok=True)
    write_json_atomic(out / "ranks" / f"rank-{rank:03d}.json",
                      {"rank": rank, "world_size": world, "shards_written": written, "shards_skipped": skipped,
                       "tokens_written": tokens_here})
    _barrier()
    if rank == 0:
        if not planned:
            raise CorpusError("the corpus produced no tokens (empty corpus, or every text was empty).")
        top_k = _verify_shards(out, planned, fingerprint)
        manifest = json.loads(mpath.read_text())
        manifest.update(
            complete=True, num_shards=len(planned), shards=planned,
            tokens=sum(r["tokens"] for r in planned.values()), top_k=max(top_k, int(manifest["top_k"])),
            ranks=[json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))],
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        write_json_atomic(mpath, manifest)
    _barrier()
    return TraceReader(out)


def _verify_shards(out: Path, planned: Mapping[str, Mapping[str, Any]], fingerprint: str) -> int:
    """Every planned shard is on disk with its planned tokens, input hash and this run's fingerprint, and no
    other shard is; returns the widest k among them (the recorder may widen k after the manifest was begun)."""
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
    return width


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
