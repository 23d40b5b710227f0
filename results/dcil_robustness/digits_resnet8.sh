#!/usr/bin/env bash
# Digits ResNet-8 (BatchNorm) at its recipe (lr 0.2, 60 epochs), 90 % sparsity: the official DCIL
# against the default robust one (step bound 0.2), same seeds. One JSON line per run in
# results/dcil_robustness/digits_resnet8.jsonl.
#   bash results/dcil_robustness/digits_resnet8.sh [WORKROOT] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:-runs/digits_resnet8_bound}
seeds=${2:-0 1}
out=results/dcil_robustness/digits_resnet8.jsonl
mkdir -p "${root}"
for seed in ${seeds}; do
  for preset in official robust; do
    workdir="${root}/${preset}_seed${seed}"
    start=$(date +%s)
    python -m experiments.digits --workdir="${workdir}" \
      --config=experiments/configs/digits.py:resnet8 --config.method=dcil --config.sparsity=0.9 \
      --config.dcil_preset="${preset}" --config.seed="${seed}" --config.run.progress=false \
      >"${workdir}.log" 2>&1 || true  # a NaN stop is a result too
    python results/dcil_robustness/record.py "${workdir}" "$(( $(date +%s) - start ))" \
      model=resnet8 seed="${seed}" preset="${preset}" sparsity=0.9 >>"${out}"
  done
done
