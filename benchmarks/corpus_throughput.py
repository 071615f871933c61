"""End-to-end capture_corpus tokens/s vs the plain forward pass over the same batches (what writing costs).

    python benchmarks/corpus_throughput.py [--texts 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import moe_routing as mr
from capture_overhead import build
from conftest import make_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = build(4, 128, 16, 4), make_tokenizer(300)
    texts = [f"Sentence {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 6) for i in range(args.texts)]
    enc = [tok(t)["input_ids"] for t in texts]
    batches = []
    for s in range(0, len(enc), args.batch_size):
        chunk = enc[s : s + args.batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(chunk):
            ids[r, : len(e)], mask[r, : len(e)] = torch.tensor(e), 1
        batches.append((ids, mask))
    n_tokens = sum(map(len, enc))

    def plain():
        with torch.inference_mode():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)

    def corpus():
        with tempfile.TemporaryDirectory() as d:
            mr.capture_corpus(model, tok, texts, d, batch_size=args.batch_size, progress=False, max_length=512)

    plain(), corpus()
    tp, tc = [], []
    for _ in range(args.rounds):
        for fn, acc in ((plain, tp), (corpus, tc)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ratio = statistics.median(c / p for c, p in zip(tc, tp, strict=True))
    print(f"capture_corpus: {n_tokens / statistics.median(tc):,.0f} tok/s; plain forward over the same batches: "
          f"{n_tokens / statistics.median(tp):,.0f} tok/s; capture_corpus / plain = {ratio:.3f}x "
          f"({n_tokens} tokens, {len(batches)} batches)")


if __name__ == "__main__":
    main()
