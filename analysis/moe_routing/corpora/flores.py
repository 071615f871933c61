"""FLORES+ (``openlanguagedata/flores_plus``): the same ~2,000 sentences in about 200 languages, parallel by id.

``load_flores(langs, split)`` reads the Hub (gated: accept the terms, log in) through the optional ``datasets``
package, or, when ``MOE_ROUTING_FLORES_DIR`` names a local copy (``huggingface-cli download
openlanguagedata/flores_plus --repo-type dataset --local-dir DIR``, or any folder with FLORES+-shaped Parquet
files below ``<split>/``), that folder with no network at all. Rows carry ``lang`` (our short code for the demo
languages, else the FLORES code such as ``"quy_Latn"``), ``script`` (ISO 15924 name), ``family`` (Glottolog top
family of the ISO 639-3 code; ``"Unclassified"`` for a code not in ``FAMILIES``), ``code`` and ``key =
"flores-<id>"`` (rows with one key are translations of each other).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..errors import CorpusError
from ._common import COLUMNS

REPO = "openlanguagedata/flores_plus"
#: Environment variable naming a local FLORES+ copy (read instead of the Hub).
LOCAL_ENV = "MOE_ROUTING_FLORES_DIR"
SPLITS = ("dev", "devtest")

#: Our language code -> FLORES+ config name (first) and the FLORES-200 one (second, kept for old callers).
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

#: ISO 15924 code -> the script names the other corpora use.
SCRIPT_NAMES: dict[str, str] = {
    "Latn": "Latin", "Cyrl": "Cyrillic", "Arab": "Arabic", "Hebr": "Hebrew", "Deva": "Devanagari",
    "Beng": "Bengali", "Thai": "Thai", "Grek": "Greek", "Geor": "Georgian", "Armn": "Armenian",
    "Hang": "Hangul", "Kore": "Hangul", "Jpan": "Japanese", "Hans": "Han", "Hant": "Han", "Taml": "Tamil",
    "Telu": "Telugu", "Knda": "Kannada", "Mlym": "Malayalam", "Gujr": "Gujarati", "Guru": "Gurmukhi",
    "Orya": "Oriya", "Sinh": "Sinhala", "Khmr": "Khmer", "Laoo": "Lao", "Mymr": "Myanmar", "Ethi": "Ethiopic",
    "Tibt": "Tibetan", "Thaa": "Thaana", "Mong": "Mongolian", "Syrc": "Syriac", "Olck": "Ol Chiki",
    "Mtei": "Meitei Mayek", "Tfng": "Tifinagh", "Nkoo": "N'Ko", "Bugi": "Buginese",
}  # fmt: skip

_FAMILY_LISTS = {
    "Indo-European": "afr als asm ast awa bel ben bho bos bul cat ces ckb cym dan deu ell eng fao fra fur gla gle "
                     "glg guj hin hne hrv hye isl ita kas kmr lij lim lit lmo ltg ltz lvs mag mai mar mkd nld nno "
                     "nob npi oci ory pan pbt pes pol por prs ron rus san scn sin slk slv snd spa srd srp swe szl "
                     "tgk ukr urd vec ydd arg",
    "Afro-Asiatic": "acm acq aeb ajp apc arb ars ary arz amh gaz hau heb kab mlt som taq tir tzm zgh",
    "Atlantic-Congo": "aka bem cjk ewe fon fuv ibo kam kbp kik kin kmb kon lin lua lug mos nso nya run sag sna "
                      "sot ssw swh tsn tso tum twi umb wol xho yor zul",
    "Mande": "bam dyu nqo",
    "Nilotic": "dik luo nus",
    "Saharan": "knc",
    "Austronesian": "ace ban bjn bug ceb fij ilo ind jav min mri pag plt smo sun tgl war zsm",
    "Sino-Tibetan": "bod dzo kac lus mni mya yue zho cmn",
    "Dravidian": "kan mal tam tel",
    "Turkic": "azb azj bak crh kaz kir tat tuk tur uig uzn",
    "Uralic": "est fin hun",
    "Kartvelian": "kat",
    "Austroasiatic": "khm sat vie",
    "Tai-Kadai": "lao shn tha",
    "Japonic": "jpn",
    "Koreanic": "kor",
    "Mongolic-Khitan": "khk",
    "Quechuan": "quy",
    "Aymaran": "ayr",
    "Tupian": "grn gug",
    "Isolate (Basque)": "eus",
    "Creole": "hat kea pap tpi",
    "Constructed": "epo",
}  # fmt: skip
#: ISO 639-3 code -> Glottolog top-level family (creoles and constructed languages are groups of their own).
FAMILIES: dict[str, str] = {code: fam for fam, codes in _FAMILY_LISTS.items() for code in codes.split()}

_SHORT = {plus: short for short, (plus, _old) in FLORES_CODES.items()}


def flores_code(lang: str) -> str:
    """Our code or a FLORES code -> the FLORES+ config name (``"zh"`` -> ``"cmn_Hans"``, ``"quy_Latn"`` kept)."""
    if lang in FLORES_CODES:
        return FLORES_CODES[lang][0]
    if "_" in lang and len(lang.split("_")[1]) == 4:
        return lang
    raise CorpusError(
        f"flores: no FLORES code known for {lang!r}; use a FLORES code such as 'quy_Latn' or one of "
        f"{', '.join(FLORES_CODES)}."
    )


def _frame(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """FLORES+ rows (``id, iso_639_3, iso_15924, text, ...``) -> the corpus layout plus ``family`` and ``code``."""
    missing = {"iso_639_3", "iso_15924", "text"} - set(table.columns)
    if missing:
        raise CorpusError(f"flores: the data lacks the FLORES+ columns {sorted(missing)}; it has "
                          f"{list(table.columns)}.")
    iso = table["iso_639_3"].astype(str)
    code = iso + "_" + table["iso_15924"].astype(str)
    ids = table["id"].astype(str) if "id" in table else pd.Series(range(len(table))).astype(str)
    return pd.DataFrame({
        "text": table["text"].astype(str).to_numpy(),
        "lang": code.map(lambda c: _SHORT.get(c, c)).to_numpy(),
        "script": table["iso_15924"].astype(str).map(lambda s: SCRIPT_NAMES.get(s, s)).to_numpy(),
        "source": "flores",
        "key": ("flores-" + ids).to_numpy(),
        "split": "heldout",
        "family": iso.map(lambda c: FAMILIES.get(c, "Unclassified")).to_numpy(),
        "code": code.to_numpy(),
    }, columns=[*COLUMNS, "family", "code"])  # fmt: skip


def _local_files(root: Path, split: str) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*.parquet")):
        rel = p.relative_to(root)
        if split in rel.parts[:-1] or p.stem == split or p.stem.startswith(f"{split}-"):
            files.append(p)
    return files


def _load_local(root: Path, codes: list[str] | None, split: str) -> pd.DataFrame:
    if not root.is_dir():
        raise CorpusError(f"{LOCAL_ENV}={root}: no such folder; point it at a local copy of {REPO}.")
    files = _local_files(root, split)
    if not files:
        raise CorpusError(f"{LOCAL_ENV}={root} has no Parquet files of split {split!r} (looked for "
                          f"{split}/**/*.parquet and {split}-*.parquet).")
    table = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
    frame = _frame(table, split)
    return frame if codes is None else frame[frame["code"].isin(codes)]


def _load_hub(codes: list[str] | None, split: str) -> pd.DataFrame:
    from .hub import _hub_error, _require_datasets, gated_error, is_gated

    datasets = _require_datasets("'flores'")
    frames = []
    for config in codes if codes is not None else [None]:
        try:
            ds = datasets.load_dataset(REPO, config, split=split)
        except Exception as exc:
            if is_gated(exc):
                raise gated_error(REPO, exc, extra=f" Or download it where you can and point {LOCAL_ENV} at "
                                  "the folder.") from None
            raise _hub_error(f"{REPO} {config or '(all languages)'} ({split})", exc) from None
        frames.append(_frame(ds.to_pandas(), split))
    return pd.concat(frames, ignore_index=True)


def load_flores(langs: tuple[str, ...] | None, split: str = "devtest") -> pd.DataFrame:
    """FLORES+ ``split`` for ``langs`` (our codes or FLORES codes; None: every language of the dataset)."""
    if split not in SPLITS:
        raise CorpusError(f"flores: unknown split {split!r}; FLORES+ has {', '.join(SPLITS)}.")
    codes = None if langs is None else [flores_code(x) for x in langs]
    local = os.environ.get(LOCAL_ENV)
    frame = _load_local(Path(local).expanduser(), codes, split) if local else _load_hub(codes, split)
    if codes is not None:
        absent = sorted(set(codes) - set(frame["code"]))
        if absent:
            raise CorpusError(f"flores: no {split} rows for {absent}; the data has {frame['code'].nunique()} "
                              "languages (see FLORES+'s dataset card for the codes).")
    return frame.reset_index(drop=True)
