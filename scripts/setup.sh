#!/usr/bin/env bash
# One-command set-up: a virtual environment at .venv with nnfiltermatch and its pinned dependencies.
# torch 2.14.1 by default: PyPI's build (CUDA 13), which also runs on a machine without a GPU, and has a torchvision
# (0.29.1) that imports beside it, so nnU-Net's own nnUNetv2_* commands work on our model folders (6.4 GB venv).
# TORCH_SPEC="torch==2.13.0" takes this project's CPU machines' local 2.13.0+cpu wheel instead (2 GB venv; the CPU
# benchmarks ran on it), whose only torchvision is PyPI's CUDA build: nnU-Net's trainer lookup then fails.
# TORCHVISION_SPEC: the torchvision installed beside it (nnU-Net's trainer lookup imports its Primus trainers, which
# import timm and so torchvision). By default the release built for TORCH_SPEC's torch: torch 2.N goes with
# torchvision 0.(N+15), e.g. torch==2.14.1 -> torchvision==0.29.*, torch==2.9.1 -> torchvision==0.24.*; set it
# yourself for a torch spec that is not torch==2.N[.x].
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
if [ -z "${TORCHVISION_SPEC:-}" ]; then
  if [[ "$TORCH_SPEC" =~ ^torch==2\.([0-9]+)(\.|\+|$) ]]; then
    TORCHVISION_SPEC="torchvision==0.$((BASH_REMATCH[1] + 15)).*"
  else
    echo "TORCH_SPEC=$TORCH_SPEC: set TORCHVISION_SPEC as well (the torchvision release built for that torch)" >&2
    exit 2
  fi
fi

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
# torch and torchvision first and pinned, then everything else under the same pins, so no step can swap in another
# torch or torchvision build.
pins=$(mktemp)
{ cat constraints.txt; echo "$TORCH_SPEC"; echo "$TORCHVISION_SPEC"; } >"$pins"
pip_quiet -c "$pins" "$TORCH_SPEC" "$TORCHVISION_SPEC"
pip_quiet -c "$pins" -e ".[dev]"
rm -f "$pins"
.venv/bin/python -c "import torch, nnunetv2; print('torch', torch.__version__, '| nnunetv2 ok')"
# nnfiltermatch itself never imports torchvision; nnU-Net's own commands (nnUNetv2_predict -tr ..., nnUNetv2_train)
# do, through their trainer lookup. A torchvision whose C++ ops were built for another torch build fails there with
# "operator torchvision::nms does not exist": say so here rather than in the middle of a user's nnUNetv2_predict.
if tv=$(.venv/bin/python -c "import torchvision; print(torchvision.__version__)" 2>&1); then
  echo "torchvision $tv"
else
  echo "WARNING: torchvision ($TORCHVISION_SPEC) does not import beside this torch: $(tail -n 1 <<<"$tv")" >&2
  echo "  nnfiltermatch works; nnU-Net's own nnUNetv2_* commands that look up a trainer will fail. Choose a torch" >&2
  echo "  build that has a torchvision for it (TORCH_SPEC, TORCHVISION_SPEC; README, Predict: nnU-Net's own tools" >&2
  echo "  on our model folders) and rerun." >&2
fi
.venv/bin/nnfiltermatch --version
