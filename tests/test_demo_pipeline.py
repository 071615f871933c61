"""demo_runs caches each trace under everything that shapes it (a real tiny model saved to disk, the demo corpus)."""

import json

import numpy as np
import pytest

import moe_routing as mr
from conftest import make_qwen3_moe
from moe_routing.demo_pipeline import demo_runs


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "model"
    make_qwen3_moe(seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_options_are_part_of_the_cache_key(model_dir, tmp_path):
    runs = tmp_path / "runs"
    common = {"parts": ("heldout",), "max_per_lang": 40, "batch_size": 8, "progress": False}
    small = demo_runs(str(model_dir), runs, langs=["de", "fr"], max_tokens=300, **common)["model/heldout"]
    plain = demo_runs(str(model_dir), runs, **common)["model/heldout"]
    assert small != plain
    a, b = mr.RoutingTrace.load(small), mr.RoutingTrace.load(plain)
    assert a.num_tokens == 300 and set(a.labels["lang"]) <= {"de", "fr"}
    assert b.num_tokens > 300 and len(set(b.labels["lang"])) > 2  # not the 300-token German/French trace
    # asking again with the first options returns the first trace, untouched
    before = {p.name: p.stat().st_mtime_ns for p in (small / "shards").iterdir()}
    again = demo_runs(str(model_dir), runs, langs=["de", "fr"], max_tokens=300, **common)["model/heldout"]
    assert again == small and before == {p.name: p.stat().st_mtime_ns for p in (small / "shards").iterdir()}


def test_defaults_keep_the_plain_directory_name_and_keys_differ_per_option():
    from moe_routing.demo_pipeline import run_key

    assert run_key() == "" and run_key(batch_size=32, dtype="auto") == ""
    keys = {run_key(langs=["de"]), run_key(max_tokens=300), run_key(max_per_lang=3), run_key(batch_size=8),
            run_key(dtype="float32"), run_key(langs=["de", "fr"]), run_key(langs=["fr", "de"])}
    assert len(keys) == 7 and "" not in keys


def test_retrained_weights_are_captured_again(model_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    kw = {"parts": ("heldout",), "max_per_lang": 5, "max_tokens": 200, "progress": False}
    first = demo_runs(str(model_dir), runs, **kw)["model/heldout"]
    ids = mr.RoutingTrace.load(first).expert_ids
    make_qwen3_moe(seed=1).save_pretrained(model_dir)  # "retrained" in place
    capsys.readouterr()
    again = demo_runs(str(model_dir), runs, **kw)["model/heldout"]
    assert "other weights" in capsys.readouterr().err
    assert again == first and not np.array_equal(mr.RoutingTrace.load(again).expert_ids, ids)
    assert json.loads((again / "manifest.json").read_text())["complete"]


def test_open_runs_opens_every_variant_and_part(model_dir, tmp_path):
    from moe_routing.pipeline import trace_status

    runs_dir = tmp_path / "runs"
    kw = {"max_per_lang": 5, "max_tokens": 200, "progress": False}
    runs = mr.open_runs(str(model_dir), runs_dir, ("heldout",), **kw)
    assert runs.variants == ["model"] and runs.parts == ["heldout"]
    reader = runs["model"]["heldout"]
    assert isinstance(reader, mr.TraceReader) and reader.complete and reader.num_tokens == 200
    assert runs.main["heldout"].path == runs.paths["model"]["heldout"]
    assert trace_status(reader.path, str(model_dir), {"max_tokens": 200}) == "complete"
    with pytest.raises(mr.CorpusError, match="no variant"):
        runs["trained"]
