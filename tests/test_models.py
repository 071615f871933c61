"""moe_routing.models: where load_model puts a model, where inputs go, and the errors for devices and memory.

The decision (accelerator present or not) is tested by patching torch's availability probes only; the CPU path
is then run for real on a tiny saved Qwen3-MoE, through load_model, to_input_device and capture.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

import moe_routing as mr
from moe_routing import models
from moe_routing.errors import DeviceUnavailableError, ModelTooLargeError, UsageError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen3_moe, tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "qwen3"
    qwen3_moe.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(("cuda", "mps", "expected"), [
    (True, False, "auto"), (False, True, "auto"), (True, True, "auto"), (False, False, "cpu"),
])
def test_default_device_map_follows_the_hardware(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert models.default_device_map() == expected
    assert models.accelerator() == ("cuda" if cuda else "mps" if mps else None)


def test_load_model_default_on_this_machine_runs_where_the_hardware_is(model_dir, tokenizer):
    model, tok = mr.load_model(model_dir)
    expected = "cpu" if models.default_device_map() == "cpu" else models.accelerator()
    assert models.input_device(model).type == expected
    assert next(model.parameters()).dtype == torch.float32  # dtype="auto": the checkpoint's
    batch = models.to_input_device(model, tok(["The quick brown fox", "Der Fuchs"], return_tensors="pt",
                                              padding=True))
    assert batch["input_ids"].device.type == expected
    with torch.inference_mode(), mr.capture(model) as rec:
        model(**batch)
    assert rec.trace().num_tokens == int(batch["attention_mask"].sum())


def test_auto_on_cpu_equals_the_plain_cpu_model(model_dir, tokenizer):
    plain, tok = mr.load_model(model_dir, device_map="cpu")
    auto, _ = mr.load_model(model_dir, device_map="auto")
    assert not hasattr(plain, "hf_device_map")
    if not torch.cuda.is_available():
        assert {str(v) for v in getattr(auto, "hf_device_map", {"": "cpu"}).values()} == {"cpu"}
    batch = tok(["The quick brown fox jumps", "Le renard"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        with mr.capture(plain) as a:
            plain(**models.to_input_device(plain, batch))
        with mr.capture(auto) as b:
            auto(**models.to_input_device(auto, batch))
    assert a.trace().equals(b.trace())


def test_to_input_device_handles_dicts_and_tensors(qwen3_moe):
    ids = torch.tensor([[2, 3]])
    assert models.to_input_device(qwen3_moe, ids).device == models.input_device(qwen3_moe)
    out = models.to_input_device(qwen3_moe, {"input_ids": ids, "note": "x"})
    assert out["note"] == "x" and out["input_ids"].device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_accelerator_is_a_clear_error_naming_what_is_present(model_dir):
    with pytest.raises(DeviceUnavailableError, match=r"CUDA is not available.*present: cpu") as info:
        mr.load_model(model_dir, device_map="cuda")
    assert isinstance(info.value, UsageError)
    with pytest.raises(DeviceUnavailableError, match="is not a device"):
        models.check_device("gpu")
    models.check_device("cpu")
    models.check_device("auto")


def test_weight_bytes_counts_the_architecture(qwen3_moe):
    numel = sum(p.numel() for p in qwen3_moe.parameters())
    assert models.weight_bytes(qwen3_moe.config, "float32") == 4 * numel
    assert models.weight_bytes(qwen3_moe.config, "bfloat16") == 2 * numel


def test_check_fits_names_needed_and_available_memory(qwen3_moe):
    need = models.weight_bytes(qwen3_moe.config, "float32")
    assert models.check_fits(qwen3_moe.config, "cpu", "float32", available={"cpu": need}) == need
    with pytest.raises(ModelTooLargeError, match=r"needs .* GiB .*has .* GiB .*cuda:0.*device_map='auto'.*offload"):
        models.check_fits(qwen3_moe.config, "cuda:0", "float32", available={"cuda:0": need - 1})
    assert models.check_fits(qwen3_moe.config, "auto", "float32", offload=True, available={"cpu": 1}) == 0


def test_a_model_too_big_for_this_machine_is_refused_before_loading(tmp_path, tokenizer):
    # Qwen3-235B-A22B's shape: ~470 GB of bf16 weights; only config + tokenizer are written (no weights)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                               moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
                               num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                               dtype="bfloat16")
    cfg.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    have = sum(models.available_memory("auto").values())
    if have > 500e9:
        pytest.skip("this machine has room for 470 GB of weights")
    with pytest.raises(ModelTooLargeError, match=r"needs 4\d\d\.\d GiB") as info:
        mr.load_model(tmp_path)
    assert "offload_folder" in str(info.value)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 94
