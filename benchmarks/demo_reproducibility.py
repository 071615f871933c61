"""Is the demo model reproducible? Train it in separate processes with different thread settings and compare.

Each run is a fresh process with its own ``MOE_ROUTING_CACHE`` (the shared cache is never touched) and its own
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``; the step budget binds (no wall-clock cap), so only the kernels and
the thread count can make two runs differ. Per run it records the weights hash (``demo.weights_sha256``), the
tokenizer hash, the losses and the headline numbers of the notebooks: per-layer language NMI (``label_nmi``)
and I(language; expert | token) (``conditional_label_mi``) of the trained and the untrained model on the
held-out split (captured in the same process). Then it compares every run with the first: hashes, the largest
absolute weight difference, and the differences of the headline numbers.

    python benchmarks/demo_reproducibility.py            # recipe demo-v2; OMP 1, OMP 2, OMP 2 with 2 threads
    python benchmarks/demo_reproducibility.py --steps 15 --no-nmi --runs 1 2:2 1:1:nodet   # a quick check
    python benchmarks/demo_reproducibility.py --step-timing 5 --steps 5   # cost of deterministic mode per step

A run spec is ``OMP[:THREADS][:nodet]``: ``OMP_NUM_THREADS`` of the process, the torch threads for training
(default: the recipe's, demo-v2 trains on 1 thread whatever OMP says) and ``nodet`` for
``deterministic=False``. Results go to ``--out`` (default a temporary directory; kept with ``--keep``) and are
printed as a table and as JSON (``--json PATH``).
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

    root = demo.demo_cache_dir()  # under this process's MOE_ROUTING_CACHE and MOE_ROUTING_DEMO_VERSION
    t0 = time.perf_counter()
    facts = demo.train_demo_model(root, steps=args.steps, seconds=float("inf"), threads=args.threads or None,
                                  deterministic=False if args.nodet else None, progress=False)
    record: dict[str, Any] = {
        "version": facts["version"],
        "threads": facts["threads"],
        "deterministic": facts["deterministic_algorithms"],
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


def step_timing(rounds: int, steps: int) -> None:
    """Seconds per training step of the demo model on 1 thread, deterministic mode on vs off, interleaved.

    The demo-v2 recipe differs from a 1-thread demo-v1 run only by ``torch.use_deterministic_algorithms``; this
    measures what that costs per step (random token batches of the recipe's shape; the tokenizer, the data and
    the evaluation, which cost the same either way, are left out).
    """
    import statistics

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_routing import demo

    torch.set_num_threads(1)
    config = AutoConfig.for_model("qwen3_moe", **demo.MODEL_CONFIG, output_router_logits=True)
    config._experts_implementation = demo.EXPERTS_IMPLEMENTATION
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    width = 32
    ids = torch.randint(2, demo.VOCAB_SIZE, (demo.BATCH_TOKENS // width, width))

    def block(det: bool) -> float:
        torch.use_deterministic_algorithms(det, warn_only=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.use_deterministic_algorithms(False)
        return (time.perf_counter() - t0) / steps

    block(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for det in (False, True):
            times[det].append(block(det))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"seconds per training step, 1 thread, {rounds} interleaved rounds of {steps} steps (medians): "
          f"deterministic {on:.3f}, not deterministic {off:.3f}, ratio {on / off:.3f}")


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["1", "2", "2:2"], help="run specs: OMP[:THREADS][:nodet]")
    parser.add_argument("--version", default="demo-v2", help="demo recipe (demo.RECIPES)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--no-nmi", action="store_true", help="skip the capture and the headline numbers")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--step-timing", type=int, default=0, metavar="ROUNDS",
                        help="only time training steps with deterministic mode on vs off (ROUNDS interleaved)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--nodet", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.step_timing:
        step_timing(args.step_timing, args.steps or 5)
        return 0

    from moe_routing import demo

    steps = args.steps or demo.TRAIN_STEPS
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="demo-repro-"))
    records = []
    for i, spec in enumerate(args.runs):
        parts = spec.split(":")
        omp = parts[0]
        threads = next((p for p in parts[1:] if p.isdigit()), "0")
        nodet = "nodet" in parts[1:]
        run_dir = out / f"run{i}-omp{omp}-t{threads}{'-nodet' if nodet else ''}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": omp, "MKL_NUM_THREADS": omp,
               "MOE_ROUTING_CACHE": str(run_dir / "cache"), "MOE_ROUTING_DEMO_VERSION": args.version}
        cmd = [sys.executable, __file__, "--worker", "--threads", threads, "--steps", str(steps),
               "--out", str(run_dir)] + (["--nodet"] if nodet else []) + (["--no-nmi"] if args.no_nmi else [])
        print(f"[repro] run {i}: OMP_NUM_THREADS={omp} threads={threads if threads != '0' else 'recipe'}"
              f"{' deterministic=False' if nodet else ''} steps={steps} {args.version}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"[repro]   run {i} ran past --timeout {args.timeout:.0f} s; left out", file=sys.stderr, flush=True)
            continue
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            print(f"[repro]   run {i} failed with exit code {proc.returncode}; left out", file=sys.stderr)
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["run"] = i
        records.append(rec)
        print(f"[repro]   {rec['seconds']} s, weights {rec['weights_sha256'][:16]}", file=sys.stderr, flush=True)
        if args.json:  # after every run, so an interrupted measurement keeps what it has
            Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    if not records:
        raise SystemExit("no run finished")

    ref = records[0]
    ref_dir = Path(ref["cache"])
    print(f"\nsteps={steps}  (step budget binding, no wall-clock cap; each run its own process and cache)")
    print(f"{'run':>3} {'omp':>4} {'threads':>7} {'det':>5} {'train s':>8} {'weights sha256':>18} {'same':>5} "
          f"{'max |dw|':>10} {'heldout loss':>12}")
    for rec in records:
        same = rec["weights_sha256"] == ref["weights_sha256"]
        rec["same_weights_as_run0"] = same
        rec["max_abs_weight_diff_vs_run0"] = 0.0 if same else max_weight_diff(
            ref_dir / "trained", Path(rec["cache"]) / "trained")
        rec["same_tokenizer_as_run0"] = rec["tokenizer_sha256"] == ref["tokenizer_sha256"]
        rec["same_untrained_as_run0"] = rec["untrained_weights_sha256"] == ref["untrained_weights_sha256"]
        print(f"{rec['run']:>3} {rec['omp_num_threads']:>4} {rec['threads']:>7} {rec['deterministic']!s:>5} {rec['train_seconds']:>8} "
              f"{rec['weights_sha256'][:16]:>18} {same!s:>5} {rec['max_abs_weight_diff_vs_run0']:>10.3g} "
              f"{rec['heldout_loss']:>12}")
    print("tokenizer identical in all runs:", all(r["same_tokenizer_as_run0"] for r in records))
    print("untrained weights identical in all runs:", all(r["same_untrained_as_run0"] for r in records))
    if not args.no_nmi:
        for key in ("nmi_trained", "nmi_untrained", "cmi_bits_trained", "cmi_bits_untrained"):
            print(f"\n{key} per layer")
            for rec in records:
                diff = max(abs(a - b) for a, b in zip(rec[key], ref[key], strict=True))
                print(f"  run {rec['run']} (omp {rec['omp_num_threads']}, threads {rec['threads']}): "
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
