"""User files: a folder of ``.txt`` files or one ``.jsonl``/``.csv``/``.tsv``/``.parquet`` table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from ..errors import CorpusError
from ._common import _normalise

_TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8: byte {exc.start} (0x{data[exc.start]:02x}) cannot be decoded "
            f"({exc.reason}). Re-encode the file as UTF-8."
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _load_path(path: Path, text_column: str) -> pd.DataFrame:
    if not path.exists():
        raise CorpusError(
            f"no such file or folder: {path}. A corpus spec is 'demo', 'udhr', 'flores', 'hf:<dataset>' "
            "or a path to a folder of .txt files or a .jsonl/.csv/.tsv/.parquet file."
        )
    if path.is_dir():
        return _load_txt_folder(path)
    suffix = path.suffix.lower()
    if suffix not in _TABLE_SUFFIXES and suffix != ".txt":
        raise CorpusError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use a folder of .txt files or one of "
            f"{', '.join(_TABLE_SUFFIXES)}."
        )
    if path.stat().st_size == 0:
        raise CorpusError(f"{path} is empty (0 bytes).")
    source = path.name
    if suffix == ".txt":
        text = _decode(path, path.read_bytes())
        return _normalise(pd.DataFrame({"text": [text]}), source, "text", path)
    if suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except Exception as exc:
            raise CorpusError(f"{path} cannot be read as Parquet: {exc}") from None
        return _normalise(table, source, text_column, path)
    text = _decode(path, path.read_bytes())
    if not text.strip():
        raise CorpusError(f"{path} holds only whitespace; it has no records.")
    if suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}, line {lineno}: not valid JSON ({exc.msg}).") from None
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}, line {lineno}: expected a JSON object, got {type(rec).__name__}.")
            records.append(rec)
        table = pd.DataFrame.from_records(records)
    else:
        try:
            table = pd.read_csv(io.StringIO(text), sep="\t" if suffix == ".tsv" else ",", dtype=str,
                                keep_default_na=False)  # fmt: skip
        except pd.errors.ParserError as exc:
            raise CorpusError(f"{path} cannot be parsed as {suffix[1:].upper()}: {exc}") from None
    return _normalise(table, source, text_column, path)


def _load_txt_folder(root: Path) -> pd.DataFrame:
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(f"folder {root} has no .txt files (each .txt file below it is one document).")
    records = []
    for p in files:
        rel = p.relative_to(root)
        if len(rel.parts) > 1:
            lang, key = rel.parts[0], Path(*rel.parts[1:]).with_suffix("").as_posix()
        else:
            lang, key = "und", rel.with_suffix("").as_posix()
        text = _decode(p, p.read_bytes())
        records.append({"text": text.strip(), "lang": lang, "key": key, "file": rel.as_posix()})
    return _normalise(pd.DataFrame.from_records(records), root.name, "text", root)

