"""FLORES+ end to end without the Hub: a local FLORES+-shaped copy (Parquet files under <split>/, the dataset's
own columns) written by the test, read through MOE_ROUTING_FLORES_DIR; the gated-dataset error; the Spec."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from moe_routing.corpora import Spec, load_corpus
from moe_routing.corpora.flores import FAMILIES, LOCAL_ENV
from moe_routing.corpora.hub import gated_error, is_gated
from moe_routing.errors import CorpusError, GatedDatasetError

SENTENCES = {  # (iso_639_3, iso_15924): sentences with ids 0, 1, 2
    ("eng", "Latn"): ["The cat sleeps.", "It rains today.", "Bread is cheap."],
    ("deu", "Latn"): ["Die Katze schläft.", "Heute regnet es.", "Brot ist billig."],
    ("cmn", "Hans"): ["猫在睡觉。", "今天下雨。", "面包很便宜。"],
    ("quy", "Latn"): ["Misiqa puñushan.", "Kunan p'unchay paramushan.", "T'antaqa pisi chaniyuqmi."],
    ("amh", "Ethi"): ["ድመቷ ተኝታለች።", "ዛሬ ዝናብ እየዘነበ ነው።", "ዳቦ ርካሽ ነው።"],
}


def write_flores(root: Path) -> Path:
    """FLORES+'s layout: one Parquet file per language and split, with its columns."""
    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True)
        for (iso, script), texts in SENTENCES.items():
            pd.DataFrame({
                "id": range(len(texts)), "iso_639_3": iso, "iso_15924": script, "glottocode": "xxxx1234",
                "text": [f"{t} ({split})" for t in texts], "url": "https://example.org", "domain": "wikinews",
                "topic": "misc", "has_image": False, "has_hyperlink": False, "last_updated": "2.1",
            }).to_parquet(root / split / f"{iso}_{script}.parquet")  # fmt: skip
    return root


@pytest.fixture
def flores(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCAL_ENV, str(write_flores(tmp_path / "flores_plus")))


def test_every_language_by_default_with_script_family_and_parallel_keys(flores):
    df = load_corpus("flores")
    assert set(df["code"]) == {f"{i}_{s}" for i, s in SENTENCES}
    assert set(df["lang"]) == {"en", "de", "zh", "quy_Latn", "amh_Ethi"}  # our codes where we have them
    assert df["text"].str.endswith("(devtest)").all()
    assert (df["source"] == "flores").all() and (df["split"] == "heldout").all()
    scripts = df.groupby("lang")["script"].first().to_dict()
    assert scripts == {"en": "Latin", "de": "Latin", "zh": "Han", "quy_Latn": "Latin", "amh_Ethi": "Ethiopic"}
    families = df.groupby("lang")["family"].first().to_dict()
    assert families["de"] == "Indo-European" and families["quy_Latn"] == "Quechuan"
    assert families["amh_Ethi"] == "Afro-Asiatic" and families["zh"] == "Sino-Tibetan"
    wide = df.pivot(index="key", columns="lang", values="text")
    assert wide.loc["flores-1", "de"] == "Heute regnet es. (devtest)"
    assert wide.notna().all().all()  # every sentence in every language


def test_langs_subset_split_and_cap(flores):
    df = load_corpus("flores:dev", langs=["de", "quy_Latn"], max_per_lang=2)
    assert set(df["lang"]) == {"de", "quy_Latn"} and df["text"].str.endswith("(dev)").all()
    assert df.groupby("lang").size().tolist() == [2, 2]
    keys = df.groupby("lang")["key"].apply(set)
    assert keys["de"] == keys["quy_Latn"]  # the cap keeps the same sentences in every language
    with pytest.raises(CorpusError, match=r"no devtest rows for \['fra_Latn'\]"):
        load_corpus("flores", langs=["fr"])
    with pytest.raises(CorpusError, match="unknown split 'test'"):
        load_corpus("flores:test")


def test_a_local_copy_that_is_not_flores_shaped_is_refused(tmp_path, monkeypatch):
    (tmp_path / "devtest").mkdir()
    pd.DataFrame({"sentence": ["x"]}).to_parquet(tmp_path / "devtest" / "a.parquet")
    monkeypatch.setenv(LOCAL_ENV, str(tmp_path))
    with pytest.raises(CorpusError, match="lacks the FLORES\\+ columns"):
        load_corpus("flores")
    monkeypatch.setenv(LOCAL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(CorpusError, match="no such folder"):
        load_corpus("flores")


def test_the_demo_pipeline_captures_flores_when_it_is_there(flores, tmp_path):
    from moe_routing.demo_pipeline import _parts_for

    record = tmp_path / "runs" / "m"
    assert _parts_for("flores", demo=False, langs=None, record=record) == ("flores",)
    assert '"fallback": null' in (record / "corpus.json").read_text()


def test_the_fallback_is_recorded_for_the_report(tmp_path, monkeypatch):
    from moe_routing.demo_pipeline import _parts_for, demo_parameters

    monkeypatch.setenv(LOCAL_ENV, str(tmp_path / "missing"))
    runs = tmp_path / "runs"
    assert _parts_for(None, demo=False, langs=None, record=runs / "org_model") == ("heldout", "udhr")
    params = demo_parameters("org/model", runs)
    assert params["CORPUS"] == "demo" and params["PART"] == "heldout"
    assert "no such folder" in params["CORPUS_FALLBACK"]


def test_gated_errors_say_how_to_accept_and_log_in():
    import httpx
    from huggingface_hub.errors import GatedRepoError

    url = "https://huggingface.co/datasets/openlanguagedata/flores_plus/resolve/main/README.md"
    response = httpx.Response(401, request=httpx.Request("GET", url))
    exc = GatedRepoError("Access to dataset openlanguagedata/flores_plus is restricted.", response=response)
    assert is_gated(exc) and not is_gated(ConnectionError("no network"))
    err = gated_error("openlanguagedata/flores_plus", exc)
    assert isinstance(err, GatedDatasetError) and isinstance(err, CorpusError)
    text = str(err)
    assert "https://huggingface.co/datasets/openlanguagedata/flores_plus" in text
    assert "hf auth login" in text and "HF_TOKEN" in text


def test_spec_is_parsed_once_and_flores_names_are_not_prefixes():
    assert Spec.parse("flores") == Spec(kind="flores", text="flores", split="devtest")
    assert Spec.parse("flores:dev").split == "dev"
    assert Spec.parse("flores_sample.jsonl").kind == "path"
    assert Spec.parse("flores200").kind == "path"
    assert Spec.parse("hf:user/data:test") == Spec(kind="hf", text="hf:user/data:test", name="user/data",
                                                    split="test")
    assert Spec.parse(Path("demo")).kind == "path" and Spec.parse("demo").builtin
    assert len(FAMILIES) > 190
