"""identity: one place for model facts; load_tokenizer from a trace, a reader, a RoutingTrace or a model path."""

import json

import pytest

import moe_routing as mr
from conftest import make_qwen3_moe
from moe_routing.errors import UnsupportedModelError
from moe_routing.identity import model_identity, tokenizer_facts

TEXTS = [f"Some text number {i} about foxes." for i in range(6)]


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "model"
    make_qwen3_moe(seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_identity_attaches_nothing_to_the_model(model_dir):
    model, _tok = mr.load_model(str(model_dir))
    before = dict(vars(model.config))
    attrs = set(vars(model))
    ident = model_identity(model)
    assert ident["name"] == str(model_dir) and len(ident["weights_digest"]) == 16
    assert dict(vars(model.config)) == before and set(vars(model)) == attrs


def test_the_manifest_records_the_tokenizer_and_load_tokenizer_finds_it(model_dir, tmp_path):
    model, tok = mr.load_model(str(model_dir))
    out = tmp_path / "trace"
    reader = mr.capture_corpus(model, tok, TEXTS, out, batch_size=2, max_length=32, progress=False)
    recorded = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert recorded == tokenizer_facts(tok) and recorded["name_or_path"] == str(model_dir.resolve())
    ids = tok(TEXTS[0])["input_ids"]
    for source in (out, str(out), reader, reader.read(), str(model_dir)):
        loaded = mr.load_tokenizer(source)
        assert loaded(TEXTS[0])["input_ids"] == ids, type(source)
        assert loaded.decode(ids) == tok.decode(ids)


def test_a_trace_whose_tokenizer_is_gone_names_what_was_tried(model_dir, tmp_path):
    import shutil

    model, tok = mr.load_model(str(model_dir))
    out = tmp_path / "trace"
    mr.capture_corpus(model, tok, TEXTS, out, batch_size=2, max_length=32, progress=False)
    shutil.rmtree(model_dir)
    with pytest.raises(UnsupportedModelError, match="could not load the tokenizer") as err:
        mr.load_tokenizer(out)
    assert str(model_dir.resolve()) in str(err.value)
    with pytest.raises(mr.MoERoutingError, match="load_tokenizer takes"):
        mr.load_tokenizer(42)
