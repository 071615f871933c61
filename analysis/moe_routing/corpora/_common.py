"""What every corpus source shares: the frame layout, scripts, label checks, empty rows, per-language caps."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CorpusError

COLUMNS = ("text", "lang", "script", "source", "key", "split")
SPLITS = ("train", "heldout")

DEFAULT_LANGS: tuple[str, ...] = (
    "en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "uk", "tr", "vi",
    "id", "zh", "ja", "ko", "ar", "fa", "he", "hi", "bn", "th", "el", "ka",
)  # fmt: skip

#: Writing system of each default language (ISO 15924 names; Japanese mixes Han and Kana).
SCRIPTS: dict[str, str] = {
    **dict.fromkeys(("en", "de", "fr", "es", "it", "pt", "nl", "pl", "tr", "vi", "id"), "Latin"),
    "ru": "Cyrillic", "uk": "Cyrillic", "zh": "Han", "ja": "Japanese", "ko": "Hangul",
    "ar": "Arabic", "fa": "Arabic", "he": "Hebrew", "hi": "Devanagari", "bn": "Bengali",
    "th": "Thai", "el": "Greek", "ka": "Georgian",
}  # fmt: skip


_SPACE = re.compile(r"\s+")


def _has_letter(s: str) -> bool:
    return any(unicodedata.category(ch).startswith("L") for ch in s)


def _rank(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()


_SCRIPT_PREFIXES = {
    "LATIN": "Latin", "CYRILLIC": "Cyrillic", "GREEK": "Greek", "ARABIC": "Arabic", "HEBREW": "Hebrew",
    "DEVANAGARI": "Devanagari", "BENGALI": "Bengali", "THAI": "Thai", "GEORGIAN": "Georgian",
    "ARMENIAN": "Armenian", "HANGUL": "Hangul", "HIRAGANA": "Kana", "KATAKANA": "Kana", "CJK": "Han",
    "TAMIL": "Tamil", "TELUGU": "Telugu", "KANNADA": "Kannada", "MALAYALAM": "Malayalam",
    "GUJARATI": "Gujarati", "GURMUKHI": "Gurmukhi", "ORIYA": "Oriya", "SINHALA": "Sinhala", "KHMER": "Khmer",
    "LAO": "Lao", "MYANMAR": "Myanmar", "ETHIOPIC": "Ethiopic", "TIBETAN": "Tibetan", "THAANA": "Thaana",
    "MONGOLIAN": "Mongolian", "SYRIAC": "Syriac",
}  # fmt: skip


@functools.lru_cache(maxsize=65536)
def _char_script(ch: str) -> str | None:
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    first = name.split(" ", 1)[0]
    if first in _SCRIPT_PREFIXES:
        return _SCRIPT_PREFIXES[first]
    if "IDEOGRAPH" in name:
        return "Han"
    return "Other"


def char_script(ch: str) -> str | None:
    """The writing system of one character (``"Latin"``, ``"Cyrillic"``, ``"Han"``, ...; None for a non-letter)."""
    return _char_script(ch)


def guess_script(text: str) -> str:
    """The writing system of most letters in ``text`` (``"Japanese"`` when Kana appear beside Han)."""
    return _majority_script([text])


def _majority_script(texts: Iterable[str]) -> str:
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(s for s in map(_char_script, t) if s)
    if not counts:
        return "Unknown"
    if counts.get("Kana") and counts.get("Kana", 0) + counts.get("Han", 0) >= 0.5 * sum(counts.values()):
        return "Japanese"
    return counts.most_common(1)[0][0]


def _normalise(table: pd.DataFrame, source: str, text_column: str, where: Any) -> pd.DataFrame:
    """Bring a user table to the corpus layout: the fixed columns first, other columns kept as labels."""
    if text_column not in table.columns:
        cols = ", ".join(map(str, table.columns)) or "none"
        raise CorpusError(
            f"{where} has no column {text_column!r}; its columns are: {cols}. Pass text_column= "
            "(--text-column on the command line)."
        )
    n = len(table)
    if n == 0:
        raise CorpusError(f"{where} has no records.")
    texts = table[text_column].tolist()
    bad = next((i for i, v in enumerate(texts) if _is_container(v)), None)
    if bad is not None:
        raise CorpusError(
            f"{where}: record {bad} has a {type(texts[bad]).__name__} in the text column {text_column!r}, not a "
            "string; join it into one text per record, or name the text column (text_column= / --text-column)."
        )
    out = pd.DataFrame(index=range(n))
    out["text"] = [("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
                   for v in texts]  # fmt: skip
    out["lang"] = table["lang"].astype(str).to_numpy() if "lang" in table else "und"
    out["script"] = (table["script"].astype(str).to_numpy() if "script" in table
                     else [guess_script(t) for t in out["text"]])  # fmt: skip
    out["source"] = table["source"].astype(str).to_numpy() if "source" in table else source
    out["key"] = (
        table["key"].astype(str).to_numpy() if "key" in table else [f"{source}-{i}" for i in range(n)]
    )
    out["split"] = table["split"].astype(str).to_numpy() if "split" in table else "heldout"
    for col in table.columns:
        if col == text_column or col in COLUMNS:
            continue
        out[str(col)] = table[col].to_numpy()
    return out


def _is_whole(value: Any) -> bool:
    """A whole number: an int, an integral float (1e3) or a numeric string ("50"); not a bool."""
    if isinstance(value, bool):
        return False
    try:
        return float(value).is_integer()
    except (TypeError, ValueError, OverflowError):
        return False


def _as_int(value: Any) -> int:
    return int(value) if isinstance(value, (int, np.integer)) else int(float(value))


def _is_container(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict, set, np.ndarray))


def check_label_columns(corpus: pd.DataFrame, names: Sequence[str] | None = None) -> list[str]:
    """The label columns a capture of ``corpus`` keeps (``names``, default every column but ``text``), checked.

    A label holds one scalar per text (a string, number or bool); a column of lists or objects (a JSON array in
    a JSONL file) cannot be one. Raises CorpusError naming the column and the record before any model runs.
    """
    columns = [str(c) for c in corpus.columns]
    if names is None:
        names = [c for c in columns if c != "text"]
    names = list(dict.fromkeys(str(n) for n in names))
    missing = [n for n in names if n not in columns]
    if missing:
        raise CorpusError(f"label columns {missing} are not in the corpus; its columns are {columns}.")
    if "text" in names:
        raise CorpusError("'text' is the text itself, not a label; name other columns as labels.")
    for name in names:
        values = corpus[name].tolist()
        bad = next((i for i, v in enumerate(values) if _is_container(v)), None)
        if bad is not None:
            raise CorpusError(
                f"label column {name!r} holds a {type(values[bad]).__name__} in record {bad} "
                f"({str(values[bad])[:60]}); a label is one string or number per text. Leave the column out (choose "
                "the labels with labels= / --label NAME) or flatten it into one value per record."
            )
    return names



def _drop_empty(df: pd.DataFrame, spec: str) -> pd.DataFrame:
    empty = df["text"].astype(str).str.strip() == ""
    n = int(empty.sum())
    if n == len(df):
        raise CorpusError(f"corpus {spec!r} is empty: all {n} texts are empty.")
    if n:
        warnings.warn(f"corpus {spec!r}: dropped {n} empty text(s) of {len(df)}.", UserWarning, stacklevel=3)
        df = df[~empty]
    return df


def _cap_per_lang(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` rows per language, ranked by a seeded hash of the key (parallel keys chosen alike)."""
    ranks = np.array([int.from_bytes(_rank(seed, str(k)), "big") for k in df["key"]], dtype=np.uint64)
    order = pd.DataFrame({"lang": df["lang"].to_numpy(), "rank": ranks, "pos": np.arange(len(df))})
    order = order.sort_values(["lang", "rank", "pos"], kind="stable")
    keep = order.groupby("lang", sort=False).head(cap)["pos"].sort_values().to_numpy()
    return df.iloc[keep]
