#!/usr/bin/env bash
# The issue's user command with today's default DCIL (dcil_preset=robust): the MNIST-1D CNN at the
# recipe's learning rate 0.2, 90 % sparsity, 30 epochs, seeds 0-4. Appends one JSON line per run
# to results/dcil_robustness/default_lr0.2.jsonl (final sparse-path test top-1, NaN stop if any).
#   bash results/dcil_robustness/default_lr0.2.sh [WORKROOT]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:-runs/default_lr0.2}
out=results/dcil_robustness/default_lr0.2.jsonl
mkdir -p "${root}"
for seed in 0 1 2 3 4; do
  workdir="${root}/seed${seed}"
  start=$(date +%s)
  python -m experiments.mnist1d --workdir="${workdir}" --config.method=dcil \
    --config.sparsity=0.9 --config.learning_rate=0.2 --config.warmup_init_lr=0.1 \
    --config.seed="${seed}" >"${workdir}.log" 2>&1 || true  # a NaN stop is a result too
  python results/dcil_robustness/record.py "${workdir}" "$(( $(date +%s) - start ))" \
    seed="${seed}" preset="robust (default)" lr=0.2 sparsity=0.9 >>"${out}"
done
