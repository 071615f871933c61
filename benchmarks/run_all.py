"""make bench: every benchmark in one go, each printing ratios measured side by side in its own run."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ("capture overhead (prefill, decode, bytes)", ["capture_overhead.py", "--rounds", "11"]),
    ("side by side with the peers (nnsight; skipped when absent)", ["peers.py"]),
    ("capture_corpus throughput", ["corpus_throughput.py"]),
    ("metrics throughput", ["metrics_throughput.py"]),
    ("intervention overhead: ablation/steering hooks vs plain forward", ["intervention_overhead.py", "--rounds", "11"]),
    ("start-up: demo corpus parse, demo model cache lookup", ["startup_times.py"]),
    ("peak memory at 1x and 10x", ["memory_scaling.py"]),
    ("peak memory, pyarrow system allocator", ["memory_scaling.py", "--arrow-system-pool"]),
]

if __name__ == "__main__":
    failed = 0
    for title, (script, *args) in SCRIPTS:
        print(f"\n== {title}: benchmarks/{script}", flush=True)
        failed |= subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE).returncode != 0
    sys.exit(failed)
