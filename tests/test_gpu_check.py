"""benchmarks/gpu_check.sh and gpu_check.py dry-run on CPU (--tiny): the same steps a lent GPU runs, small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'analysis'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "PY": sys.executable}


def test_dry_run_names_the_gpu_commands():
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    overhead, check = out.strip().splitlines()
    assert "capture_overhead.py --device cuda --dtype bfloat16 --shape qwen3-30b-a3b --tokens" in overhead
    assert "gpu_check.py --shape qwen3-30b-a3b --device cuda --dtype bfloat16" in check
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr


def test_tiny_check_runs_every_step_on_cpu():
    if '"--shape"' in (ROOT / "benchmarks" / "capture_overhead.py").read_text():
        cmd = ["bash", "benchmarks/gpu_check.sh", "--tiny"]
    else:  # capture_overhead.py's --shape options are not merged yet: run this script's own steps
        cmd = [sys.executable, "benchmarks/gpu_check.py", "--tiny"]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    checks = {r["check"] for r in results}
    assert checks == {"model", "capture_corpus", "intervention", "routing_stability"}, checks
    corpus = next(r for r in results if r["check"] == "capture_corpus")
    assert corpus["tokens"] > 0 and corpus["tokens_per_s"] > 0 and corpus["ratio"] > 0
    stab = [r for r in results if r["check"] == "routing_stability"]
    assert {r["dtype"] for r in stab} == {"float32", "bfloat16"}
    assert all(0 <= r["topk_changed"] <= 1 for r in stab)


@pytest.mark.skipif(not (ROOT / "benchmarks" / "cost_table.py").exists(), reason="no cost table script")
def test_cost_table_prints_every_model():
    out = subprocess.run([sys.executable, "benchmarks/cost_table.py"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600, check=True).stdout
    for name in ("Qwen3-30B-A3B", "Qwen3-235B-A22B", "DeepSeek-V3", "Mixtral-8x7B", "OLMoE-1B-7B", "GPT-OSS-20B",
                 "GPT-OSS-120B"):
        assert f"| {name} |" in out
