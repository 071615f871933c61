"""Start-up costs a user waits for, measured in fresh processes (tests assert behaviour, not speed).

    python benchmarks/startup_times.py [--rounds 3]

Prints, per round: CPU seconds of ``load_corpus("demo")`` (parsing every Django catalog with cold caches; the
package import is not counted) and, when the demo model cache is complete, the wall seconds of
``demo_model_path("trained")`` finding it again (no training). Both used to be timed test assertions
(< 2 s CPU, < 1 s), which failed on loaded machines.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CORPUS = (
    "import time; from moe_routing.corpora import load_corpus; t = time.process_time(); "
    "df = load_corpus('demo'); print(time.process_time() - t, len(df))"
)
CACHE = (
    "import time; from moe_routing import demo; root = demo.demo_cache_dir(); ok = demo._complete(root); "
    "t = time.perf_counter(); p = demo.demo_model_path('trained') if ok else None; "
    "print(time.perf_counter() - t if ok else 'nan', p)"
)


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return out.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    corpus, cache = [], []
    for r in range(args.rounds):
        seconds, n = _run(CORPUS)
        corpus.append(float(seconds))
        found, path = _run(CACHE)
        cache.append(float(found))
        print(f"round {r}: load_corpus('demo') {float(seconds):.2f} s CPU ({n} texts); "
              f"demo_model_path('trained') {float(found):.3f} s ({path})", flush=True)
    print(f"median: load_corpus('demo') {statistics.median(corpus):.2f} s CPU (was asserted < 2 s); "
          f"demo_model_path reuse {statistics.median(cache):.3f} s (was asserted < 1 s; nan: no complete cache)")


if __name__ == "__main__":
    main()
