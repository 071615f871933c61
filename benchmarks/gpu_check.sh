#!/usr/bin/env bash
# The GPU check (issue 12), inside 8 minutes on one H100/H200:  bash benchmarks/gpu_check.sh
#   - capture prefill and decode overhead: benchmarks/capture_overhead.py on the Qwen3-30B-A3B shape (48 layers,
#     128 experts, top-8, hidden 2048) with random bf16 weights (no download);
#   - capture_corpus tokens/s, routing_stability in bf16, one intervention hook: benchmarks/gpu_check.py.
# Options:  --tiny     the same steps on CPU with a small shape (the dry run the tests execute)
#           --dry-run  print the commands only
# Environment: PY (python, default: .venv/bin/python or python3), TORCH_SPEC / TORCH_PIP_ARGS (a CUDA torch when
# the python has none, as in the Makefile), BUDGET_S (seconds for everything, default 470).
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=0; DRY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown option $arg (use --tiny, --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BUDGET_S=${BUDGET_S:-470}
if [ "$TINY" = 1 ]; then
  SHAPE=tiny; DEVICE=cpu; DTYPE=float32; TOKENS=256; BATCH=2; CHECK_ARGS=(--tiny)
else
  SHAPE=qwen3-30b-a3b; DEVICE=cuda; DTYPE=bfloat16; TOKENS=16384; BATCH=8
  CHECK_ARGS=(--shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH")
  if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA torch in $PY; installing ${TORCH_SPEC:-torch} into .venv-gpu" >&2
    "$PY" -m venv .venv-gpu && PY=.venv-gpu/bin/python
    "$PY" -m pip install -q ${TORCH_PIP_ARGS:-} "${TORCH_SPEC:-torch}"
    "$PY" -m pip install -q -e .
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
fi
export PYTHONPATH="$PWD/analysis${PYTHONPATH:+:$PYTHONPATH}"
OVERHEAD=("$PY" benchmarks/capture_overhead.py --device "$DEVICE" --dtype "$DTYPE" --shape "$SHAPE" --tokens "$TOKENS" --batch "$BATCH")
CHECK=("$PY" benchmarks/gpu_check.py "${CHECK_ARGS[@]}")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${OVERHEAD[@]}"; echo
  printf '%q ' "${CHECK[@]}"; echo
  exit 0
fi
if ! grep -q -- '"--shape"' benchmarks/capture_overhead.py; then
  echo "gpu_check.sh: benchmarks/capture_overhead.py has no --shape option yet (it needs --device --dtype --shape" \
       "--tokens --batch); the overhead step cannot run" >&2
  exit 3
fi
START=$SECONDS
timeout "$BUDGET_S" "${OVERHEAD[@]}"
LEFT=$(( BUDGET_S - (SECONDS - START) ))
[ "$LEFT" -gt 10 ] || { echo "gpu_check.sh: no time left for gpu_check.py" >&2; exit 124; }
timeout "$LEFT" "${CHECK[@]}"
echo "gpu_check.sh: done in $(( SECONDS - START )) s"
