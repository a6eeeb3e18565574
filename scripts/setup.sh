#!/usr/bin/env bash
# One-command set-up: a virtual environment at .venv with nnfiltermatch and its pinned dependencies.
# CPU torch by default; on a GPU machine run e.g. TORCH_SPEC="torch==2.9.1" bash scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

# pip, with this machine's noise about local index folders filtered out; failures still stop the script.
pip_quiet() {
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install --quiet "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    return 1
  fi
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned, then everything else under the same pin, so no step can swap in another torch build.
pins=$(mktemp)
{ cat constraints.txt; echo "$TORCH_SPEC"; } >"$pins"
pip_quiet "$TORCH_SPEC"
pip_quiet -c "$pins" -e ".[dev]"
rm -f "$pins"
.venv/bin/python -c "import torch, nnunetv2; print('torch', torch.__version__, '| nnunetv2 ok')"
.venv/bin/nnfiltermatch --version
