#!/usr/bin/env bash
# Run a chosen set of tests against another torch family than the lock's, in a venv of its own.
#
#   make test-versions TORCH=2.11.0                      # the GPU image's family (default subset)
#   bash .ci/test_versions.sh 2.11.0 tests/test_faults.py # any pytest arguments after the version
#
# Why: requirements.lock pins the newest torch family; the GPU machines run an older one
# (torch 2.11.0 / torchvision 0.26.0 / torchaudio 2.11.0 / lightning 2.6.6 on Python 3.12).
# Behaviour that depends on torch's own code (torch.load's weights-only unpickler, Lightning's
# checkpoint hooks, SDPA) must be checked there too. Not part of `make test` or CI: it installs a
# second multi-GB torch. Every package other than the torch family and its CUDA wheels is taken
# at the lock's version (as pip constraints), so only torch's family differs.
#
# Environment: VENV (default .venv-torch<VERSION>), PY (default python3), FIND_LINKS (a folder
# of already-downloaded wheels, e.g. the torch wheel), TORCHVISION / TORCHAUDIO / TORCHCODEC
# (versions; defaults below for known torch releases), NICE (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=${1:?usage: .ci/test_versions.sh TORCH_VERSION [pytest args...]}
shift || true
case "$TORCH" in
  # the family each torch release was published with (torchcodec: its compatibility table)
  2.11.*) TV=0.26.0 TA=2.11.0 TC="0.11.*" ;;
  *) TV="" TA="" TC="" ;;
esac
TV=${TORCHVISION:-$TV}
TA=${TORCHAUDIO:-$TA}
TC=${TORCHCODEC:-$TC}
if [ -z "$TV" ] || [ -z "$TA" ] || [ -z "$TC" ]; then
  echo "torch $TORCH: set TORCHVISION, TORCHAUDIO and TORCHCODEC to its family's versions" >&2
  exit 2
fi
VENV=${VENV:-.venv-torch$TORCH}
PY=${PY:-python3}
NICE=${NICE:-10}
BIN=$VENV/bin
export PYTHONSAFEPATH=1

if [ ! -x "$BIN/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$TORCH"
if [ ! -f "$stamp" ]; then
  # the lock minus the torch family, its CUDA libraries and triton, and the install tools
  # (torch 2.11 wants setuptools<82), as exact constraints
  cons="$VENV/constraints.txt"
  grep -E '^[a-z0-9]' requirements.lock | sed 's/ .*//' \
    | grep -vE '^((torch|torchvision|torchaudio|torchcodec|triton|pip|setuptools|wheel)==|(nvidia|cuda)-)' >"$cons"
  links=()
  if [ -n "${FIND_LINKS:-}" ]; then links=(--find-links "$FIND_LINKS"); fi
  "$BIN/python" -m pip install -q "${links[@]}" -c "$cons" \
    "torch==$TORCH" "torchvision==$TV" "torchaudio==$TA" "torchcodec==$TC"
  "$BIN/python" -m pip install -q "setuptools>=77,<82" wheel  # the editable install below; torch 2.11 wants <82
  # unipred's own requirements with every extra, then unipred itself without touching torch
  "$BIN/python" -m pip install -q "${links[@]}" -c "$cons" \
    "lightning==2.6.6" omegaconf einops webdataset torchmetrics safetensors numpy pillow \
    timm matplotlib huggingface_hub pyarrow scikit-video pytest hypothesis tokenizers tensorboard
  "$BIN/python" -m pip install -q --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
"$BIN/python" -c "import torch, torchvision, torchaudio, lightning, sys; \
print('python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', \
torchvision.__version__, '| torchaudio', torchaudio.__version__, '| lightning', lightning.__version__)"

if [ "$#" -eq 0 ]; then
  # the default subset: checkpoint safety (torch.load's unpickler), faults, exact resume
  set -- tests/test_checkpoint_safety.py tests/test_faults.py -q
fi
exec nice -n "$NICE" "$BIN/python" -m pytest "$@"
