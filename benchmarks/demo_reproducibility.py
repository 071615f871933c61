"""Is the demo model reproducible? Train it in separate processes with different thread settings and compare.

Each run is a fresh process with its own ``MOE_ROUTING_CACHE`` (the shared cache is never touched), its own
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` and ``torch.set_num_threads``; the step budget binds (no wall-clock
cap), so only the kernels can make two runs differ. Per run it records the weights hash
(``demo.weights_sha256``), the tokenizer hash, the losses and the headline numbers of the notebooks: per-layer
language NMI (``label_nmi``) and I(language; expert | token) (``conditional_label_mi``) of the trained and the
untrained model on the held-out split. Then it compares every run with the first: hashes, the largest absolute
weight difference, and the differences of the headline numbers.

    python benchmarks/demo_reproducibility.py                       # full recipe, threads 1 vs 2 (~2 x 3-10 min)
    python benchmarks/demo_reproducibility.py --steps 20 --runs 1 2 1 --no-nmi   # a quick kernel check
    python benchmarks/demo_reproducibility.py --runs 1 2 1:nodet    # also: same threads again, determinism off

A run spec is ``THREADS`` or ``THREADS:nodet`` (``deterministic=False``). Results go to ``--out`` (default a
temporary directory; kept with ``--keep``) and are printed as a table and as JSON (``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def worker(args: argparse.Namespace) -> None:
    """One training run in this process; prints its record as JSON on the last line of stdout."""
    import torch

    from moe_routing import demo
    from moe_routing.demo_pipeline import demo_runs
    from moe_routing.metrics import conditional_label_mi, label_nmi

    torch.set_num_threads(args.threads)
    root = demo.demo_cache_dir()  # under this process's MOE_ROUTING_CACHE
    t0 = time.perf_counter()
    facts = demo.train_demo_model(root, steps=args.steps, seconds=float("inf"), threads=args.threads,
                                  deterministic=not args.nodet, progress=False)
    record: dict[str, Any] = {
        "threads": args.threads,
        "deterministic": not args.nodet,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 1),
        "cache": str(root),
        **{k: facts.get(k) for k in ("steps", "stopped_by", "train_seconds", "tokens_per_second", "heldout_loss",
                                     "train_loss", "untrained_heldout_loss", "weights_sha256",
                                     "untrained_weights_sha256", "tokenizer_sha256", "load_average_at_start")},
    }
    if not args.no_nmi:
        paths = demo_runs("demo", Path(args.out) / "runs", parts=("heldout",), progress=False)
        for variant in ("trained", "untrained"):
            path = paths[f"{variant}/heldout"]
            nmi = label_nmi(path, "lang", n_shuffles=0)
            cmi = conditional_label_mi(path, "lang", n_shuffles=0, n_boot=0)
            record[f"nmi_{variant}"] = [round(float(x), 6) for x in nmi["nmi"]]
            record[f"cmi_bits_{variant}"] = [round(float(x), 6) for x in cmi["cmi_bits"]]
    print(json.dumps(record))


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["1", "2"], help="run specs: THREADS or THREADS:nodet")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--no-nmi", action="store_true", help="skip the capture and the headline numbers")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--nodet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    from moe_routing import demo

    steps = args.steps or demo.TRAIN_STEPS
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="demo-repro-"))
    records = []
    for i, spec in enumerate(args.runs):
        threads, _, flag = spec.partition(":")
        run_dir = out / f"run{i}-t{threads}{'-nodet' if flag else ''}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "MOE_ROUTING_CACHE": str(run_dir / "cache")}
        cmd = [sys.executable, __file__, "--worker", "--threads", threads, "--steps", str(steps),
               "--out", str(run_dir)] + (["--nodet"] if flag == "nodet" else []) + (["--no-nmi"] if args.no_nmi else [])
        print(f"[repro] run {i}: threads={threads}{' deterministic=False' if flag else ''} steps={steps}",
              file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"run {i} failed with exit code {proc.returncode}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["run"] = i
        records.append(rec)
        print(f"[repro]   {rec['seconds']} s, weights {rec['weights_sha256'][:16]}", file=sys.stderr, flush=True)

    ref = records[0]
    ref_dir = Path(ref["cache"])
    print(f"\nsteps={steps}  (step budget binding, no wall-clock cap; each run its own process and cache)")
    print(f"{'run':>3} {'threads':>7} {'det':>5} {'train s':>8} {'weights sha256':>18} {'same':>5} "
          f"{'max |dw|':>10} {'heldout loss':>12}")
    for rec in records:
        same = rec["weights_sha256"] == ref["weights_sha256"]
        rec["same_weights_as_run0"] = same
        rec["max_abs_weight_diff_vs_run0"] = 0.0 if same else max_weight_diff(
            ref_dir / "trained", Path(rec["cache"]) / "trained")
        rec["same_tokenizer_as_run0"] = rec["tokenizer_sha256"] == ref["tokenizer_sha256"]
        rec["same_untrained_as_run0"] = rec["untrained_weights_sha256"] == ref["untrained_weights_sha256"]
        print(f"{rec['run']:>3} {rec['threads']:>7} {rec['deterministic']!s:>5} {rec['train_seconds']:>8} "
              f"{rec['weights_sha256'][:16]:>18} {same!s:>5} {rec['max_abs_weight_diff_vs_run0']:>10.3g} "
              f"{rec['heldout_loss']:>12}")
    print("tokenizer identical in all runs:", all(r["same_tokenizer_as_run0"] for r in records))
    print("untrained weights identical in all runs:", all(r["same_untrained_as_run0"] for r in records))
    if not args.no_nmi:
        for key in ("nmi_trained", "nmi_untrained", "cmi_bits_trained", "cmi_bits_untrained"):
            print(f"\n{key} per layer")
            for rec in records:
                diff = max(abs(a - b) for a, b in zip(rec[key], ref[key], strict=True))
                print(f"  run {rec['run']} (threads {rec['threads']}): "
                      + " ".join(f"{x:.4f}" for x in rec[key]) + f"   max |diff vs run 0| = {diff:.2g}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"\nkept: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
