"""GPU check: a Qwen3-30B-A3B-shaped model with random bf16 weights (no download), capture overhead and throughput.

    python benchmarks/gpu_check.py            # on a GPU (about 61 GB of weights; H100/H200 class)
    python benchmarks/gpu_check.py --tiny     # the same script on CPU with a small shape (for CI / dry runs)

Prints, in one run, interleaved medians: captured / plain forward (prefill and decode), capture_corpus tokens/s
vs the plain forward over the same batches, and trace bytes per token-layer.
"""

from __future__ import annotations

import argparse
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shape = TINY if args.tiny else QWEN3_30B_A3B
    if args.tiny:
        args.batch, args.seq = 2, 128
    t0 = time.perf_counter()
    cfg = AutoConfig.for_model("qwen3_moe", **shape)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if args.tiny else torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {n_params / 1e9:.2f}B-parameter qwen3_moe on {device} in {time.perf_counter() - t0:.0f} s "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'})", flush=True)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    mask[0, : args.seq // 8] = 0

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    def captured():
        with torch.inference_mode(), mr.capture(model) as rec:
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        rec.trace()

    r, base = median_ratio(captured, plain, args.rounds)
    tokens = int(mask.sum())
    print(f"prefill {args.batch}x{args.seq}: plain {base * 1e3:.0f} ms ({tokens / base:,.0f} tok/s); "
          f"capture / plain = {r:.3f}x", flush=True)

    prompt, pmask = ids[:, :128], torch.ones_like(ids[:, :128])
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)

    def gen_plain():
        with torch.inference_mode():
            model.generate(prompt, attention_mask=pmask, **kw)

    def gen_captured():
        with torch.inference_mode(), mr.capture(model) as rec:
            model.generate(prompt, attention_mask=pmask, **kw)
        rec.trace()

    r, base = median_ratio(gen_captured, gen_plain, max(3, args.rounds // 2))
    print(f"decode (generate {args.batch} x 32 new tokens): plain {base:.2f} s; capture / plain = {r:.3f}x", flush=True)

    class Tok:  # pre-tokenised corpus: capture_corpus only needs __call__ and pad ids
        pad_token_id, padding_side = 0, "right"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [int(x) for x in text.split()]}

    g = torch.Generator().manual_seed(1)
    texts = [" ".join(map(str, torch.randint(0, shape["vocab_size"], (args.seq // 2,), generator=g).tolist()))
             for _ in range(args.batch * 4)]
    batches = [torch.tensor([[int(x) for x in t.split()] for t in texts[i : i + args.batch]], device=device)
               for i in range(0, len(texts), args.batch)]

    def forward_all():
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b, logits_to_keep=1)

    t_plain = min(timed(forward_all) for _ in range(2))
    with tempfile.TemporaryDirectory() as d:
        t_cap = timed(lambda: mr.capture_corpus(model, Tok(), texts, d, batch_size=args.batch, progress=False,
                                                max_length=args.seq, overwrite=True))
        reader = mr.open_trace(d)
        n = reader.num_tokens
        size = sum(p.stat().st_size for p in reader.shards())
    print(f"capture_corpus: {n / t_cap:,.0f} tok/s vs plain forward {n / t_plain:,.0f} tok/s "
          f"(ratio {t_cap / t_plain:.3f}x); trace {size / (n * len(reader.layers)):.1f} bytes per token-layer "
          f"(fp32 logits would be {4 * shape['num_experts']})", flush=True)


if __name__ == "__main__":
    main()
