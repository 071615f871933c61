"""Throughput of moe_routing.metrics at a real routing shape, streamed from a trace directory.

Builds (once, cached) a synthetic trace directory with the store's own shard writer, at Qwen3-30B-A3B's routing
shape by default (48 MoE layers x 128 experts x top-8; documents of ~512 tokens, 8 languages, 200 with
``--languages 200``), then times each metric of the streamed suite on it and prints routing decisions per second
(tokens x layers x k / seconds). With ``--before REF`` (a git ref, e.g. ``main``) the same metrics of that
revision's package run on the same directory in the same process, interleaved with ours (medians of
``--repeat`` pairs), and the ratio is printed; both sides are checked to give the same numbers first.

    .venv/bin/python benchmarks/metrics_throughput.py [--tokens 500000] [--before main] [--only capacity_drop]

Single-threaded (BLAS and OpenMP pinned to one thread), so the numbers are per core. Targets (issue 17): the
streamed suite >= 20 M decisions/s per metric and load counts >= 200 M decisions/s, on one core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

import moe_routing as mr  # noqa: E402
from moe_routing import store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC_LEN = 512


# ---------------------------------------------------------------------------------------------- the trace
def synthetic_shard(start: int, n: int, layers: int, experts: int, k: int, n_langs: int, seed: int
                    ) -> mr.RoutingTrace:
    """Tokens ``[start, start + n)`` of the synthetic corpus (whole documents; deterministic per token range).

    k distinct experts per (token, layer) as ``base + j * step (mod E)`` with an odd step (distinct for E a power
    of two), the base depending on the language and the token id (so label metrics see signal); weights in
    descending order with a random swap of the first two slots (unsorted top-k exists in the wild).
    """
    rng = np.random.default_rng([seed, start])
    tok_index = np.arange(start, start + n)
    docs = tok_index // DOC_LEN
    positions = (tok_index % DOC_LEN).astype(np.int32)
    lang_code = docs % n_langs
    token_ids = np.minimum(rng.zipf(1.3, size=n), 32_000).astype(np.int32)
    base = (lang_code[:, None] * 7 + token_ids[:, None] % 5 + rng.integers(0, experts, size=(n, layers)) *
            (rng.random((n, layers)) < 0.6)) % experts
    step = 2 * rng.integers(0, experts // 2, size=(n, layers)) + 1
    ids = (base[:, :, None] + np.arange(k)[None, None, :] * step[:, :, None]) % experts
    w = np.sort(rng.random((n, layers, k)).astype(np.float32), axis=2)[:, :, ::-1]
    w /= w.sum(axis=2, keepdims=True)
    swap = rng.random((n, layers)) < 0.3
    w[swap, :2] = w[swap, 1::-1]
    langs = np.array([f"l{i:03d}" for i in range(n_langs)])
    return mr.RoutingTrace.from_arrays(
        ids.astype(np.int16), np.ascontiguousarray(w), num_experts=experts, layers=list(range(layers)),
        doc_ids=docs, positions=positions, token_ids=token_ids,
        labels={"lang": langs[lang_code], "pair": docs // n_langs}, model_name="synthetic-real-shape",
        meta={"batch_size": 32})


def build_trace_dir(path: Path, tokens: int, layers: int, experts: int, k: int, n_langs: int,
                    shard_tokens: int, seed: int = 0) -> Path:
    """Write the synthetic corpus shard by shard with the store's writer (``write_shard``, manifest records)."""
    if (path / store.MANIFEST).exists():
        return path
    shard_tokens = max(DOC_LEN, shard_tokens // DOC_LEN * DOC_LEN)
    (path / store.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    fingerprint = store.config_hash({"synthetic": [tokens, layers, experts, k, n_langs, shard_tokens, seed]})
    records: dict[str, Any] = {}
    first = None
    for i, start in enumerate(range(0, tokens, shard_tokens)):
        part = synthetic_shard(start, min(shard_tokens, tokens - start), layers, experts, k, n_langs, seed)
        first = first or part
        digest = store._trace_inputs_hash(part)
        table = store.with_shard_metadata(store.trace_to_table(part), digest, fingerprint)
        store.write_shard(table, path / store.SHARD_DIR / store.shard_name(i))
        records[store.shard_name(i)] = store.shard_record(part.num_tokens, digest)
    assert first is not None
    store.write_json_atomic(path / store.MANIFEST, {
        **store.manifest_for(first), "complete": True, "num_shards": len(records), "tokens": tokens,
        "fingerprint": fingerprint, "shards": records, "settings": {"batch_size": 32},
    })
    return path


# ---------------------------------------------------------------------------------------------- the suite
def suite(M: ModuleType, layer0: int) -> dict[str, Callable[[Any], Any]]:
    """Metric name -> call on a source (the streamed suite of issue 17)."""
    return {
        "usage_counts": lambda s: M.usage_counts(s),
        "expert_load": lambda s: M.expert_load(s),
        "expert_load_weighted": lambda s: M.expert_load(s, weighted=True),
        "load_balance": lambda s: M.load_balance(s),
        "label_usage": lambda s: M.label_usage(s, "lang"),
        "label_nmi": lambda s: M.label_nmi(s, "lang", n_shuffles=1),
        "coactivation": lambda s: M.coactivation(s, layer0),
        "consecutive_same_expert": lambda s: M.consecutive_same_expert(s, n_boot=0),
        "transitions": lambda s: M.transitions(s),
        "vocabulary_specialization": lambda s: M.vocabulary_specialization(s, n_sim=0),
        "capacity_drop": lambda s: M.capacity_drop(s, (1.0, 1.25)),
        "language_divergence": lambda s: M.language_divergence(s, n_boot=0, n_shuffles=1),
        "reference_divergence": lambda s: M.reference_divergence(s, reference="l000", n_boot=20),
        "contrast": lambda s: M.contrast(s, "lang", "l000", "l001", n_boot=20),
    }


def same(a: Any, b: Any) -> bool:
    """Equal results (frames / arrays / xarray; NaNs equal; label dims may be renamed)."""
    if isinstance(a, pd.DataFrame):
        return a.shape == b.shape and all(
            np.allclose(a[c].to_numpy(dtype=float), b[c].to_numpy(dtype=float), equal_nan=True, rtol=1e-9, atol=1e-12)
            if pd.api.types.is_numeric_dtype(a[c]) else (a[c].to_numpy() == b[c].to_numpy()).all() for c in a.columns)
    a_v, b_v = np.asarray(getattr(a, "values", a)), np.asarray(getattr(b, "values", b))
    return a_v.shape == b_v.shape and np.allclose(a_v, b_v, equal_nan=True)


def load_before(ref: str) -> ModuleType:
    """The ``moe_routing`` package of git revision ``ref``, imported as ``moe_routing_before``."""
    tmp = Path(tempfile.mkdtemp(prefix="metrics_before_"))
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "analysis/moe_routing"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "analysis" / "moe_routing").rename(tmp / "moe_routing_before")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("moe_routing_before")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--languages", type=int, default=8)
    ap.add_argument("--shard-tokens", type=int, default=65_536)
    ap.add_argument("--dir", type=Path, default=None, help="where to cache the trace directory")
    ap.add_argument("--before", default=None, help="git ref whose metrics to time side by side (e.g. main)")
    ap.add_argument("--only", nargs="*", default=None, help="metric names to run")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="also time in-memory (whole trace read once)")
    args = ap.parse_args()
    pa.set_cpu_count(1)  # one core: Arrow's decoding threads too
    pa.set_io_thread_count(1)

    shape = f"{args.tokens}x{args.layers}x{args.experts}x{args.k}-{args.languages}lang"
    path = args.dir or Path(tempfile.gettempdir()) / f"moe_routing_bench_{shape}"
    t_build, _ = timed(lambda: build_trace_dir(path, args.tokens, args.layers, args.experts, args.k,
                                               args.languages, args.shard_tokens))
    reader = mr.open_trace(path)
    decisions = args.tokens * args.layers * args.k
    print(f"trace directory {path}: {args.tokens:,} tokens x {args.layers} layers x k={args.k} = {decisions:,} "
          f"decisions, {args.experts} experts, {args.languages} languages, {len(reader.shards())} shards "
          f"(built in {t_build:.0f} s); one thread")
    ours = suite(mr.metrics, 0)
    before = suite(load_before(args.before).metrics, 0) if args.before else None
    names = [n for n in ours if args.only is None or n in args.only]
    warnings.simplefilter("ignore")
    head = f"{'metric':<28}{'ours s':>9}{'M dec/s':>10}"
    if before:
        head += f"{args.before + ' s':>12}{'M dec/s':>10}{'speed-up':>10}{'same':>6}"
    print(head)
    small = str(path) + "-warmup"  # warm up both sides (lazy imports, allocator pools) on one shard
    if not Path(small).exists():
        reader.read_shard(reader.shards()[0]).save(small)
    for name in names:
        ours[name](small)
        if before:
            before[name](small)
        t_ours, t_before, ok = [], [], True
        for _ in range(args.repeat):  # interleaved pairs
            t, out = timed(lambda: ours[name](str(path)))  # noqa: B023
            t_ours.append(t)
            if before:
                t, ref = timed(lambda: before[name](str(path)))  # noqa: B023
                t_before.append(t)
                ok = ok and same(out, ref)
        a = statistics.median(t_ours)
        line = f"{name:<28}{a:>9.2f}{decisions / a / 1e6:>10.1f}"
        if before:
            b = statistics.median(t_before)
            line += f"{b:>12.2f}{decisions / b / 1e6:>10.1f}{b / a:>9.1f}x{'yes' if ok else 'NO':>6}"
        print(line, flush=True)
    if args.memory:
        trace = reader.read()
        print(f"in memory ({trace.num_tokens:,} tokens):")
        for name in names:
            t, _ = timed(lambda: ours[name](trace))  # noqa: B023
            print(f"{name:<28}{t:>9.2f}{decisions / t / 1e6:>10.1f}", flush=True)
    print("targets: streamed suite >= 20 M decisions/s per metric; load counts (usage_counts) >= 200 M/s")


if __name__ == "__main__":
    main()
