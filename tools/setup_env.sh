#!/usr/bin/env bash
# Create (or update) the project-local virtual environment .venv from requirements.txt.
# Idempotent: re-running it is cheap when requirements.txt has not changed.
# Python 3.11 is required (spconv-cu120's wheels stop at CPython 3.11); set PYTHON to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$cand; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup_env.sh: Python 3.11 not found (spconv-cu120 has wheels for CPython <= 3.11). Install it, or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup_env.sh: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null || true)" != "$want" ]; then
  echo "setup_env.sh: installing requirements.txt into .venv (first time: several minutes, torch is large)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, torchvision, spconv.pytorch, einops, yaml, timm" 2>/dev/null \
    || { echo "setup_env.sh: the install did not complete (see pip's messages above)" >&2; exit 1; }
  echo "$want" > .venv/.requirements.sha256
fi
