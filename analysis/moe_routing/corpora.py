"""Text sources: one loader, one frame layout.

``load_corpus(spec)`` returns a ``pandas.DataFrame`` with one row per text record and the columns

- ``text``: the text itself (never empty);
- ``lang``: a language code (``"en"``, ``"zh"``, ...; ``"und"`` where a file does not say);
- ``script``: the writing system (``"Latin"``, ``"Cyrillic"``, ``"Han"``, ``"Arabic"``, ...);
- ``source``: where the record comes from (``"django"``, ``"udhr"``, a file name, ``"hf:<dataset>"``, ``"flores"``);
- ``key``: a stable id; rows of different languages with the same key are translations of each other (parallel);
- ``split``: ``"train"`` for the demo catalog entries the demo model is trained on, ``"heldout"`` for everything
  the demo model never saw (the held-out demo keys, UDHR, user files, Hugging Face data) unless a file brings its
  own ``split`` column;

plus, for user files and datasets, every other column of the file as a label column.

Specs:

``"demo"``
    A parallel multilingual corpus built offline from the gettext catalogs Django ships (``django/conf/locale`` and
    the ``django/contrib/*/locale`` apps). Every entry is keyed by its English source string (``msgid``): the English
    record is the msgid itself, the other languages are its translations. Placeholders (``%(name)s``, ``%s``,
    ``{x}``) become a neutral filler (``5`` for numeric conversions such as ``%d`` and count-like names, ``…``
    otherwise), HTML tags are removed and entities unescaped. Empty, untranslated, fuzzy and obsolete entries are
    dropped, as are records with no letter left. Plural entries give one record: the English plural form
    (``msgid_plural``) and the translation the catalog's own ``Plural-Forms`` rule picks for n = 5 (so Russian gets
    its "many" form, Japanese its single form). Entries whose cleaned English text coincides (e.g. "May" as month
    name and abbreviation) share one key; the first translated one in catalog order wins.
    A held-out split by parallel key: the same ~17.5% of keys are ``"heldout"`` in every language (deterministic in
    ``seed``, independent of ``langs``).
``"udhr"``
    The Universal Declaration of Human Rights paragraphs that ``gflanguages`` ships as font sample texts (Apache-2.0):
    natural prose from outside the demo's training domain, all ``split="heldout"``, one record per paragraph (from the
    paragraph- and passage-sized samples; the phrase-sized ones are truncations and are skipped; a paragraph under
    25 characters, such as "La Asamblea General", is joined to the next). gflanguages 0.7 ships only these samples,
    without article numbers and with different paragraphs per language (1 for de/pt/el, up to 13 for ko), so keys
    are a per-language index (``udhr-<lang>-<i>``), not parallel.
a path
    A folder: every ``*.txt`` below it is one record (one document per file). A file directly in the folder gets
    ``lang="und"``; a file in a sub-folder gets the sub-folder's name as ``lang`` (``corpus/de/a.txt``), and its path
    below that sub-folder as ``key``, so ``de/a.txt`` and ``fr/a.txt`` are parallel.
    A ``.jsonl``, ``.csv``, ``.tsv`` or ``.parquet`` file: one record per row; ``text_column`` holds the text; the
    columns ``lang``, ``script``, ``key``, ``split``, ``source`` are used when present (a missing ``script`` is
    guessed from the characters, a missing ``key`` is ``<file>-<row>``); every other column is carried as a label.
``"hf:<dataset>[:<config>][:<split>]"``
    A Hugging Face dataset through the optional ``datasets`` package (``pip install datasets``); ``hf:name::test`` for
    a split without config. A single extra part is a split when it looks like one (train, test, validation, dev,
    devtest, or a slice such as ``train[:1000]``), a config otherwise. Default split: ``train``.
``"flores"`` / ``"flores:<split>"``
    FLORES+ (``openlanguagedata/flores_plus``, a gated dataset: accept its terms and log in) with
    ``facebook/flores`` as fallback, ``devtest`` by default, for the demo languages; keyed by sentence id (parallel).

Language codes of the demo: Django's locale directories map to plain codes; ``zh`` is ``zh_Hans`` (Simplified,
the larger readership) and ``pt`` is ``pt_BR`` (the more complete Portuguese catalog). Any other Django locale can be
asked for by its directory name (``langs=["zh_Hant", "sr_Latn", "ca"]``).
"""

from __future__ import annotations

import functools
import gettext
import hashlib
import html
import io
import json
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import CorpusError

COLUMNS = ("text", "lang", "script", "source", "key", "split")
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.175

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

#: Our language code -> Django locale directory, where they differ.
DJANGO_LOCALES: dict[str, str] = {"zh": "zh_Hans", "pt": "pt_BR"}

#: Our language code -> gflanguages id.
GF_IDS: dict[str, str] = {
    "zh": "zh_Hans", "ja": "ja_Jpan", "ko": "ko_Kore", "ru": "ru_Cyrl", "uk": "uk_Cyrl", "ar": "ar_Arab",
    "fa": "fa_Arab", "he": "he_Hebr", "hi": "hi_Deva", "bn": "bn_Beng", "th": "th_Thai", "el": "el_Grek",
    "ka": "ka_Geor",
}  # fmt: skip

#: Our language code -> FLORES+ config names (first: openlanguagedata/flores_plus, second: facebook/flores).
FLORES_CODES: dict[str, tuple[str, str]] = {
    "en": ("eng_Latn", "eng_Latn"), "de": ("deu_Latn", "deu_Latn"), "fr": ("fra_Latn", "fra_Latn"),
    "es": ("spa_Latn", "spa_Latn"), "it": ("ita_Latn", "ita_Latn"), "pt": ("por_Latn", "por_Latn"),
    "nl": ("nld_Latn", "nld_Latn"), "pl": ("pol_Latn", "pol_Latn"), "ru": ("rus_Cyrl", "rus_Cyrl"),
    "uk": ("ukr_Cyrl", "ukr_Cyrl"), "tr": ("tur_Latn", "tur_Latn"), "vi": ("vie_Latn", "vie_Latn"),
    "id": ("ind_Latn", "ind_Latn"), "zh": ("cmn_Hans", "zho_Hans"), "ja": ("jpn_Jpan", "jpn_Jpan"),
    "ko": ("kor_Hang", "kor_Hang"), "ar": ("arb_Arab", "arb_Arab"), "fa": ("pes_Arab", "pes_Arab"),
    "he": ("heb_Hebr", "heb_Hebr"), "hi": ("hin_Deva", "hin_Deva"), "bn": ("ben_Beng", "ben_Beng"),
    "th": ("tha_Thai", "tha_Thai"), "el": ("ell_Grek", "ell_Grek"), "ka": ("kat_Geor", "kat_Geor"),
}  # fmt: skip

NEUTRAL_NUMBER = "5"
NEUTRAL_TEXT = "…"
PLURAL_N = 5


def load_corpus(
    spec: str | Path = "demo",
    *,
    split: str | None = None,
    langs: Sequence[str] | None = None,
    max_per_lang: int | None = None,
    seed: int = 0,
    text_column: str = "text",
) -> pd.DataFrame:
    """Load a corpus as a frame with columns ``text, lang, script, source, key, split`` (+ label columns).

    Args:
        spec: ``"demo"``, ``"udhr"``, ``"flores[:split]"``, ``"hf:<dataset>[:<config>][:<split>]"`` or a path to a
            folder of ``.txt`` files or a ``.jsonl``/``.csv``/``.tsv``/``.parquet`` file (see the module docstring).
        split: keep only rows whose ``split`` is this (``"train"`` or ``"heldout"`` for the built-in corpora).
        langs: keep only these languages (for ``demo``/``udhr``/``flores``: which languages to load; default the
            24 of ``DEFAULT_LANGS``).
        max_per_lang: at most this many rows per language, chosen by ``seed``; for parallel corpora the same keys
            are preferred in every language.
        seed: chooses the demo's held-out keys and the ``max_per_lang`` sample.
        text_column: the column holding the text in a table file or a Hugging Face dataset.

    Raises:
        CorpusError: unknown spec or language, unreadable or empty file, missing text column, empty result, ...
    """
    spec_str = str(spec)
    if split is not None and not isinstance(split, str):
        raise CorpusError(f"split must be a string such as 'train' or 'heldout', got {split!r}.")
    if langs is not None:
        if isinstance(langs, str):
            langs = [langs]
        langs = [str(x) for x in langs]
        if not langs:
            raise CorpusError("langs is empty; pass None for the default languages.")
    if max_per_lang is not None:
        if not _is_whole(max_per_lang) or _as_int(max_per_lang) <= 0:
            raise CorpusError(f"max_per_lang must be a positive whole number, got {max_per_lang!r}.")
        max_per_lang = _as_int(max_per_lang)
    if not _is_whole(seed):
        raise CorpusError(f"seed must be a whole number, got {seed!r}.")
    seed = _as_int(seed)

    builtin = True  # the built-in corpora load only the requested languages
    if isinstance(spec, str) and spec_str == "demo":
        df = _load_demo(tuple(langs or DEFAULT_LANGS), int(seed))
    elif isinstance(spec, str) and spec_str == "udhr":
        df = _load_udhr(tuple(langs or DEFAULT_LANGS))
    elif isinstance(spec, str) and (spec_str == "flores" or spec_str.startswith("flores:")):
        df = _load_flores(tuple(langs or DEFAULT_LANGS), spec_str.partition(":")[2] or "devtest")
    elif isinstance(spec, str) and spec_str.startswith("hf:"):
        builtin = False
        df = _load_hf(spec_str, text_column)
    else:
        builtin = False
        df = _load_path(Path(spec_str).expanduser(), text_column)

    df = _drop_empty(df, spec_str)
    if split is not None:
        present = sorted(df["split"].astype(str).unique())
        df = df[df["split"] == split]
        if df.empty:
            raise CorpusError(
                f"corpus {spec_str!r} has no rows with split={split!r}; its splits are {present}."
            )
    if langs is not None and not builtin:
        present = sorted(df["lang"].astype(str).unique())
        df = df[df["lang"].isin(langs)]
        if df.empty:
            raise CorpusError(
                f"corpus {spec_str!r} has no rows in languages {list(langs)}; it has {present}."
            )
    if max_per_lang is not None:
        df = _cap_per_lang(df, int(max_per_lang), int(seed))
    if df.empty:
        raise CorpusError(f"corpus {spec_str!r} is empty.")
    return df.reset_index(drop=True)


def available_demo_langs() -> list[str]:
    """Language codes the demo corpus can load: the default ones plus every Django locale directory name."""
    dirs = sorted({p.name for root in _django_locale_roots() for p in root.iterdir() if p.is_dir()})
    inverse = {v: k for k, v in DJANGO_LOCALES.items()}
    return sorted(set(DEFAULT_LANGS) | {inverse.get(d, d) for d in dirs} - {"__pycache__"})


# ---------------------------------------------------------------------------------------------------------- demo
def _django_dir() -> Path:
    try:
        import django
    except ImportError as exc:  # pragma: no cover - django is a dependency
        raise CorpusError("the demo corpus needs Django's catalogs: pip install 'django==5.2.19'.") from exc
    return Path(django.__file__).parent


def _django_locale_roots() -> list[Path]:
    base = _django_dir()
    roots = [base / "conf" / "locale"]
    roots += sorted(p for p in (base / "contrib").glob("*/locale") if p.is_dir())
    return roots


def _catalog_files(locale: str) -> list[Path]:
    files = []
    for root in _django_locale_roots():
        d = root / locale / "LC_MESSAGES"
        files += [d / name for name in ("django.po", "djangojs.po") if (d / name).is_file()]
    return files


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_ESCAPE_RE = re.compile(r"\\(.)")
_PO_LINE_RE = re.compile(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+"(.*)"\s*$')


def _unescape(s: str) -> str:
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), s)


def parse_po(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Entries of a .po file (``ctx, id, plural, strs, fuzzy``) and its Plural-Forms expression."""
    entries: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    field: tuple[str, int] | None = None
    flags_fuzzy = False

    def flush() -> None:
        nonlocal cur, field, flags_fuzzy
        if "id" in cur:
            cur["fuzzy"] = flags_fuzzy
            entries.append(cur)
        cur, field, flags_fuzzy = {}, None, False

    text = path.read_text(encoding="utf-8")
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith("#"):
            if "id" in cur and field is not None and field[0] == "str":
                flush()  # a comment starts the next entry even without a blank line
            if line.startswith("#,") and "fuzzy" in line:
                flags_fuzzy = True
            continue  # obsolete (#~) entries and comments are skipped
        if line.startswith('"'):
            if field is None:
                continue
            value = _unescape(line[1:-1])
            kind, idx = field
            if kind == "str":
                cur["strs"][idx] += value
            else:
                cur[kind] += value
            continue
        m = _PO_LINE_RE.match(line)
        if not m:
            continue
        keyword, idx, value = m.group(1), m.group(2), _unescape(m.group(3))
        if keyword in ("msgctxt", "msgid") and "id" in cur and field is not None and field[0] == "str":
            flush()
        if keyword == "msgctxt":
            cur["ctx"] = value
            field = ("ctx", 0)
        elif keyword == "msgid":
            cur["id"] = value
            cur.setdefault("strs", {})
            field = ("id", 0)
        elif keyword == "msgid_plural":
            cur["plural"] = value
            field = ("plural", 0)
        else:
            i = int(idx) if idx is not None else 0
            cur.setdefault("strs", {})[i] = value
            field = ("str", i)
    flush()

    plural_expr = ""
    for e in entries:
        if e["id"] == "" and "ctx" not in e:
            m = re.search(r"plural\s*=\s*([^;\n]+)", e["strs"].get(0, ""))
            plural_expr = m.group(1).strip() if m else ""
            break
    return [e for e in entries if e["id"]], plural_expr


_COUNT_NAMES = re.compile(r"count|num|cnt|counter|total|size|length|max|min|limit|days|number", re.I)
_NAMED_PH = re.compile(r"%\((\w+)\)[-#0 +]*\d*(?:\.\d+)?([sdirfgexXcu])")
_POS_PH = re.compile(r"%(?:\d+\$)?[-#0 +]*\d*(?:\.\d+)?([sdirfgexXcu])")
_BRACE_PH = re.compile(r"\{\{?\s*[\w.]*\s*\}\}?")
_TAG = re.compile(r"<[^<>]*>")
_SPACE = re.compile(r"\s+")
_NUMERIC = set("difgeExXu")


def _filler(conv: str, name: str = "") -> str:
    return NEUTRAL_NUMBER if conv in _NUMERIC or (name and _COUNT_NAMES.search(name)) else NEUTRAL_TEXT


def clean_text(text: str) -> str:
    """Replace placeholders with a neutral filler, drop HTML tags, unescape entities, collapse whitespace."""
    s = text.replace("%%", "\x00")
    s = _NAMED_PH.sub(lambda m: _filler(m.group(2), m.group(1)), s)
    s = _POS_PH.sub(lambda m: _filler(m.group(1)), s)
    s = _BRACE_PH.sub(lambda m: _filler("", m.group(0).strip("{} ")), s)
    s = _TAG.sub("", s)
    s = html.unescape(s).replace("\x00", "%").replace("\xa0", " ")
    return _SPACE.sub(" ", s).strip()


def _has_letter(s: str) -> bool:
    return any(unicodedata.category(ch).startswith("L") for ch in s)


def _plural_index(expr: str, nforms: int) -> int:
    if not expr:
        return min(1, nforms - 1)
    try:
        idx = int(gettext.c2py(expr)(PLURAL_N))
    except (ValueError, SyntaxError, TypeError, AttributeError):
        return nforms - 1
    return max(0, min(idx, nforms - 1))


def catalog_pairs(entries: Iterable[dict[str, Any]], plural_expr: str = "") -> dict[str, str]:
    """Cleaned English text -> cleaned translation for parsed .po entries (first translated occurrence wins).

    Fuzzy and untranslated entries are left out, as are translations with no letter after cleaning. A plural
    entry pairs ``msgid_plural`` with the form ``plural_expr`` picks for n = 5.
    """
    out: dict[str, str] = {}
    for e in entries:
        if e.get("fuzzy"):
            continue
        strs = e.get("strs", {})
        if "plural" in e:
            english = e["plural"]
            n = max(strs) + 1 if strs else 0
            translated = strs.get(_plural_index(plural_expr, n), "") if n else ""
        else:
            english = e["id"]
            translated = strs.get(0, "")
        en = clean_text(english)
        if not en or en in out or not translated.strip():
            continue
        tr = clean_text(translated)
        if tr and _has_letter(tr):
            out[en] = tr
    return out


@functools.lru_cache(maxsize=256)
def _catalog(locale: str) -> dict[str, str]:
    """Cleaned English text -> cleaned translation for one Django locale, over all its catalog files."""
    out: dict[str, str] = {}
    for path in _catalog_files(locale):
        entries, plural_expr = parse_po(path)
        for en, tr in catalog_pairs(entries, plural_expr).items():
            out.setdefault(en, tr)
    return out


@functools.lru_cache(maxsize=1)
def _english_universe() -> tuple[str, ...]:
    """Every cleaned English source string of the Django catalogs, in catalog order."""
    seen: dict[str, None] = {}
    for path in _catalog_files("en"):
        entries, _ = parse_po(path)
        for e in entries:
            en = clean_text(e.get("plural", e["id"]))
            if en and _has_letter(en):
                seen.setdefault(en, None)
    return tuple(seen)


def text_key(english: str) -> str:
    """The demo's parallel key of an English source string (stable across runs, platforms and languages)."""
    return "dj-" + hashlib.blake2b(english.encode("utf-8"), digest_size=6).hexdigest()


def _rank(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()


@functools.lru_cache(maxsize=32)
def heldout_keys(seed: int = 0) -> frozenset[str]:
    """The demo keys held out (in every language) for ``seed``: the first ~17.5% of keys by a seeded hash."""
    keys = sorted((text_key(en) for en in _english_universe()), key=lambda k: _rank(seed, k))
    return frozenset(keys[: round(HELDOUT_FRACTION * len(keys))])


def _django_locale(lang: str) -> str:
    locale = DJANGO_LOCALES.get(lang, lang.replace("-", "_"))
    if not any((root / locale).is_dir() for root in _django_locale_roots()[:1]):
        raise CorpusError(
            f"the demo corpus has no language {lang!r}; available: {', '.join(available_demo_langs())}."
        )
    return locale


@functools.lru_cache(maxsize=64)
def _load_demo_cached(langs: tuple[str, ...], seed: int) -> pd.DataFrame:
    universe = _english_universe()
    held = heldout_keys(seed)
    rows: dict[str, list[str]] = {c: [] for c in COLUMNS}
    for lang in langs:
        if lang == "en":
            pairs = [(en, en) for en in universe]
        else:
            cat = _catalog(_django_locale(lang))
            pairs = [(en, cat[en]) for en in universe if en in cat]
        script = SCRIPTS.get(lang) or _majority_script(t for _, t in pairs)
        for en, text in pairs:
            key = text_key(en)
            rows["text"].append(text)
            rows["lang"].append(lang)
            rows["script"].append(script)
            rows["source"].append("django")
            rows["key"].append(key)
            rows["split"].append("heldout" if key in held else "train")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _load_demo(langs: tuple[str, ...], seed: int) -> pd.DataFrame:
    if len(set(langs)) != len(langs):
        raise CorpusError(f"langs has duplicates: {list(langs)}.")
    return _load_demo_cached(langs, seed).copy()


# ---------------------------------------------------------------------------------------------------------- udhr
UDHR_MIN_CHARS = 25
_UDHR_FIELDS = ("specimen_36", "specimen_32", "specimen_21", "specimen_16")


@functools.lru_cache(maxsize=1)
def _gf_languages() -> Any:
    try:
        import gflanguages
    except ImportError as exc:
        raise CorpusError("the udhr corpus needs gflanguages: pip install gflanguages.") from exc
    return gflanguages.LoadLanguages()


def udhr_paragraphs(lang: str) -> list[str]:
    """Distinct full UDHR paragraphs gflanguages ships for ``lang`` (its paragraph/passage sample texts)."""
    languages = _gf_languages()
    gf_id = GF_IDS.get(lang, lang if "_" in lang else f"{lang}_Latn")
    if gf_id not in languages:
        raise CorpusError(f"gflanguages has no sample text for {lang!r} (looked for {gf_id!r}).")
    sample = languages[gf_id].sample_text
    seen: dict[str, None] = {}
    for name in _UDHR_FIELDS:
        for para in getattr(sample, name, "").split("\n"):
            para = _SPACE.sub(" ", para).strip()
            if para and _has_letter(para):
                seen.setdefault(para, None)
    # a very short paragraph ("La Asamblea General", "よって、ここに、国連総会は、") joins the next one
    out: list[str] = []
    carry = ""
    for para in seen:
        para = _join(carry, para) if carry else para
        if len(para) < UDHR_MIN_CHARS:
            carry = para
            continue
        out.append(para)
        carry = ""
    if carry:
        if out:
            out[-1] = _join(out[-1], carry)
        else:
            out.append(carry)
    return out


def _join(a: str, b: str) -> str:
    return a + b if a and ord(a[-1]) >= 0x2E80 else f"{a} {b}"


@functools.lru_cache(maxsize=16)
def _load_udhr_cached(langs: tuple[str, ...]) -> pd.DataFrame:
    rows: dict[str, list[str]] = {c: [] for c in COLUMNS}
    for lang in langs:
        paras = udhr_paragraphs(lang)
        script = SCRIPTS.get(lang) or _majority_script(paras)
        for i, para in enumerate(paras):
            rows["text"].append(para)
            rows["lang"].append(lang)
            rows["script"].append(script)
            rows["source"].append("udhr")
            rows["key"].append(f"udhr-{lang}-{i:02d}")
            rows["split"].append("heldout")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _load_udhr(langs: tuple[str, ...]) -> pd.DataFrame:
    return _load_udhr_cached(langs).copy()


# ---------------------------------------------------------------------------------------------------------- scripts
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


# ---------------------------------------------------------------------------------------------------------- files
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


# ---------------------------------------------------------------------------------------------------------- hub
def _require_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"{what} needs the optional 'datasets' package and network access to the Hugging Face Hub: "
            "pip install 'moe-routing[datasets]' (or pip install datasets). Offline, use 'demo', 'udhr' or a "
            "local file instead."
        ) from None
    return datasets


_SPLIT_LIKE = re.compile(r"^(train|test|validation|valid|dev|devtest)(\[.*\])?$|\[")


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    parts = re.split(r":(?![^\[]*\])", spec[3:])  # a slice such as train[:100] keeps its colon
    name = parts[0]
    if not name:
        raise CorpusError(f"{spec!r}: give a dataset name, e.g. 'hf:wikitext:wikitext-2-raw-v1:test'.")
    if len(parts) > 3:
        raise CorpusError(f"{spec!r}: expected 'hf:<dataset>[:<config>][:<split>]'.")
    config, split = None, "train"
    if len(parts) == 2:
        if _SPLIT_LIKE.search(parts[1]):
            split = parts[1]
        else:
            config = parts[1] or None
    elif len(parts) == 3:
        config, split = parts[1] or None, parts[2] or "train"
    return name, config, split


def _hub_error(what: str, exc: Exception) -> CorpusError:
    return CorpusError(
        f"could not load {what} from the Hugging Face Hub ({type(exc).__name__}: {exc}). Check the name, config "
        "and split, the network, and for gated datasets accept the terms on the dataset page and log in "
        "(huggingface-cli login). Offline, use 'demo', 'udhr' or a local file."
    )


def _load_hf(spec: str, text_column: str) -> pd.DataFrame:
    name, config, split = _parse_hf_spec(spec)
    datasets = _require_datasets(f"{spec!r}")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise _hub_error(f"{name!r} (config {config!r}, split {split!r})", exc) from None
    table = ds.to_pandas()
    if "lang" not in table and "language" in table:
        table = table.rename(columns={"language": "lang"})
    return _normalise(table, f"hf:{name}", text_column, f"dataset {name!r}")


def _load_flores(langs: tuple[str, ...], split: str) -> pd.DataFrame:
    unknown = [lang for lang in langs if lang not in FLORES_CODES]
    if unknown:
        raise CorpusError(f"flores: no FLORES code known for {unknown}; known: {', '.join(FLORES_CODES)}.")
    datasets = _require_datasets("'flores'")
    frames = []
    for lang in langs:
        plus, old = FLORES_CODES[lang]
        errors = []
        for repo, config, column in (("openlanguagedata/flores_plus", plus, "text"),
                                     ("facebook/flores", old, "sentence")):  # fmt: skip
            try:
                ds = datasets.load_dataset(repo, config, split=split)
            except Exception as exc:
                errors.append(_hub_error(f"{repo} {config} ({split})", exc))
                continue
            table = ds.to_pandas()
            key = table["id"].astype(str) if "id" in table else pd.Series(range(len(table))).astype(str)
            frames.append(pd.DataFrame({
                "text": table[column].astype(str), "lang": lang,
                "script": SCRIPTS.get(lang, "Unknown"), "source": "flores",
                "key": "flores-" + key, "split": "heldout",
            }))  # fmt: skip
            break
        else:
            raise errors[0]
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------------- shared
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
