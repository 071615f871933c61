"""Peak memory of capture_corpus and of the streamed metric suite at 1x and 10x corpus size.

Each measurement runs in a fresh subprocess and reports its own peak RSS above the RSS it had once the model
(or the trace reader) was ready, so imports do not hide growth. Flat = bounded memory.

    python benchmarks/memory_scaling.py [--texts 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARROW_ENV: dict[str, str] = {}


def rss_mb() -> float:
    import re

    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_capture(out: str, n_texts: int) -> dict:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch

    import moe_routing as mr
    from capture_overhead import build
    from conftest import make_tokenizer

    torch.set_num_threads(1)
    model, tok = build(4, 128, 16, 4), make_tokenizer(300)
    texts = (f"Sentence {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 6) for i in range(n_texts))
    with torch.inference_mode():  # warm up allocators before the baseline
        model(input_ids=torch.ones((16, 64), dtype=torch.long))
    base = rss_mb()
    reader = mr.capture_corpus(model, tok, texts, out, batch_size=16, batches_per_shard=4, progress=False,
                               max_length=512)
    return {"tokens": reader.num_tokens, "growth_mb": peak_mb() - base}


def child_metrics(trace_dir: str) -> dict:
    import moe_routing as mr

    reader = mr.open_trace(trace_dir)

    def suite(source) -> None:
        mr.metrics.expert_load(source)
        mr.metrics.load_balance(source)
        mr.metrics.label_nmi(source, "chunk")
        mr.metrics.coactivation(source, reader.layers[0])
        mr.metrics.consecutive_same_expert(source)
        mr.metrics.transitions(source)

    suite(reader.read_shard(reader.shards()[0]))  # warm up: lazy imports, allocator pools
    base = rss_mb()
    suite(trace_dir)
    return {"tokens": reader.num_tokens, "shards": len(reader.shards()), "growth_mb": peak_mb() - base}


def run_child(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **ARROW_ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=300)
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--arrow-system-pool", action="store_true",
                    help="ARROW_DEFAULT_MEMORY_POOL=system: pyarrow's default mimalloc pool keeps freed pages")
    args = ap.parse_args()
    if args.arrow_system_pool:
        ARROW_ENV["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    if args.child:
        kind, *rest = args.child
        result = child_capture(rest[0], int(rest[1])) if kind == "capture" else child_metrics(rest[0])
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for scale in (1, 10):
            out = f"{d}/x{scale}"
            cap = run_child("capture", out, str(args.texts * scale))
            met = run_child("metrics", out)
            rows.append((scale, cap, met))
            print(f"{scale:>3}x corpus ({cap['tokens']:,} tokens, {met['shards']} shards): capture_corpus peak growth "
                  f"{cap['growth_mb']:.1f} MB; metric suite (streamed) peak growth {met['growth_mb']:.1f} MB",
                  flush=True)
        (_, c1, m1), (_, c10, m10) = rows
        print(f"10x / 1x peak growth: capture_corpus {c10['growth_mb'] / max(c1['growth_mb'], 1):.2f}x, "
              f"metrics {m10['growth_mb'] / max(m1['growth_mb'], 1):.2f}x (tokens x{c10['tokens'] / c1['tokens']:.1f})")


if __name__ == "__main__":
    main()
