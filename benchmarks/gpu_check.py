"""GPU check, the parts capture_overhead.py does not measure: capture_corpus tokens/s, routing_stability in bf16,
one intervention hook's overhead, on a Qwen3-30B-A3B-shaped model with random weights (no download).

    python benchmarks/gpu_check.py --shape qwen3-30b-a3b --device cuda --dtype bfloat16   # ~61 GB of weights
    python benchmarks/gpu_check.py --tiny     # the same script on CPU with a small shape (CI / dry runs)

benchmarks/gpu_check.sh runs it after capture_overhead.py (prefill and decode overhead). Every timing is an
interleaved median against a baseline measured in the same process; each result is also printed as one JSON
line (``RESULT {...}``) for the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_routing as mr

QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960)
TINY = dict(QWEN3_30B_A3B, vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16,
            num_experts_per_tok=4)
SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B, "tiny": TINY}


def result(name: str, **values) -> None:
    print("RESULT " + json.dumps({"check": name, **values}), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def median_ratio(fa, fb, rounds: int) -> tuple[float, float]:
    fa(), fb()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(fa))
        tb.append(timed(fb))
    return statistics.median(a / b for a, b in zip(ta, tb, strict=True)), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="= --shape tiny --device cpu --dtype float32, small sizes")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stability-texts", type=int, default=32)
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.device, args.dtype = "tiny", "cpu", "float32"
        args.batch, args.seq, args.rounds, args.stability_texts = 2, 64, 3, 8
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mr.models.check_device(device, option="--device")
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    cfg = AutoConfig.for_model("qwen3_moe", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"built {n_params / 1e9:.2f}B-parameter qwen3_moe ({args.shape}, {args.dtype}) on {device} ({name}) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    result("model", shape=args.shape, device=name, dtype=args.dtype, params=n_params)

    # capture_corpus tokens/s vs the plain forwards over the same batches
    class Tok:  # a pre-tokenised corpus: capture_corpus only needs __call__ and the pad id
        pad_token_id, padding_side = 0, "right"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [int(x) for x in text.split()]}

    g = torch.Generator().manual_seed(1)
    texts = [" ".join(map(str, torch.randint(1, shape["vocab_size"], (args.seq,), generator=g).tolist()))
             for _ in range(args.batch * 4)]
    batches = [torch.tensor([[int(x) for x in t.split()] for t in texts[i : i + args.batch]], device=device)
               for i in range(0, len(texts), args.batch)]

    def forward_all():
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b, logits_to_keep=1)

    with tempfile.TemporaryDirectory() as d:
        def corpus():
            mr.capture_corpus(model, Tok(), texts, d, batch_size=args.batch, progress=False, max_length=args.seq,
                              overwrite=True)

        ratio, t_plain = median_ratio(corpus, forward_all, args.rounds)
        reader = mr.open_trace(d)
        n = reader.num_tokens
        size = sum(p.stat().st_size for p in reader.shards())
    print(f"capture_corpus: {n / (t_plain * ratio):,.0f} tok/s vs plain forward {n / t_plain:,.0f} tok/s "
          f"(ratio {ratio:.3f}x); trace {size / n:.0f} bytes per token on disk", flush=True)
    result("capture_corpus", tokens=n, tokens_per_s=n / (t_plain * ratio), plain_tokens_per_s=n / t_plain,
           ratio=ratio, bytes_per_token=size / n)

    # one intervention hook (ablate one expert of one layer) vs the plain prefill
    ids = batches[0]
    layer = len(reader.layers) // 2

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1)

    def hooked():
        with torch.inference_mode(), mr.intervene(model, ablate={reader.layers[layer]: [0]}, mode="zero"):
            model(input_ids=ids, logits_to_keep=1)

    ratio, base = median_ratio(hooked, plain, args.rounds)
    print(f"intervention (zero expert 0 of layer {reader.layers[layer]}): plain {base * 1e3:.0f} ms; "
          f"intervene / plain = {ratio:.3f}x", flush=True)
    result("intervention", layer=int(reader.layers[layer]), plain_ms=base * 1e3, ratio=ratio)

    # routing_stability: batch sizes and padding sides in the run dtype (and vs float32 on the tiny shape)
    from moe_routing.metrics import routing_stability, stability_summary

    class TextTok:  # routing_stability needs padding: a minimal tokenizer over the same id strings
        pad_token, pad_token_id, padding_side = "0", 0, "right"

        def __call__(self, chunk, return_tensors="pt", padding=True, truncation=False, max_length=None):
            rows = [[int(x) for x in t.split()][: max_length or None] for t in chunk]
            width = max(map(len, rows))
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                sl = slice(0, len(r)) if self.padding_side == "right" else slice(width - len(r), width)
                ids[i, sl], mask[i, sl] = torch.tensor(r), 1
            from transformers import BatchEncoding

            return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(args.seq // 8, args.seq // 2, (args.stability_texts,), generator=g).tolist()
    stab_texts = [" ".join(map(str, torch.randint(1, shape["vocab_size"], (m,), generator=g).tolist()))
                  for m in lengths]
    dtypes = [args.dtype] if not args.tiny else ["float32", "bfloat16"]
    t = time.perf_counter()
    frame = routing_stability(model, TextTok(), stab_texts, batch_sizes=(1, 8, 32), dtypes=dtypes,
                              max_length=args.seq)
    summary = stability_summary(frame)
    print(f"routing_stability ({args.stability_texts} texts, {time.perf_counter() - t:.0f} s):", flush=True)
    print(summary.to_string(index=False), flush=True)
    for row in summary.to_dict("records"):
        result("routing_stability", **row)


if __name__ == "__main__":
    main()
