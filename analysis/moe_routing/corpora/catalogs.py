"""The demo corpus: Django's gettext catalogs as a parallel multilingual corpus (see ``moe_routing.corpora``).

The ``.po`` files are read by ``parse_po`` rather than babel's ``read_po``: measured on the 308 catalog files of
the 24 default languages, babel gives the same pairs in 305 but drops plural forms beyond a catalog's declared
``nplurals`` (Hebrew's catalogs carry more forms than they declare), losing entries such as "5 days", and is
slower; it is also not a dependency. ``benchmarks/po_reader.py`` prints the comparison.
"""

from __future__ import annotations

import functools
import gettext
import hashlib
import html
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import CorpusError
from ._common import _SPACE, COLUMNS, DEFAULT_LANGS, SCRIPTS, _has_letter, _majority_script, _rank

HELDOUT_FRACTION = 0.175

#: Our language code -> Django locale directory, where they differ.
DJANGO_LOCALES: dict[str, str] = {"zh": "zh_Hans", "pt": "pt_BR"}

NEUTRAL_NUMBER = "5"
NEUTRAL_TEXT = "…"
PLURAL_N = 5


def available_demo_langs() -> list[str]:
    """Language codes the demo corpus can load: the default ones plus every Django locale directory name."""
    dirs = sorted({p.name for root in _django_locale_roots() for p in root.iterdir() if p.is_dir()})
    inverse = {v: k for k, v in DJANGO_LOCALES.items()}
    return sorted(set(DEFAULT_LANGS) | {inverse.get(d, d) for d in dirs} - {"__pycache__"})



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
        keyword, index, value = m.group(1), m.group(2), _unescape(m.group(3))
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
            i = int(index) if index is not None else 0
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
