#!/usr/bin/env bash
# Create (or update) the project-local virtual environment .venv: the pinned set in requirements.txt,
# then this package itself in editable mode (console scripts spark-* / fgvc-* in .venv/bin).
# Idempotent: re-running it is cheap when requirements.txt and pyproject.toml have not changed.
# Python 3.11 is preferred (spconv-cu120, the CUDA sparse path, has wheels up to CPython 3.11); any
# Python >= 3.10 works for the CPU path. Set PYTHON=/path/to/python to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
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
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null || true)" != "$want" ]; then
  echo "setup_env.sh: installing requirements.txt and the package into .venv (first time: several minutes, torch is large)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, torchvision, einops, yaml, timm, sparse_mim, fgvc" \
    || { echo "setup_env.sh: the install did not complete (see pip's messages above)" >&2; exit 1; }
  .venv/bin/python -c "import spconv.pytorch" 2>/dev/null \
    || echo "setup_env.sh: spconv is not installed for this Python: the CPU path works; the CUDA sparse path needs Python 3.11 (pip install '.[spconv]')" >&2
  echo "$want" > .venv/.requirements.sha256
fi
