"""Capture overhead: captured vs plain forward (and vs output_router_logits=True), prefill and decode.

Runs are interleaved (plain, captured, logits, plain, ...) on one thread and the median of per-round ratios is
printed, because these machines are noisy. Also prints trace bytes per token-layer vs fp32 router logits.

    python benchmarks/capture_overhead.py [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_routing as mr


def build(layers: int, hidden: int, experts: int, top_k: int):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=2048,
    )
    cfg._experts_implementation = "grouped_mm"
    return AutoModelForCausalLM.from_config(cfg).eval()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(variants: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    return {k: statistics.median(a / b for a, b in zip(v, times[base], strict=True)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.hidden, args.experts, args.top_k)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : args.seq // 4] = 0  # some left padding, as in real batches

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    def captured():
        with torch.inference_mode(), mr.capture(model) as rec:
            model(input_ids=ids, attention_mask=mask)
        rec.trace()

    def with_logits_output():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, output_router_logits=True)

    def captured_logits():
        with torch.inference_mode(), mr.capture(model, logits=True) as rec:
            model(input_ids=ids, attention_mask=mask)
        rec.trace()

    print(f"model: qwen3_moe {args.layers} layers, hidden {args.hidden}, {args.experts} experts, top-{args.top_k}; "
          f"threads={args.threads}, rounds={args.rounds}")
    t = interleave({"plain": plain, "capture": captured, "output_router_logits": with_logits_output,
                    "capture_logits": captured_logits}, args.rounds)
    r = ratios(t, "plain")
    print(f"prefill [{args.batch} x {args.seq}]: plain {statistics.median(t['plain']) * 1e3:.1f} ms")
    print(f"  capture / plain                      {r['capture']:.3f}x")
    print(f"  capture / output_router_logits       {r['capture'] / r['output_router_logits']:.3f}x")
    print(f"  output_router_logits / plain         {r['output_router_logits']:.3f}x")
    print(f"  capture(logits=True) / plain         {r['capture_logits']:.3f}x")

    short = ids[:, :64]
    short_mask = torch.ones_like(short)
    gen_kw = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False, "pad_token_id": 0}

    def gen_plain():
        with torch.inference_mode():
            model.generate(short, attention_mask=short_mask, **gen_kw)

    def gen_captured():
        with torch.inference_mode(), mr.capture(model) as rec:
            model.generate(short, attention_mask=short_mask, **gen_kw)
        rec.trace()

    t = interleave({"plain": gen_plain, "capture": gen_captured}, max(5, args.rounds // 2))
    r = ratios(t, "plain")
    print(f"decode (generate {args.batch} x 64 prompt + 32 new tokens): plain "
          f"{statistics.median(t['plain']) * 1e3:.1f} ms; capture / plain {r['capture']:.3f}x")

    with torch.inference_mode(), mr.capture(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    trace = rec.trace()
    with tempfile.TemporaryDirectory() as d:
        trace.save(d)
        disk = sum(p.stat().st_size for p in Path(d, "shards").iterdir())
    token_layers = trace.num_tokens * trace.num_layers
    fp32_logits = 4 * args.experts
    print(f"trace size: {disk / token_layers:.2f} bytes per token-layer on disk (Parquet, zstd); in memory "
          f"{(trace.expert_ids.nbytes + trace.weights.nbytes) / token_layers:.1f}; fp32 router logits "
          f"{fp32_logits} -> {fp32_logits / (disk / token_layers):.1f}x smaller on disk")


if __name__ == "__main__":
    main()
