"""moe_routing.corpora: the demo corpus (Django catalogs), UDHR, user files, hub specs. Real files, no mocks."""

from __future__ import annotations

import json
import re
import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest

from moe_routing import CorpusError
from moe_routing.corpora import (
    COLUMNS,
    DEFAULT_LANGS,
    SCRIPTS,
    _parse_hf_spec,
    catalog_pairs,
    clean_text,
    guess_script,
    heldout_keys,
    load_corpus,
    parse_po,
    text_key,
)


@pytest.fixture(scope="module")
def demo() -> pd.DataFrame:
    return load_corpus("demo")


# ------------------------------------------------------------------------------------------------ demo: shape
def test_demo_columns_and_languages(demo):
    assert list(demo.columns) == list(COLUMNS)
    assert len(DEFAULT_LANGS) >= 24
    assert set(demo["lang"]) == set(DEFAULT_LANGS)
    assert (demo["source"] == "django").all()
    assert demo["text"].str.strip().ne("").all()
    assert set(demo["split"]) == {"train", "heldout"}
    counts = demo.groupby("lang").size()
    assert counts.min() >= 400, counts.to_dict()  # every language is substantial
    assert counts["en"] == demo["key"].nunique()  # English covers every key
    scripts = demo.groupby("script")["lang"].nunique()
    assert len(scripts) >= 12, scripts.to_dict()


def test_script_column_matches_the_characters(demo):
    for lang, group in demo.groupby("lang"):
        assert set(group["script"]) == {SCRIPTS[lang]}
        guessed = guess_script(" ".join(group["text"].head(200)))
        assert guessed == SCRIPTS[lang], (lang, guessed)


def test_english_text_is_the_msgid_and_key_is_its_hash(demo):
    en = demo[demo["lang"] == "en"]
    assert en["key"].is_unique and en["text"].is_unique
    assert (en["key"] == en["text"].map(text_key)).all()
    assert {"Save", "Delete", "Log out", "January"} <= set(en["text"])


# ------------------------------------------------------------------------------------------------ demo: parallel
def test_parallel_keys_are_aligned(demo):
    assert not demo.duplicated(["lang", "key"]).any()
    en = demo[demo["lang"] == "en"].set_index("key")["text"]
    assert set(demo["key"]) <= set(en.index)  # every translation has its English source
    wide = demo.pivot(index="key", columns="lang", values="text")
    k = text_key("Save")
    assert wide.loc[k, "de"] == "Sichern" and wide.loc[k, "ru"] == "Сохранить" and wide.loc[k, "zh"] == "保存"
    k = text_key("January")
    assert wide.loc[k, "fr"] == "janvier" and wide.loc[k, "ja"] == "1月" and wide.loc[k, "ka"] == "იანვარი"
    complete = wide.notna().all(axis=1).sum()
    assert complete >= 300, complete  # hundreds of keys exist in all 24 languages


def test_heldout_split_is_by_key_and_the_same_in_every_language(demo):
    per_key = demo.groupby("key")["split"].nunique()
    assert (per_key == 1).all()  # a key is held out everywhere or nowhere
    held = set(demo.loc[demo["split"] == "heldout", "key"])
    assert held == set(heldout_keys(0)) & set(demo["key"])
    frac = len(held) / demo["key"].nunique()
    assert 0.15 <= frac <= 0.20, frac
    for _lang, group in demo.groupby("lang"):
        assert set(group.loc[group["split"] == "heldout", "key"]) <= held
        assert 0.12 <= (group["split"] == "heldout").mean() <= 0.23


def test_split_is_deterministic_in_seed_and_independent_of_langs():
    a = load_corpus("demo", seed=0)
    b = load_corpus("demo", seed=0)
    assert a.equals(b)
    c = load_corpus("demo", seed=1)
    held0 = set(a.loc[a["split"] == "heldout", "key"])
    held1 = set(c.loc[c["split"] == "heldout", "key"])
    assert held0 != held1 and len(held0 & held1) < 0.5 * len(held0)
    sub = load_corpus("demo", langs=["de", "ja"], seed=0)
    assert set(sub["lang"]) == {"de", "ja"}
    assert set(sub.loc[sub["split"] == "heldout", "key"]) <= held0


def test_split_argument_filters():
    train = load_corpus("demo", split="train")
    held = load_corpus("demo", split="heldout")
    assert set(train["split"]) == {"train"} and set(held["split"]) == {"heldout"}
    assert not set(train["key"]) & set(held["key"])
    with pytest.raises(CorpusError, match="split='test'"):
        load_corpus("demo", split="test")


def test_max_per_lang_prefers_the_same_keys():
    df = load_corpus("demo", max_per_lang=50, seed=3)
    assert df.groupby("lang").size().max() == 50
    keys = df.groupby("lang")["key"].apply(set)
    assert len(keys["en"] & keys["de"]) >= 40
    assert df.equals(load_corpus("demo", max_per_lang=50, seed=3))
    with pytest.raises(CorpusError):
        load_corpus("demo", max_per_lang=0)
    assert load_corpus("demo", max_per_lang="50", seed=3.0).equals(df)  # numeric strings, integral floats work
    for bad in ("fifty", 2.5, [50]):  # not a whole number: a CorpusError, not a raw ValueError / TypeError
        with pytest.raises(CorpusError, match="max_per_lang must be a positive whole number"):
            load_corpus("demo", max_per_lang=bad)
    with pytest.raises(CorpusError, match="seed must be a whole number"):
        load_corpus("demo", seed="three")


def test_other_django_locales_and_unknown_language():
    df = load_corpus("demo", langs=["zh_Hant", "ca"])
    assert set(df["lang"]) == {"zh_Hant", "ca"}
    assert set(df.loc[df["lang"] == "zh_Hant", "script"]) == {"Han"}
    assert set(df.loc[df["lang"] == "ca", "script"]) == {"Latin"}
    with pytest.raises(CorpusError, match=r"no language 'xx'.*available"):
        load_corpus("demo", langs=["de", "xx"])


# ------------------------------------------------------------------------------------------------ demo: cleaning
def test_placeholders_and_markup_are_gone(demo):
    for pattern in (
        r"%\(\w+\)",
        r"%[sdifr]\b",
        r"\{\w*\}",
        r"</?[a-zA-Z][^>]*>",
        r"&[a-z]+;",
        r"\s{2,}",
        r"\n",
    ):
        bad = demo.loc[demo["text"].str.contains(pattern, regex=True), "text"]
        assert bad.empty, (pattern, bad.head().tolist())
    assert demo["text"].map(lambda t: any(ch.isalpha() for ch in t)).all()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Select %s to change", "Select … to change"),
        ("Ensure this value has at most %(limit_value)d characters (it has %(show_value)d).",
         "Ensure this value has at most 5 characters (it has 5)."),
        ("%(count)s items", "5 items"),
        ("Hello {name}, see {}", "Hello …, see …"),
        ('<a href="%(link)s">Go</a> <strong>now</strong>', "Go now"),
        ("100%% sure &amp; done", "100% sure & done"),
        ("two\nlines  here", "two lines here"),
    ],
)  # fmt: skip
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_plural_entries_use_the_catalogs_own_form_for_five(demo):
    wide = demo.pivot(index="key", columns="lang", values="text")
    row = wide.loc[text_key("Ensure that there are no more than 5 digits in total.")]
    assert row["ru"] == "Убедитесь, что вы ввели не более 5 цифр."  # Russian "many" form (index 2)
    assert "5" in row["ja"]


def test_po_parser_drops_fuzzy_untranslated_and_obsolete(tmp_path):
    po = tmp_path / "x.po"
    po.write_text(
        textwrap.dedent(
            r"""
            msgid ""
            msgstr ""
            "Plural-Forms: nplurals=3; plural=(n%10==1 && n%100!=11 ? 0 : n%10>=2 && n%10<=4 && (n%100<10 || n%100>=20) ? 1 : 2);\n"

            msgid "Good"
            msgstr "Хорошо"

            #, fuzzy
            msgid "Fuzzy one"
            msgstr "Нечётко"

            msgid "Untranslated"
            msgstr ""

            msgctxt "menu"
            msgid "Multi"
            "line"
            msgstr "Много"
            "строк"

            msgid "%(n)d file"
            msgid_plural "%(n)d files"
            msgstr[0] "%(n)d файл"
            msgstr[1] "%(n)d файла"
            msgstr[2] "%(n)d файлов"

            #~ msgid "Obsolete"
            #~ msgstr "Устарело"
            """
        ),
        encoding="utf-8",
    )
    entries, plural = parse_po(po)
    assert "n%10==1" in plural
    assert [e["id"] for e in entries] == ["Good", "Fuzzy one", "Untranslated", "Multiline", "%(n)d file"]
    assert entries[1]["fuzzy"] and not entries[0]["fuzzy"]
    pairs = catalog_pairs(entries, plural)
    assert pairs == {"Good": "Хорошо", "Multiline": "Многострок", "5 files": "5 файлов"}


# (how fast the demo corpus loads in a fresh process: benchmarks/startup_times.py; no timed assertion here)


# ------------------------------------------------------------------------------------------------ udhr
def test_udhr_is_heldout_prose_in_every_default_language():
    df = load_corpus("udhr")
    assert list(df.columns) == list(COLUMNS)
    assert set(df["lang"]) == set(DEFAULT_LANGS)
    assert (df["source"] == "udhr").all() and (df["split"] == "heldout").all()
    assert df["key"].is_unique
    assert df["key"].str.match(r"^udhr-[a-z]+-\d{2}$").all()
    assert df["text"].str.len().min() >= 25  # paragraphs, not the short font-sample fragments
    assert len(df) >= 100
    for lang, group in df.groupby("lang"):
        assert guess_script(" ".join(group["text"])) == SCRIPTS[lang], lang
    en = " ".join(df.loc[df["lang"] == "en", "text"])
    assert "right" in en and "Everyone" in en
    demo_texts = set(load_corpus("demo")["text"])
    assert not set(df["text"]) & demo_texts  # outside the training domain
    assert set(load_corpus("udhr", split="heldout")["key"]) == set(df["key"])
    with pytest.raises(CorpusError, match="split='train'"):
        load_corpus("udhr", split="train")


# ------------------------------------------------------------------------------------------------ user files
def test_txt_folder_one_document_per_file_with_language_subfolders(tmp_path):
    (tmp_path / "de").mkdir()
    (tmp_path / "fr").mkdir()
    (tmp_path / "de" / "a.txt").write_text("Guten Tag.\n\nZweiter Absatz.", encoding="utf-8")
    (tmp_path / "fr" / "a.txt").write_text("Bonjour.", encoding="utf-8")
    (tmp_path / "loose.txt").write_text("Привет", encoding="utf-8")
    df = load_corpus(tmp_path)
    assert list(df.columns[:6]) == list(COLUMNS)
    assert df.set_index("file")["lang"].to_dict() == {"de/a.txt": "de", "fr/a.txt": "fr", "loose.txt": "und"}
    assert df.set_index("file")["key"].to_dict() == {"de/a.txt": "a", "fr/a.txt": "a", "loose.txt": "loose"}
    assert df.loc[df["lang"] == "de", "text"].item() == "Guten Tag.\n\nZweiter Absatz."
    assert df.loc[df["lang"] == "und", "script"].item() == "Cyrillic"
    assert (df["split"] == "heldout").all() and (df["source"] == tmp_path.name).all()
    assert list(load_corpus(tmp_path, langs=["fr"])["text"]) == ["Bonjour."]


def test_langs_filter_applies_to_files_whose_name_starts_with_flores(tmp_path, monkeypatch):
    """Only the built-in corpora load their languages themselves; a user file called flores* is filtered."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": "Hello.", "lang": "en"}, {"text": "Hallo.", "lang": "de"}, {"text": "Salut.", "lang": "fr"}]
    Path("flores_sample.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_corpus("flores_sample.jsonl", langs=["de"])["text"].tolist() == ["Hallo."]
    Path("flores200", "de").mkdir(parents=True)
    Path("flores200", "fr").mkdir()
    Path("flores200", "de", "a.txt").write_text("Guten Tag.", encoding="utf-8")
    Path("flores200", "fr", "a.txt").write_text("Bonjour.", encoding="utf-8")
    assert load_corpus("flores200", langs=["fr"])["text"].tolist() == ["Bonjour."]
    with pytest.raises(CorpusError, match="no rows in languages"):
        load_corpus("flores_sample.jsonl", langs=["ja"])


def test_jsonl_keeps_label_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"text": "def f(x): return x", "domain": "code", "lang": "en"},
        {"text": "Der Hund bellt.", "domain": "prose", "lang": "de"},
        {"text": "", "domain": "empty", "lang": "en"},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="dropped 1 empty text"):
        df = load_corpus(path)
    assert list(df.columns) == [*COLUMNS, "domain"]
    assert df["domain"].tolist() == ["code", "prose"]
    assert df["key"].tolist() == ["data.jsonl-0", "data.jsonl-1"]
    assert df["script"].tolist() == ["Latin", "Latin"]


def test_csv_tsv_parquet_and_text_column(tmp_path):
    frame = pd.DataFrame({"body": ["Hello world", "مرحبا بالعالم"], "label": [1, 2], "key": ["k1", "k2"]})
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_csv(tmp_path / "a.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.tsv", "a.parquet"):
        df = load_corpus(tmp_path / name, text_column="body")
        assert df["text"].tolist() == ["Hello world", "مرحبا بالعالم"], name
        assert df["script"].tolist() == ["Latin", "Arabic"]
        assert df["key"].tolist() == ["k1", "k2"]
        assert df["label"].astype(str).tolist() == ["1", "2"]
        assert (df["lang"] == "und").all()


def test_file_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file or folder"):
        load_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"empty\.csv is empty"):
        load_corpus(tmp_path / "empty.csv")
    (tmp_path / "blank.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="only whitespace"):
        load_corpus(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.csv").write_bytes(b"text\nCaf" + "é au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.csv is not UTF-8: byte 8 \(0xe9\)"):
        load_corpus(tmp_path / "latin1.csv")
    (tmp_path / "nocol.csv").write_text("body,lang\nhello,en\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no column 'text'; its columns are: body, lang"):
        load_corpus(tmp_path / "nocol.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="expected a JSON object"):
        load_corpus(tmp_path / "list.jsonl")
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(CorpusError, match=r"unsupported file type '\.docx'"):
        load_corpus(tmp_path / "x.docx")
    (tmp_path / "header_only.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no records"):
        load_corpus(tmp_path / "header_only.csv")
    (tmp_path / "all_empty.csv").write_text('text\n""\n"  "\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="all 2 texts are empty"):
        load_corpus(tmp_path / "all_empty.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="cannot be read as Parquet"):
        load_corpus(tmp_path / "broken.parquet")
    (tmp_path / "ok.csv").write_text("text,lang\nhello,en\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no rows in languages \['de'\]; it has \['en'\]"):
        load_corpus(tmp_path / "ok.csv", langs=["de"])


def test_txt_folder_errors(tmp_path):
    with pytest.raises(CorpusError, match=r"has no \.txt files"):
        load_corpus(tmp_path)
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfe")
    with pytest.raises(CorpusError, match=r"bad\.txt is not UTF-8: byte 3 \(0xff\)"):
        load_corpus(tmp_path)
    (tmp_path / "bad.txt").write_text("", encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_corpus(tmp_path)
    assert df["text"].tolist() == ["fine"]
    assert any("dropped 1 empty text" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------------ hub specs
def test_hf_spec_parsing():
    assert _parse_hf_spec("hf:user/data") == ("user/data", None, "train")
    assert _parse_hf_spec("hf:user/data:test") == ("user/data", None, "test")
    assert _parse_hf_spec("hf:user/data:train[:100]") == ("user/data", None, "train[:100]")
    assert _parse_hf_spec("hf:wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", "train")
    assert _parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    assert _parse_hf_spec("hf:user/data::dev") == ("user/data", None, "dev")
    with pytest.raises(CorpusError):
        _parse_hf_spec("hf:")
    with pytest.raises(CorpusError):
        _parse_hf_spec("hf:a:b:c:d")


@pytest.mark.parametrize("spec", ["hf:openlanguagedata/flores_plus:deu_Latn:dev", "flores", "flores:dev"])
def test_hub_specs_fail_clearly_offline(spec):
    """This machine has no Hub access (and no `datasets`): a CorpusError that says what to do, not a traceback."""
    with pytest.raises(CorpusError) as info:
        load_corpus(spec, langs=["de"])
    msg = str(info.value)
    assert re.search(r"pip install|network|Hub", msg), msg
    assert "demo" in msg  # points at the offline alternatives


def test_unknown_flores_language():
    with pytest.raises(CorpusError, match="no FLORES code known"):
        load_corpus("flores", langs=["xx"])
