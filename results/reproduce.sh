#!/usr/bin/env bash
# Reproduces results/: the digits study, its follow-up ablations, then the report.
#   study: small CNN and ResNet-8; dense, DPF, DCIL; sparsities 0.5-0.98; seeds 0-2 (66 runs)
#   ablations at 98 %: layer-wise sparsity (DPF and DCIL), and DCIL without distillation
# About 45 minutes on 2 CPU cores. Rerun to continue: finished runs are skipped and an
# interrupted one continues from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
config=experiments/configs/digits.py
for model in small_cnn resnet8; do
  python -m experiments.sweep --workdir="results/digits_${model}" \
    --config="${config}:${model}" --seeds=0,1,2
done
python -m experiments.sweep --workdir=results/ablation_layerwise \
  --config="${config}:small_cnn" --config.distribution=layerwise \
  --methods=dpf,dcil --sparsities=0.98 --seeds=0,1,2
python -m experiments.sweep --workdir=results/ablation_no_kd \
  --config="${config}:small_cnn" --config.kd_start_epoch=60 \
  --methods=dcil --sparsities=0.98 --seeds=0,1,2
python -m experiments.report results/digits_small_cnn results/digits_resnet8 \
  results/ablation_layerwise results/ablation_no_kd --out=results --notes=results/NOTES.md
