"""Serving-engine imports, tested on files made by generators that follow the engines' documented layouts."""

import base64

import numpy as np
import pytest
import torch

import moe_routing as mr
from moe_routing.errors import TraceError
from moe_routing.imports import from_sglang_dump, from_sglang_routed_experts, from_vllm_routed_experts


@pytest.fixture(scope="module")
def captured(qwen3_moe, tokenizer):
    texts = ["The quick brown fox.", "Der schnelle braune Fuchs springt heute.", "Le renard."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode(), mr.capture(qwen3_moe) as rec:
        qwen3_moe(**batch)
    return rec.trace()


def vllm_outputs(trace):
    """vLLM: one int16 [tokens, moe_layers, top_k] array per request."""
    return [trace.expert_ids[trace.doc_ids == d].astype(np.int16) for d in np.unique(trace.doc_ids)]


def sglang_responses(trace):
    """SGLang: meta_info.routed_experts = base64(int32 [tokens, layers, k] flattened)."""
    return [{"text": "", "meta_info": {"routed_experts": base64.b64encode(a.astype(np.int32).tobytes()).decode()}}
            for a in vllm_outputs(trace)]


def sglang_dump(trace, path):
    """SGLang per_token recorder dump: records of one forward pass each, topk_ids [layers, tokens, k]."""
    records = []
    for p, d in enumerate(np.unique(trace.doc_ids)):
        sel = trace.doc_ids == d
        records.append({"forward_pass_id": p, "rank": 0,
                        "input_ids": torch.from_numpy(trace.token_ids[sel].astype(np.int64)),
                        "positions": torch.from_numpy(trace.positions[sel].astype(np.int64)),
                        "topk_ids": torch.from_numpy(trace.expert_ids[sel].transpose(1, 0, 2).astype(np.int32))})
    torch.save({"records": records}, path)


def test_vllm_import_equals_capture(captured, tmp_path):
    t = from_vllm_routed_experts(vllm_outputs(captured), num_experts=8, layers=captured.layers,
                                 labels={"prompt": ["en", "de", "fr"]})
    assert np.array_equal(t.expert_ids, captured.expert_ids) and t.layers == captured.layers
    assert not t.has_weights and set(t.labels["prompt"]) == {"en", "de", "fr"}
    assert np.array_equal(mr.metrics.expert_load(t)["count"], mr.metrics.expert_load(captured)["count"])
    np.savez(tmp_path / "r.npz", *vllm_outputs(captured))
    assert np.array_equal(from_vllm_routed_experts(tmp_path / "r.npz", num_experts=8).expert_ids, t.expert_ids)


def test_sglang_imports_equal_capture(captured, tmp_path):
    t = from_sglang_routed_experts(sglang_responses(captured), num_moe_layers=2, top_k=2, num_experts=8)
    assert np.array_equal(t.expert_ids, captured.expert_ids)
    sglang_dump(captured, tmp_path / "dump.pt")
    d = from_sglang_dump(tmp_path / "dump.pt", num_experts=8, layers=captured.layers)
    assert np.array_equal(d.expert_ids, captured.expert_ids)
    assert np.array_equal(d.doc_ids, captured.doc_ids) and np.array_equal(d.token_ids, captured.token_ids)


def test_import_errors_are_clear(captured, tmp_path):
    with pytest.raises(TraceError, match="outside"):
        from_vllm_routed_experts(vllm_outputs(captured), num_experts=4)
    with pytest.raises(TraceError, match="enable-return-routed-experts"):
        from_sglang_routed_experts([{"meta_info": {}}], num_moe_layers=2, top_k=2, num_experts=8)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(TraceError, match="not a readable SGLang dump"):
        from_sglang_dump(tmp_path / "bad.pt", num_experts=8)



def test_weight_metrics_refuse_ids_only_imports(captured):
    t = from_vllm_routed_experts(vllm_outputs(captured), num_experts=8)
    with pytest.raises(mr.MetricError, match="weights"):
        mr.metrics.expert_load(t, weighted=True)
    assert mr.metrics.expert_load(t)["count"].sum() == t.expert_ids.size  # counts need no weights
