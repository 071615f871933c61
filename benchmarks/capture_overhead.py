"""Capture overhead: captured vs plain forward (and vs output_router_logits=True), prefill and decode.

Runs are interleaved (plain, captured, logits, plain, ...) and the median of per-round ratios is printed, because
these machines are noisy (``_timing.py``). Also prints what entering and leaving ``capture()`` costs and the trace
bytes per token-layer vs fp32 router logits. Targets (issue 17): decode <= 1.02x, prefill <= 1.01x, enter+exit
under 0.5 ms.

    python benchmarks/capture_overhead.py [--rounds 15] [--threads 1]             # tiny qwen3_moe on CPU
    python benchmarks/capture_overhead.py --shape qwen3-30b-a3b --device cuda --dtype bfloat16 \\
        --batch 32 --tokens 2048                                                 # the GPU check

``--shape qwen3-30b-a3b`` builds a Qwen3-30B-A3B-shaped model with random weights (48 layers, 128 experts,
top-8, the real vocabulary; ``--hidden`` sets the width, 2048 is the real one): no download.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_routing as mr
from _timing import interleave, median_ms, ratios, timed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shape_config(shape: str, *, layers: int, hidden: int | None, experts: int, top_k: int,
                 vocab: int | None) -> dict[str, Any]:
    """qwen3_moe config values: the tiny CPU model, or Qwen3-30B-A3B's routing shape at width ``hidden``."""
    if shape == "tiny":
        h = hidden or 256
        return dict(vocab_size=vocab or 4096, hidden_size=h, intermediate_size=2 * h, moe_intermediate_size=h // 2,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=h // 4,
                    num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=4096)
    h = hidden or 2048
    head_dim = 128 if h >= 2048 else 32
    heads = max(4, 2 * h // head_dim)  # 32 heads of 128 at the real width
    return dict(vocab_size=vocab or 151936, hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=3 * h // 8,
                num_hidden_layers=48, num_attention_heads=heads, num_key_value_heads=max(1, heads // 8),
                head_dim=head_dim, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                max_position_embeddings=40960)


def build(layers: int, hidden: int, experts: int, top_k: int, *, shape: str = "tiny", device: str = "cpu",
          dtype: torch.dtype = torch.float32, vocab: int | None = None) -> Any:
    """A qwen3_moe ``...ForCausalLM`` with random weights (seed 0), in eval mode, on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", **shape_config(shape, layers=layers, hidden=hidden, experts=experts,
                                                           top_k=top_k, vocab=vocab))
    cfg._experts_implementation = "grouped_mm"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["tiny", "qwen3-30b-a3b"], default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--layers", type=int, default=4, help="tiny shape only")
    ap.add_argument("--hidden", type=int, default=None, help="width (default: 256 tiny, 2048 qwen3-30b-a3b)")
    ap.add_argument("--experts", type=int, default=16, help="tiny shape only")
    ap.add_argument("--top-k", type=int, default=4, help="tiny shape only")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: 4096 tiny, 151936 qwen3)")
    ap.add_argument("--batch", type=int, default=4, help="rows per forward (prefill and decode)")
    ap.add_argument("--tokens", "--seq", dest="tokens", type=int, default=512, help="prefill tokens per row")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="decode: prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode: generated tokens per row")
    ap.add_argument("--logits-to-keep", type=int, default=None,
                    help="prefill LM-head positions (0: all; default 0 tiny, 1 qwen3-30b-a3b)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["prefill", "decode", "enter", "bytes", "logits"],
                    help="parts to leave out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    keep = args.logits_to_keep if args.logits_to_keep is not None else (0 if args.shape == "tiny" else 1)
    t0 = time.perf_counter()
    model = build(args.layers, args.hidden, args.experts, args.top_k, shape=args.shape, device=args.device,
                  dtype=DTYPES[args.dtype], vocab=args.vocab)
    cfg = model.config
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(f"{datetime.date.today()} on {where} ({dev}, {args.dtype}, threads={args.threads}); model: qwen3_moe "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts, "
          f"top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters, built in {time.perf_counter() - t0:.0f} s); rounds={args.rounds}", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=g).to(dev)
    mask = torch.ones_like(ids)
    if args.batch > 1:
        mask[1, : args.tokens // 4] = 0  # some left padding, as in real batches
    fwd = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": keep}

    if "prefill" not in args.skip:
        def plain() -> None:
            with torch.inference_mode():
                model(**fwd)

        def captured() -> None:
            with torch.inference_mode(), mr.capture(model) as rec:
                model(**fwd)
            rec.trace()

        def with_logits_output() -> None:
            with torch.inference_mode():
                model(**fwd, output_router_logits=True)

        def captured_logits() -> None:
            with torch.inference_mode(), mr.capture(model, logits=True) as rec:
                model(**fwd)
            rec.trace()

        variants = {"plain": plain, "capture": captured}
        if "logits" not in args.skip:
            variants |= {"output_router_logits": with_logits_output, "capture_logits": captured_logits}
        t = interleave(variants, args.rounds)
        r = ratios(t, "plain")
        print(f"prefill [{args.batch} x {args.tokens}], logits_to_keep={keep}: plain {median_ms(t['plain']):.1f} ms")
        print(f"  capture / plain                      {r['capture']:.3f}x")
        if "logits" not in args.skip:
            print(f"  capture / output_router_logits       {r['capture'] / r['output_router_logits']:.3f}x")
            print(f"  output_router_logits / plain         {r['output_router_logits']:.3f}x")
            print(f"  capture(logits=True) / plain         {r['capture_logits']:.3f}x", flush=True)

    if "decode" not in args.skip:
        short = ids[:, : args.prompt_tokens]
        short_mask = torch.ones_like(short)
        gen_kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                  "pad_token_id": 0}

        def gen_plain() -> None:
            with torch.inference_mode():
                model.generate(short, attention_mask=short_mask, **gen_kw)

        def gen_captured() -> None:
            with torch.inference_mode(), mr.capture(model) as rec:
                model.generate(short, attention_mask=short_mask, **gen_kw)
            rec.trace()

        t = interleave({"plain": gen_plain, "capture": gen_captured}, max(5, args.rounds // 2))
        r = ratios(t, "plain")
        print(f"decode (generate {args.batch} x {short.shape[1]} prompt + {args.new_tokens} new tokens): plain "
              f"{median_ms(t['plain']):.1f} ms ({median_ms(t['plain']) / args.new_tokens:.2f} ms/step); "
              f"capture / plain {r['capture']:.3f}x", flush=True)

    if "enter" not in args.skip:
        def enter_exit() -> None:
            with mr.capture(model):
                pass

        enter_exit()
        times = [timed(enter_exit) for _ in range(max(50, args.rounds))]
        print(f"capture() enter+exit: {median_ms(times):.3f} ms (median of {len(times)})", flush=True)

    if "bytes" not in args.skip:
        with torch.inference_mode(), mr.capture(model) as rec:
            model(**fwd)
        trace = rec.trace()
        with tempfile.TemporaryDirectory() as d:
            trace.save(d)
            disk = sum(p.stat().st_size for p in Path(d, "shards").iterdir())
        token_layers = trace.num_tokens * trace.num_layers
        fp32_logits = 4 * cfg.num_experts
        print(f"trace size: {disk / token_layers:.2f} bytes per token-layer on disk (Parquet, zstd); in memory "
              f"{(trace.expert_ids.nbytes + trace.weights.nbytes) / token_layers:.1f}; fp32 router logits "
              f"{fp32_logits} -> {fp32_logits / (disk / token_layers):.1f}x smaller on disk")


if __name__ == "__main__":
    main()
