#!/usr/bin/env bash
# Create (or update) the project-local virtual environment .venv: the pinned set in requirements.txt,
# then this package itself in editable mode (console scripts spark-* / fgvc-* in .venv/bin).
# Idempotent: re-running it is cheap when requirements.txt and pyproject.toml have not changed.
# Python 3.11 is preferred (spconv-cu120, the CUDA sparse path, has wheels up to CPython 3.11); any
# Python >= 3.10 works for the CPU path. Set PYTHON=/path/to/python to pick the interpreter.
#
# NVIDIA GPUs: when nvidia-smi answers, the GPU's compute capability picks the torch build (docs/gpu.md, "GPU
# generations"): the pinned torch from PyPI (a CUDA 13 build, kernels from sm_75: Turing and newer) where it runs,
# the same version's CUDA 12.6 build (kernels sm_50 to sm_90) for Volta (V100, sm_70) and Pascal. spconv comes from
# requirements.txt either way (spconv-cu120 / -cu126 bring their own CUDA 12 runtime, which the driver of any CUDA
# 12 or 13 build runs). Without a GPU (or nvidia-smi) nothing changes: the pinned set from PyPI.
#   bash tools/setup_env.sh --print-torch-choice   # only say which build this machine gets, install nothing
#   TORCH_CUDA=cu126 bash tools/setup_env.sh       # force a build (cu126, cu128, cu130, ... or "pypi")
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- which torch build runs on this machine's GPU (none: the pinned PyPI build, as always)
TORCH_PIN=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.txt)
VISION_PIN=$(sed -n 's/^torchvision==\([0-9.]*\).*/\1/p' requirements.txt)
GPU_CC=""
if command -v nvidia-smi >/dev/null 2>&1; then
  # the oldest GPU of the machine decides (one build must run on all of them); a failing nvidia-smi = no GPU
  GPU_CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' ' \
           | grep -E '^[0-9]+\.[0-9]+$' | sort -t. -k1,1n -k2,2n | head -n1 || true)
fi
TORCH_BUILD=${TORCH_CUDA:-}
if [ -z "$TORCH_BUILD" ]; then
  if [ -z "$GPU_CC" ]; then
    TORCH_BUILD=pypi; WHY="no NVIDIA GPU found (nvidia-smi absent or silent): the pinned set from PyPI"
  else
    major=${GPU_CC%%.*}; minor=${GPU_CC#*.}
    if [ "$major" -gt 7 ] || { [ "$major" -eq 7 ] && [ "$minor" -ge 5 ]; }; then
      TORCH_BUILD=pypi; WHY="GPU sm_${major}${minor}: the PyPI torch $TORCH_PIN (CUDA 13 build, kernels from sm_75) runs on it"
    elif [ "$major" -ge 5 ]; then
      TORCH_BUILD=cu126; WHY="GPU sm_${major}${minor} (Volta / Pascal / Maxwell): CUDA 13 builds start at sm_75, the CUDA 12.6 build of torch $TORCH_PIN has sm_${major}0 kernels"
    else
      echo "setup_env.sh: GPU of compute capability $GPU_CC: no current torch build has kernels for it; use the CPU (CUDA_VISIBLE_DEVICES=) or another GPU" >&2
      TORCH_BUILD=pypi; WHY="GPU sm_${major}${minor} is older than any torch build supports: the pinned set (CPU use only)"
    fi
  fi
else
  WHY="TORCH_CUDA=$TORCH_BUILD set by you"
fi
TORCH_INDEX=""
[ "$TORCH_BUILD" != "pypi" ] && TORCH_INDEX="https://download.pytorch.org/whl/$TORCH_BUILD"
if [ "${1:-}" = "--print-torch-choice" ]; then
  echo "gpu_compute_capability=${GPU_CC:-none}"
  echo "torch_build=$TORCH_BUILD"
  echo "torch=${TORCH_PIN}${TORCH_INDEX:+ from $TORCH_INDEX}"
  echo "why=$WHY"
  exit 0
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))'; then
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup_env.sh: no Python >= 3.10 found. Install one (3.11 for the CUDA sparse path), or set PYTHON=/path/to/python" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup_env.sh: creating .venv with $PY ($("$PY" --version 2>&1))" >&2
  "$PY" -m venv .venv
fi
if [ -n "$TORCH_INDEX" ]; then
  want=$({ cat requirements.txt pyproject.toml; echo "$TORCH_INDEX"; } | sha256sum | cut -d' ' -f1)
else
  want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
fi
if [ "$(cat .venv/.requirements.sha256 2>/dev/null || true)" != "$want" ]; then
  echo "setup_env.sh: installing requirements.txt and the package into .venv (first time: several minutes, torch is large)" >&2
  if [ -n "$TORCH_INDEX" ]; then
    echo "setup_env.sh: $WHY; installing torch==$TORCH_PIN from $TORCH_INDEX" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==$TORCH_PIN" "torchvision==$VISION_PIN" \
        --index-url "$TORCH_INDEX" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_PIN'))" || {
      echo "setup_env.sh: torch $TORCH_PIN is not published at $TORCH_INDEX. Pick the newest torch that is (see" \
           "https://pytorch.org/get-started/previous-versions/), e.g. pip install 'torch==<version>' --index-url" \
           "$TORCH_INDEX, pin it in requirements.txt and run this again; docs/gpu.md lists the builds per GPU" >&2
      exit 1; }
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, torchvision, einops, yaml, timm, sparse_mim, fgvc" \
    || { echo "setup_env.sh: the install did not complete (see pip's messages above)" >&2; exit 1; }
  .venv/bin/python -c "import spconv.pytorch" 2>/dev/null \
    || echo "setup_env.sh: spconv is not installed for this Python: the CPU path works; the CUDA sparse path needs Python 3.11 (pip install '.[spconv]')" >&2
  echo "$want" > .venv/.requirements.sha256
fi
