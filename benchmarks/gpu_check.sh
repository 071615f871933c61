#!/usr/bin/env bash
# Run on a lent GPU machine from the repository root:  bash benchmarks/gpu_check.sh
# Builds a Qwen3-30B-A3B-shaped model with random bf16 weights (no download) and prints capture overhead and
# throughput ratios in one run (well inside 8 minutes on an H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA torch in $PY; installing into .venv-gpu" >&2
  $PY -m venv .venv-gpu && PY=.venv-gpu/bin/python
  $PY -m pip install -q torch
fi
$PY -c "import moe_routing" 2>/dev/null || $PY -m pip install -q -e . --no-deps
$PY -m pip install -q "transformers>=5.0,<=5.24.0" pyarrow pandas scipy scikit-learn tqdm safetensors 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 $PY benchmarks/gpu_check.py "$@"
