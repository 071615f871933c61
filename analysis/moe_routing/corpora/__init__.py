"""Text sources: one loader, one frame layout, one module per source.

``load_corpus(spec)`` parses ``spec`` once into a ``Spec`` (which source, which split/config/path) and hands it to
that source's module: ``catalogs`` (the demo corpus), ``udhr``, ``files`` (user files), ``hub`` (``hf:``
datasets), ``flores`` (FLORES+); ``_common`` holds the frame layout and what they share.

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
    FLORES+ (``openlanguagedata/flores_plus``, a gated dataset: accept its terms and log in; or a local copy named
    by ``MOE_ROUTING_FLORES_DIR``), ``devtest`` by default, in *every* language it has (about 200; ``langs`` for a
    subset, in our codes or FLORES codes such as ``"quy_Latn"``); keyed by sentence id (parallel); extra columns
    ``family`` (language family) and ``code`` (the FLORES code). See ``moe_routing.corpora.flores``.

Language codes of the demo: Django's locale directories map to plain codes; ``zh`` is ``zh_Hans`` (Simplified,
the larger readership) and ``pt`` is ``pt_BR`` (the more complete Portuguese catalog). Any other Django locale can be
asked for by its directory name (``langs=["zh_Hant", "sr_Latn", "ca"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from ..errors import CorpusError
from ._common import (
    COLUMNS,
    DEFAULT_LANGS,
    SCRIPTS,
    SPLITS,
    _as_int,
    _cap_per_lang,
    _drop_empty,
    _is_whole,
    _majority_script,
    _normalise,
    char_script,
    check_label_columns,
    guess_script,
)
from ._common import (
    _char_script as _char_script,  # the old private name (notebooks of 0.1)
)
from .catalogs import (
    DJANGO_LOCALES,
    HELDOUT_FRACTION,
    NEUTRAL_NUMBER,
    NEUTRAL_TEXT,
    PLURAL_N,
    _load_demo,
    available_demo_langs,
    catalog_pairs,
    clean_text,
    heldout_keys,
    parse_po,
    text_key,
)
from .files import _load_path
from .flores import FAMILIES, FLORES_CODES, load_flores
from .hub import _load_hf, _parse_hf_spec
from .udhr import GF_IDS, UDHR_MIN_CHARS, _load_udhr, udhr_paragraphs

__all__ = [
    "COLUMNS", "DEFAULT_LANGS", "DJANGO_LOCALES", "FAMILIES", "FLORES_CODES", "GF_IDS", "HELDOUT_FRACTION",
    "NEUTRAL_NUMBER", "NEUTRAL_TEXT", "PLURAL_N", "SCRIPTS", "SPLITS", "UDHR_MIN_CHARS", "Spec",
    "available_demo_langs", "catalog_pairs", "char_script", "check_label_columns", "clean_text", "guess_script",
    "heldout_keys", "load_corpus", "load_flores", "parse_po", "text_key", "udhr_paragraphs",
]  # fmt: skip

_BUILTIN = ("demo", "udhr", "flores")


@dataclass(frozen=True)
class Spec:
    """A corpus spec, parsed once: ``kind`` says which source; the other fields are that source's options.

    ``Spec.parse("flores:dev")`` -> ``Spec(kind="flores", text="flores:dev", split="dev")``; a string that is not
    a built-in name (``"flores_sample.jsonl"``, ``"flores200/"``) or a ``Path`` is a path.
    """

    kind: Literal["demo", "udhr", "flores", "hf", "path"]
    text: str
    split: str | None = None
    name: str | None = None
    config: str | None = None
    path: Path | None = None

    @property
    def builtin(self) -> bool:
        """Built-in sources load only the requested languages themselves (no filter afterwards)."""
        return self.kind in _BUILTIN

    @classmethod
    def parse(cls, spec: str | Path | Spec) -> Spec:
        if isinstance(spec, Spec):
            return spec
        text = str(spec)
        if isinstance(spec, str):
            head, sep, rest = text.partition(":")
            if text in ("demo", "udhr"):
                return cls(kind=text, text=text)  # type: ignore[arg-type]
            if head == "flores" and (not sep or rest):
                return cls(kind="flores", text=text, split=rest or "devtest")
            if head == "hf" and sep:
                name, config, split = _parse_hf_spec(text)
                return cls(kind="hf", text=text, name=name, config=config, split=split)
        return cls(kind="path", text=text, path=Path(text).expanduser())


def load_corpus(
    spec: str | Path | Spec = "demo",
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
            folder of ``.txt`` files or a ``.jsonl``/``.csv``/``.tsv``/``.parquet`` file (see the module docstring),
            or a parsed ``Spec``.
        split: keep only rows whose ``split`` is this (``"train"`` or ``"heldout"`` for the built-in corpora).
        langs: keep only these languages (for ``demo``/``udhr``: which languages to load, default the 24 of
            ``DEFAULT_LANGS``; for ``flores``: default every FLORES+ language).
        max_per_lang: at most this many rows per language, chosen by ``seed``; for parallel corpora the same keys
            are preferred in every language.
        seed: chooses the demo's held-out keys and the ``max_per_lang`` sample.
        text_column: the column holding the text in a table file or a Hugging Face dataset.

    Raises:
        CorpusError: unknown spec or language, unreadable or empty file, missing text column, empty result, ...
        GatedDatasetError: FLORES+ refused by the Hub (terms not accepted or not logged in).
    """
    parsed = Spec.parse(spec)
    spec_str = parsed.text
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

    if parsed.kind == "demo":
        df = _load_demo(tuple(langs or DEFAULT_LANGS), int(seed))
    elif parsed.kind == "udhr":
        df = _load_udhr(tuple(langs or DEFAULT_LANGS))
    elif parsed.kind == "flores":
        df = load_flores(tuple(langs) if langs else None, parsed.split or "devtest")
    elif parsed.kind == "hf":
        df = _load_hf(parsed, text_column)
    else:
        assert parsed.path is not None
        df = _load_path(parsed.path, text_column)

    df = _drop_empty(df, spec_str)
    if split is not None:
        present = sorted(df["split"].astype(str).unique())
        df = df[df["split"] == split]
        if df.empty:
            raise CorpusError(
                f"corpus {spec_str!r} has no rows with split={split!r}; its splits are {present}."
            )
    if langs is not None and not parsed.builtin:
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


_ = (_majority_script, _normalise)  # re-exported for old private importers
