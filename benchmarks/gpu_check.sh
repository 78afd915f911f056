#!/usr/bin/env bash
# One-call GPU check (about 8 minutes at most): bash benchmarks/gpu_check.sh [gpu_check.py args]
#   e.g.  bash benchmarks/gpu_check.sh                 # full check on a lent GPU
#         bash benchmarks/gpu_check.sh --dry-run       # tiny sizes, works on CPU
# Needs only this repo and a Python that already has torch (the GPU box has no internet,
# so nothing can be installed there). unipred is imported from the checkout, not installed.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=""
for c in "${PYTHON:-}" python3 python .venv/bin/python; do
  if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then
    PY="$c"; break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with torch found (tried \$PYTHON, python3, python, .venv/bin/python)."
  echo "gpu_check: this machine cannot reach a package index, so torch cannot be installed here;"
  echo "gpu_check: run on a machine whose system Python has torch (>= 2.3), or set PYTHON=/path/to/python."
  exit 2
fi
echo "gpu_check: using $PY ($(command -v "$PY"))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "gpu_check: no nvidia-smi"
# the overall budget of gpu_check.py (default 450 s) keeps the whole call under ~8 minutes
exec timeout --kill-after=10 520 "$PY" benchmarks/gpu_check.py "$@"
