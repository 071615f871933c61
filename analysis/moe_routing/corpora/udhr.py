"""UDHR paragraphs that gflanguages ships as font samples: held-out prose (see ``moe_routing.corpora``)."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd

from ..errors import CorpusError
from ._common import _SPACE, COLUMNS, SCRIPTS, _has_letter, _majority_script

#: Our language code -> gflanguages id.
GF_IDS: dict[str, str] = {
    "zh": "zh_Hans", "ja": "ja_Jpan", "ko": "ko_Kore", "ru": "ru_Cyrl", "uk": "uk_Cyrl", "ar": "ar_Arab",
    "fa": "fa_Arab", "he": "he_Hebr", "hi": "hi_Deva", "bn": "bn_Beng", "th": "th_Thai", "el": "el_Grek",
    "ka": "ka_Geor",
}  # fmt: skip


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

