import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

import moe_routing as mr
from conftest import make_qwen3_moe
from moe_routing.errors import CorpusError, SettingError, TraceError

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

    a, b = make_qwen3_moe(seed=0), make_qwen3_moe(seed=1)  # from_config, same config, other seeds
    run(a, tokenizer, tmp_path / "t")
    with pytest.raises(TraceError, match=r"another model: model weights \(weights_digest\)"):
        run(b, tokenizer, tmp_path / "t")


def test_weights_changed_in_memory_are_another_model(tokenizer, tmp_path):
    from conftest import make_qwen3_moe

    m = make_qwen3_moe(seed=0)
    run(m, tokenizer, tmp_path / "t")
    with torch.no_grad():  # a fine-tuning step / merged LoRA on an expert matrix (not a router)
        m.model.layers[0].mlp.experts.down_proj.add_(0.01)
    with pytest.raises(TraceError, match="weights_digest"):
        run(m, tokenizer, tmp_path / "t")
    with torch.no_grad():
        m.model.layers[2].mlp.gate.weight[3, 5] += 1e-3  # one router element
    with pytest.raises(TraceError, match="weights_digest"):
        run(m, tokenizer, tmp_path / "t", overwrite=False)


def test_same_model_under_another_path_spelling_resumes(tokenizer, tmp_path, monkeypatch, capsys):
    from conftest import make_qwen3_moe

    make_qwen3_moe(seed=0).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    a, tok = mr.load_model("m/")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained("m/")
    assert set(vars(a)) == set(vars(plain))  # load_model attaches nothing to the model object
    assert a.config.to_dict() == plain.config.to_dict()  # and leaves its config as transformers made it
    config_before = a.config.to_dict()
    run(a, tok, tmp_path / "t")
    assert a.config.to_dict() == config_before  # capture_corpus does not rewrite it either
    b, _ = mr.load_model("./m")
    run(b, tok, tmp_path / "t")
    assert "already complete" in capsys.readouterr().err
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["model"]["name"] == "m"


def test_resume_refusal_names_the_setting_that_differs(qwen3_moe, tokenizer, tmp_path):
    import copy

    run(qwen3_moe, tokenizer, tmp_path, max_tokens=120)
    with pytest.raises(TraceError, match="batch_size: 4 in the trace, 2 now") as e:
        run(qwen3_moe, tokenizer, tmp_path, max_tokens=120, batch_size=2)
    assert "max_tokens" not in str(e.value)
    with pytest.raises(TraceError, match="max_tokens: 120 in the trace, 100 now"):
        run(qwen3_moe, tokenizer, tmp_path, max_tokens=100)
    wide = copy.deepcopy(qwen3_moe).to(torch.float64)
    with pytest.raises(TraceError, match="dtype \\(dtype\\): 'float32' in the trace, 'float64' now"):
        run(wide, tokenizer, tmp_path, max_tokens=120)


def test_deleted_shard_is_repaired_exactly(qwen3_moe, tokenizer, tmp_path, capsys):
    from moe_routing.errors import MissingShardError

    full = run(qwen3_moe, tokenizer, tmp_path).read()
    ref = _digest(tmp_path)
    victim = sorted(ref)[2]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()}
    (tmp_path / "shards" / victim).unlink()
    reader = mr.open_trace(tmp_path)
    assert not reader.complete
    with pytest.raises(MissingShardError, match=victim):
        reader.read()
    capsys.readouterr()
    repaired = run(qwen3_moe, tokenizer, tmp_path)
    assert "rewriting exactly those" in capsys.readouterr().err
    assert repaired.complete and _digest(tmp_path) == ref
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()}
    assert [n for n in now if now[n] != mtimes[n]] == [victim]  # only the missing shard was written
    assert repaired.read().equals(full)
    ranks = json.loads((tmp_path / "manifest.json").read_text())["ranks"]
    assert ranks[0]["shards_written"] == 1 and ranks[0]["shards_skipped"] == len(ref) - 1


def test_shard_from_another_model_is_refused_on_read_and_on_rerun(tokenizer, tmp_path):
    from conftest import make_qwen3_moe
    from moe_routing.errors import ForeignShardError

    a, b = make_qwen3_moe(seed=0), make_qwen3_moe(seed=1)
    run(a, tokenizer, tmp_path / "a")
    run(b, tokenizer, tmp_path / "b")  # same corpus and settings: the same input hashes
    name = "part-000001.parquet"
    (tmp_path / "a" / "shards" / name).write_bytes((tmp_path / "b" / "shards" / name).read_bytes())
    with pytest.raises(ForeignShardError, match=name):
        mr.open_trace(tmp_path / "a").read()
    with pytest.raises(ForeignShardError, match=name):  # not "already complete"
        run(a, tokenizer, tmp_path / "a")
    (tmp_path / "a" / "shards" / name).unlink()
    assert run(a, tokenizer, tmp_path / "a").read().num_tokens == mr.open_trace(tmp_path / "b").num_tokens


def test_manifest_top_k_follows_what_the_router_gave(tokenizer, tmp_path):
    from conftest import make_qwen3_moe

    m = make_qwen3_moe(top_k=2)
    m.config.num_experts_per_tok = 1  # the config understates k; the routers keep routing to 2 experts
    reader = run(m, tokenizer, tmp_path, max_tokens=80)
    assert reader.top_k == 2
    t = reader.read()
    assert t.top_k == 2 and (t.expert_ids >= 0).all()


def test_missing_label_values_are_refused_before_any_work(qwen3_moe, tokenizer, tmp_path):
    df = pd.DataFrame({"text": TEXTS[:4], "lang": ["en", "de", None, "fr"]})
    with pytest.raises(CorpusError, match=r"text 2 has no value for label\(s\) \['lang'\]"):
        run(qwen3_moe, tokenizer, tmp_path, df)
    assert not list((tmp_path / "shards").glob("part-*"))


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"max_tokens": 0}, {"max_length": -5},
                                {"batches_per_shard": 0}, {"batch_size": 2.5}])
def test_bad_settings_are_project_errors(qwen3_moe, tokenizer, tmp_path, kw):
    from moe_routing.errors import SettingError

    with pytest.raises(SettingError, match=next(iter(kw))):
        run(qwen3_moe, tokenizer, tmp_path, **kw)


# ---------------------------------------------------------------------------------------------- issue 15 / 17 / 13
def test_trace_status_is_the_one_decision(qwen3_moe, tokenizer, tmp_path):
    from moe_routing.pipeline import trace_status

    out = tmp_path / "t"
    assert trace_status(out, qwen3_moe) == "absent"
    run(qwen3_moe, tokenizer, out, TEXTS[:10])
    status = trace_status(out, qwen3_moe, {"batch_size": 4})
    assert status == "complete" and status.reasons == ()
    assert trace_status(out, qwen3_moe, {"batch_size": 8}) == "stale"
    assert "batch_size" in trace_status(out, qwen3_moe, {"batch_size": 8}).reasons[0]
    other = make_qwen3_moe(seed=5)
    assert trace_status(out, other) == "stale"
    victim = sorted((out / "shards").glob("part-*.parquet"))[0]
    victim.unlink()
    partial = trace_status(out, qwen3_moe)
    assert partial == "partial" and victim.name in partial.reasons[0]
    run(qwen3_moe, tokenizer, out, TEXTS[:10])
    assert trace_status(out, qwen3_moe) == "complete"


def test_trace_status_of_a_model_directory_without_loading_it(tokenizer, tmp_path):
    from moe_routing.pipeline import trace_status

    path = tmp_path / "model"
    make_qwen3_moe(seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model, tok = mr.load_model(str(path))
    out = tmp_path / "t"
    run(model, tok, out, TEXTS[:6])
    assert trace_status(out, str(path), {"batch_size": 4}) == "complete"
    make_qwen3_moe(seed=1).save_pretrained(path)  # new weight files
    stale = trace_status(out, str(path))
    assert stale == "stale" and "weight files" in stale.reasons[0]
    # capture_corpus agrees: the loaded model of the new files is another model; if_stale decides
    model2, tok2 = mr.load_model(str(path))
    with pytest.raises(TraceError, match="model weights"):
        run(model2, tok2, out, TEXTS[:6])
    run(model2, tok2, out, TEXTS[:6], if_stale="overwrite")
    assert trace_status(out, model2) == "complete"


def test_lm_head_runs_on_one_position_only(tokenizer, tmp_path):
    model = make_qwen3_moe()
    widths = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        run(model, tokenizer, tmp_path, TEXTS[:8])
    finally:
        handle.remove()
    assert widths and set(widths) == {1}  # the routing of every position, the LM head of none but the last


def test_writer_error_surfaces_and_the_trace_is_never_complete(qwen3_moe, tokenizer, tmp_path):
    import os

    out = tmp_path / "t"
    (out / "shards").mkdir(parents=True)
    blocker = out / "shards" / f".part-000001.parquet.tmp-{os.getpid()}"
    blocker.mkdir()  # the writer thread cannot create its temporary file for shard 1
    with pytest.raises(TraceError, match="could not write"):
        run(qwen3_moe, tokenizer, out, TEXTS[:12])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert not mr.open_trace(out).complete
    blocker.rmdir()
    reader = run(qwen3_moe, tokenizer, out, TEXTS[:12])
    assert reader.complete and reader.read().num_tokens == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS[:12])


def test_shards_are_sized_by_bytes_from_the_real_shape(qwen3_moe, tokenizer, tmp_path):
    from moe_routing.store import TraceLayout

    reader = run(qwen3_moe, tokenizer, tmp_path, batches_per_shard=None, shard_bytes=6_000)
    layout = TraceLayout(layers=reader.layers, num_experts=reader.num_experts, top_k=reader.top_k,
                         labels=tuple(reader.label_names), weights_dtype=reader.manifest["weights_dtype"])
    target = 6_000 // layout.bytes_per_token()
    sizes = [r["tokens"] for _, r in sorted(reader.records.items())]
    assert len(sizes) > 2
    assert all(s >= target for s in sizes[:-1])  # a shard closes at the first batch that reaches the target
    assert all(s < target + 4 * 32 for s in sizes)  # ... and is at most one batch over
    assert reader.manifest["settings"]["shard_bytes"] == 6_000


def test_bf16_weights_are_stored_in_16_bits_losslessly(tokenizer, tmp_path):
    import pyarrow.parquet as pq

    model = make_qwen3_moe().to(torch.bfloat16)
    auto = run(model, tokenizer, tmp_path / "auto", TEXTS[:10])
    wide = run(model, tokenizer, tmp_path / "wide", TEXTS[:10], weights_dtype="float32")
    assert auto.manifest["weights_dtype"] == "float16" and wide.manifest["weights_dtype"] == "float32"
    kinds = {str(pq.read_schema(p).field("weights").type.value_type.value_type) for p in auto.shards()}
    assert kinds == {"halffloat"}, kinds
    a, w = auto.read(), wide.read()
    assert np.array_equal(a.weights, w.weights) and np.array_equal(a.expert_ids, w.expert_ids)  # lossless
    assert auto.manifest["weights_stored"] == {"float16": len(auto.shards())}
    def raw_weight_bytes(reader):  # uncompressed size of the weights column, all shards
        total = 0
        for p in reader.shards():
            md = pq.ParquetFile(p).metadata
            for g in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(g).column(c)
                    total += col.total_uncompressed_size if col.path_in_schema.startswith("weights") else 0
        return total

    assert raw_weight_bytes(auto) < 0.6 * raw_weight_bytes(wide)


def test_float32_model_keeps_float32_unless_float16_is_asked(qwen3_moe, tokenizer, tmp_path):
    exact = run(qwen3_moe, tokenizer, tmp_path / "a", TEXTS[:6])
    half = run(qwen3_moe, tokenizer, tmp_path / "b", TEXTS[:6], weights_dtype="float16")
    assert exact.manifest["weights_dtype"] == "float32" and half.manifest["weights_dtype"] == "float16"
    a, h = exact.read(), half.read()
    assert np.array_equal(h.weights, a.weights.astype(np.float16).astype(np.float32))
    with pytest.raises(SettingError, match="weights_dtype"):
        run(qwen3_moe, tokenizer, tmp_path / "c", TEXTS[:6], weights_dtype="int8")


def test_documents_are_read_through_the_index(qwen3_moe, tokenizer, tmp_path):
    reader = run(qwen3_moe, tokenizer, tmp_path, TEXTS[:20])
    full = reader.read()
    index = reader.document_index()
    assert index is not None and index.num_rows == len(np.unique(full.doc_ids))
    want = [0, 5, int(full.doc_ids.max())]
    got = reader.read_documents(want)
    ref = full.select(np.isin(full.doc_ids, want))
    assert got.equals(ref)
    with pytest.raises(TraceError, match="no document"):
        reader.read_documents([10_000])
