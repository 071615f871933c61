"""Models spread by accelerate (device_map): hooks see the same decisions when layers live elsewhere.

On CPU we cannot place layers on two GPUs, so layers are offloaded to disk and to the CPU through accelerate's
real AlignDevicesHook machinery (the path a multi-GPU device_map="auto" model takes); capture must equal the
same model held in memory, and outputs must not change.
"""

import torch
from transformers import AutoModelForCausalLM

import moe_routing as mr


def test_capture_through_accelerate_offload_equals_in_memory(qwen3_moe, tokenizer, tmp_path):
    qwen3_moe.save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    spread = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                  offload_folder=tmp_path / "offload").eval()
    assert hasattr(spread.model.layers[2], "_hf_hook")  # accelerate really manages this layer
    batch = tokenizer(["The quick brown fox jumps", "Der Fuchs"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        with mr.capture(qwen3_moe) as ref:
            a = qwen3_moe(**batch).logits
        plain = spread(**batch).logits
        with mr.capture(spread) as rec:
            b = spread(**batch).logits
    assert torch.equal(plain, b)
    assert torch.allclose(a, b, atol=1e-6)
    assert rec.trace().equals(ref.trace())
