#!/usr/bin/env bash
# One-command set-up: a virtual environment at .venv with nnfiltermatch installed (CPU torch unless TORCH_SPEC says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned, so nothing later can replace it with a CUDA build.
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/nnfiltermatch --version
