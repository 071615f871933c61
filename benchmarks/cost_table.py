"""The README's cost table, computed from each model's config shape (public config.json values, no download).

    python benchmarks/cost_table.py [--gpu-results gpu_check.log]

Per model: parameters and GPU memory for the weights in bf16 (counted on a meta-device copy of the real
transformers architecture), MoE layers and top-k (from moe_routing's adapter table on that copy), the trace
bytes per million tokens as the arrays hold them (expert ids int16 + weights float32 per token, MoE layer and
slot; router logits add float16 per expert), and, given the RESULT lines of benchmarks/gpu_check.sh, the
expected capture time per million tokens: measured for the Qwen3-30B-A3B shape, scaled by active (per-token)
parameters for the others (an estimate: attention and memory bandwidth do not scale alike).
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from moe_routing.adapters import find_moe_layers, resolve_adapter

SHAPES: dict[str, tuple[str, dict]] = {
    "Qwen3-30B-A3B": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8)),
    "Qwen3-235B-A22B": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8)),
    "DeepSeek-V3": ("deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)),
    "Mixtral-8x7B": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)),
    "OLMoE-1B-7B": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)),
    "GPT-OSS-20B": ("gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4)),
    "GPT-OSS-120B": ("gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4)),
}  # fmt: skip
MEASURED = "Qwen3-30B-A3B"  # the shape benchmarks/gpu_check.py runs


def facts(model_type: str, shape: dict) -> dict:
    """Parameters (total, active per token), MoE layers, experts and top-k of one config shape."""
    cfg = AutoConfig.for_model(model_type, **shape)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    total = sum(p.numel() for p in meta.parameters())
    layers = find_moe_layers(meta, resolve_adapter(meta))
    experts = max(layer.num_experts for layer in layers)
    k = int(shape["num_experts_per_tok"])
    expert_params = 0
    for layer in layers:
        expert_params += sum(p.numel() for p in layer.module.parameters())  # the routed experts module
    active = total - expert_params + expert_params * k // experts
    return {"params": total, "active": active, "moe_layers": len(layers), "experts": experts, "k": k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-results", default=None, help="output of benchmarks/gpu_check.sh (its RESULT lines)")
    args = ap.parse_args()
    tok_s = None
    if args.gpu_results:
        with open(args.gpu_results, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        for line in lines:
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                if r["check"] == "capture_corpus":
                    tok_s = r["tokens_per_s"]
    rows = {name: facts(*spec) for name, spec in SHAPES.items()}
    print("| model | parameters (active) | bf16 weights | MoE layers x experts, top-k | trace per 1M tokens "
          "(ids + weights) | + router logits | capture time per 1M tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, f in rows.items():
        cells = f["moe_layers"] * f["k"]
        trace = 1e6 * cells * (2 + 4)
        logits = 1e6 * f["moe_layers"] * f["experts"] * 2
        if tok_s is None:
            time_cell = "run gpu_check.sh"
        else:
            est = 1e6 / tok_s * f["active"] / rows[MEASURED]["active"]
            time_cell = f"{est / 60:.1f} min" + ("" if name == MEASURED else " (scaled)")
        print(f"| {name} | {f['params'] / 1e9:.1f}B ({f['active'] / 1e9:.1f}B) | {2 * f['params'] / 2**30:.0f} GiB | "
              f"{f['moe_layers']} x {f['experts']}, top-{f['k']} | {trace / 1e9:.2f} GB | "
              f"+{logits / 1e9:.2f} GB | {time_cell} |")


if __name__ == "__main__":
    main()
