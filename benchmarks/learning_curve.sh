#!/usr/bin/env bash
# The supervised learning curve that chose the cpu-long schedule (BENCHMARKS.md s.0): DATASET (default hippocampus)
# at LABELED (default 10pct), the profile's configuration,
# evaluated on the 20 validation cases held out of the training pool (the test cases are not read).
# Each schedule is its own resumable run.py folder: results/<dataset>/cpu-long_<E>x100/<labeled>_validation/;
# then .venv/bin/python benchmarks/learning_curve.py tabulates and plots them.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-0}"
for epochs in ${EPOCHS:-25 50 100 200 400}; do
  .venv/bin/python benchmarks/run.py --dataset "${DATASET:-hippocampus}" --labeled "${LABELED:-10pct}" --profile cpu-long \
    --split validation --modes supervised --seeds $SEEDS --epochs "$epochs" --iters-per-epoch 100 --cost-steps 0
done
