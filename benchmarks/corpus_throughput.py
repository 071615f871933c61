"""capture_corpus tokens/s vs the plain forward over the same batches, and trace bytes per token-layer.

Models: ``--shape tiny`` (4 layers x 16 experts x top-4, vocab 4096) or ``--shape proxy``: the Qwen3-30B-A3B
routing shape (qwen3_moe, 48 layers x 128 experts x top-8, hidden 64) with the real vocabulary (151,936), where
the LM head dominates a forward that computes it over every position.

Variants, interleaved in one process (medians of ``--rounds``; ratios against the same process's baseline):
- ``plain full``: ``model(ids, mask)``, the LM head over every position (what capture_corpus ran before);
- ``plain keep1``: ``model(ids, mask, logits_to_keep=1)`` (the baseline: routing needs no logits);
- ``capture hooks``: ``plain keep1`` inside ``capture()`` (what the hooks cost, the capture module's share);
- ``capture_corpus``: the whole job (tokenisation, capture, Parquet), tokenising the raw texts itself.

Then the bytes one token-layer takes on disk for 16-bit vs 32-bit weights (``--bytes``, same routing):

    python benchmarks/corpus_throughput.py [--shape proxy] [--texts 64] [--rounds 3] [--bytes]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import moe_routing as mr
from conftest import make_tokenizer

SHAPES = {"tiny": (4, 128, 16, 4, 4096), "proxy": (48, 64, 128, 8, 151_936)}


def build(layers: int, hidden: int, experts: int, top_k: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=2048,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def pad_batches(tok, texts: list[str], batch_size: int, max_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    enc = [tok(t)["input_ids"][:max_length] for t in texts]
    batches = []
    for s in range(0, len(enc), batch_size):
        chunk = enc[s : s + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(chunk):
            ids[r, : len(e)], mask[r, : len(e)] = torch.tensor(e), 1
        batches.append((ids, mask))
    return batches


def disk_bytes(reader) -> int:
    return sum(p.stat().st_size for p in reader.shards())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--texts", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--bytes", action="store_true", help="also measure trace bytes per token-layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers, hidden, experts, top_k, vocab = SHAPES[args.shape]
    n_texts = args.texts or (400 if args.shape == "tiny" else 48)
    model, tok = build(layers, hidden, experts, top_k, vocab), make_tokenizer(300)
    texts = [f"Sentence {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 6) for i in range(n_texts)]
    max_length = 512
    batches = pad_batches(tok, texts, args.batch_size, max_length)
    n_tokens = int(sum(int(m.sum()) for _, m in batches))

    def plain(**kw):
        def go() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    model(input_ids=ids, attention_mask=mask, **kw)
        return go

    def captured() -> None:  # the hooks alone, same batches, no tokenising / writing
        with torch.inference_mode(), mr.capture(model) as rec:
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            rec.trace(clear=True)

    def corpus() -> None:
        with tempfile.TemporaryDirectory() as d:
            mr.capture_corpus(model, tok, texts, d, batch_size=args.batch_size, progress=False, max_length=max_length)

    variants = {"plain full": plain(), "plain keep1": plain(logits_to_keep=1), "capture hooks": captured,
                "capture_corpus": corpus}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = times["plain keep1"]
    print(f"{args.shape}: {layers} layers x {experts} experts x top-{top_k}, hidden {hidden}, vocab {vocab:,}; "
          f"{n_tokens} tokens in {len(batches)} batches; {args.rounds} interleaved rounds, medians; "
          f"{torch.get_num_threads()} torch threads")
    for name, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts, strict=True))
        print(f"  {name:>15}: {n_tokens / statistics.median(ts):>10,.0f} tok/s   speed vs plain keep1 = "
              f"{ratio:.3f}x")
    own = statistics.median(h / c for h, c in zip(times["capture hooks"], times["capture_corpus"], strict=True))
    print(f"  capture_corpus / capture hooks speed = {own:.3f}x (the pipeline's own share: tokenising, writing)")
    full = statistics.median(f / c for f, c in zip(times["plain full"], times["capture_corpus"], strict=True))
    print(f"  capture_corpus is {full:.2f}x as fast as the full-LM-head forward (what it computed before)")

    if args.bytes:
        bf16 = build(layers, hidden, experts, top_k, vocab).to(torch.bfloat16)
        with tempfile.TemporaryDirectory() as d:
            rows = {}
            for label, m, wd in (("bf16 model, weights auto (16-bit)", bf16, "auto"),
                                 ("bf16 model, weights float32", bf16, "float32"),
                                 ("fp32 model, weights auto (float32)", model, "auto")):
                r = mr.capture_corpus(m, tok, texts, f"{d}/{len(rows)}", batch_size=args.batch_size,
                                      progress=False, max_length=max_length, weights_dtype=wd)
                n = r.num_tokens * len(r.layers)
                from moe_routing.store import TraceLayout

                lay = TraceLayout(layers=r.layers, num_experts=r.num_experts, top_k=r.top_k,
                                  weights_dtype=r.manifest["weights_dtype"])
                raw = (lay.bytes_per_token() - 16) / len(r.layers)
                rows[label] = (disk_bytes(r) / n, raw, r.manifest.get("weights_stored"))
            print(f"bytes per token-layer ({experts} experts, top-{top_k}): on disk (zstd) / uncompressed ids+weights")
            for label, (disk, raw, stored) in rows.items():
                print(f"  {label:>36}: {disk:6.1f} B on disk, {raw:4.0f} B raw; shards store {stored}")
            print(f"  (router logits in fp32 would be {experts * 4} B raw per token-layer, fp16 {experts * 2} B)")


if __name__ == "__main__":
    main()
