import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

import moe_routing as mr
from moe_routing.errors import CorpusError, TraceError

TEXTS = [f"The quick brown fox {i} jumps. " * (1 + i % 7) for i in range(30)]


def run(model, tok, out, texts=TEXTS, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("batches_per_shard", 2)
    kw.setdefault("max_length", 32)
    kw.setdefault("progress", False)
    return mr.capture_corpus(model, tok, texts, out, **kw)


def test_corpus_trace_matches_in_memory_capture(qwen3_moe, tokenizer, tmp_path):
    texts = TEXTS[:8]
    reader = run(qwen3_moe, tokenizer, tmp_path, texts, max_length=256)
    disk = reader.read()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode(), mr.capture(qwen3_moe) as rec:
        for s in range(0, 8, 4):
            qwen3_moe(input_ids=batch["input_ids"][s : s + 4], attention_mask=batch["attention_mask"][s : s + 4])
    mem = rec.trace()
    assert np.array_equal(disk.expert_ids, mem.expert_ids)
    assert np.allclose(disk.weights, mem.weights, atol=1e-5)  # padding width differs, numerics may too
    assert np.array_equal(disk.token_ids, mem.token_ids)
    assert disk.num_tokens == int(batch["attention_mask"].sum())
    assert disk.labels["text_index"].tolist() == mem.doc_ids.tolist()


def test_long_texts_are_chunked_never_truncated(qwen3_moe, tokenizer, tmp_path, capsys):
    reader = run(qwen3_moe, tokenizer, tmp_path)
    t = reader.read()
    n_expected = sum(len(tokenizer(x)["input_ids"]) for x in TEXTS)
    assert t.num_tokens == n_expected
    assert t.labels["chunk"].max() >= 1
    assert "split into chunks" in capsys.readouterr().err
    assert t.positions.max() < 32


def test_labels_from_dataframe_and_missing_column(qwen3_moe, tokenizer, tmp_path):
    df = pd.DataFrame({"text": TEXTS[:6], "lang": ["en", "de"] * 3})
    t = run(qwen3_moe, tokenizer, tmp_path / "a", df).read()
    first = t.labels["text_index"] == 1
    assert set(t.labels["lang"][first]) == {"de"}
    with pytest.raises(CorpusError, match="label columns \\['domain'\\]"):
        run(qwen3_moe, tokenizer, tmp_path / "b", df, labels=["domain"])
    with pytest.raises(CorpusError, match="no 'body' column"):
        run(qwen3_moe, tokenizer, tmp_path / "c", df, text_column="body")


def test_max_tokens_is_exact(qwen3_moe, tokenizer, tmp_path):
    assert run(qwen3_moe, tokenizer, tmp_path, max_tokens=101).num_tokens == 101


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((path / "shards").iterdir())}


def test_resume_after_lost_shards_and_determinism(qwen3_moe, tokenizer, tmp_path):
    full = run(qwen3_moe, tokenizer, tmp_path / "full")
    ref = _digest(tmp_path / "full")
    assert len(ref) > 2
    # a second, interrupted run: only some shards exist and the manifest says incomplete
    part = tmp_path / "part"
    run(qwen3_moe, tokenizer, part)
    for name in list(ref)[1::2]:
        (part / "shards" / name).unlink()
    m = json.loads((part / "manifest.json").read_text())
    m["complete"] = False
    (part / "manifest.json").write_text(json.dumps(m))
    resumed = run(qwen3_moe, tokenizer, part)
    assert _digest(part) == ref  # byte-identical shards: nothing missing, nothing duplicated
    assert resumed.read().equals(full.read())
    assert json.loads((part / "manifest.json").read_text())["ranks"][0]["shards_skipped"] == len(ref) - len(
        list(ref)[1::2]
    )


def test_complete_trace_is_not_redone_and_other_settings_refused(qwen3_moe, tokenizer, tmp_path, capsys):
    run(qwen3_moe, tokenizer, tmp_path)
    mtime = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()}
    run(qwen3_moe, tokenizer, tmp_path)
    assert "already complete" in capsys.readouterr().err
    assert mtime == {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()}
    with pytest.raises(TraceError, match="other settings"):
        run(qwen3_moe, tokenizer, tmp_path, batch_size=2)
    assert run(qwen3_moe, tokenizer, tmp_path, batch_size=2, overwrite=True).complete


def test_changed_corpus_is_detected_on_resume(qwen3_moe, tokenizer, tmp_path):
    run(qwen3_moe, tokenizer, tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceError, match="different input"):
        run(qwen3_moe, tokenizer, tmp_path, [t.upper() for t in TEXTS])


def test_empty_corpus(qwen3_moe, tokenizer, tmp_path):
    with pytest.raises(CorpusError, match="no tokens"), pytest.warns(UserWarning, match="2 empty texts"):
        run(qwen3_moe, tokenizer, tmp_path, ["", "  "])


def test_other_weights_are_not_mistaken_for_the_same_trace(tokenizer, tmp_path):
    from conftest import make_qwen3_moe
    from moe_routing.models import weights_id

    a, b = make_qwen3_moe(seed=0), make_qwen3_moe(seed=1)  # same config, other weights
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    a.moe_routing_weights_id, b.moe_routing_weights_id = weights_id(tmp_path / "a"), weights_id(tmp_path / "b")
    assert a.moe_routing_weights_id != b.moe_routing_weights_id
    run(a, tokenizer, tmp_path / "t")
    with pytest.raises(TraceError, match="another model"):
        run(b, tokenizer, tmp_path / "t")
