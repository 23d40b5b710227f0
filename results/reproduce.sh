#!/usr/bin/env bash
# Reproduces results/: the tuned MNIST-1D study, the digits study, its follow-up ablations, the
# first MNIST-1D study, then the report.
#   tuned MNIST-1D (experiments.fast_sweep): the paper's CNN and a 1-D ResNet; dense, GMP, RigL,
#   DPF, DCIL-official, DCIL-robust; sparsities 0.8-0.98; learning rates 0.02/0.05/0.1/0.2 chosen
#   on a validation split; seeds 0-4 (840 runs; one JSON file per finished cell, rerun to
#   continue). TUNED_ONLY=1 runs only this part and the report.
#   digits: small CNN and ResNet-8; dense, DPF, DCIL; sparsities 0.5-0.98; seeds 0-2 (66 runs)
#   ablations at 98 %: layer-wise sparsity (DPF and DCIL), and DCIL without distillation
#   MNIST-1D: the paper's CNN (seeds 0-4) and a 1-D ResNet (seeds 0-2); dense, GMP, RigL, DPF,
#   DCIL; sparsities 0.8-0.98 (136 runs); filter DPF vs filter DCIL at 30/40/50 % of filters,
#   seeds 0-2 (18 runs)
# About 45 minutes (digits) + 90 minutes (MNIST-1D, two shards in parallel) on 2 CPU cores.
# Rerun to continue: finished runs are skipped and an interrupted one continues from its
# checkpoint. SHARDS=1 runs the MNIST-1D grid in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
m1d=experiments/configs/mnist1d.py
tuned() {  # one model's grid; the two DCIL presets in a second process
  local dir="results/mnist1d_tuned_$1"
  nice -n 10 python -m experiments.fast_sweep --workdir="${dir}" --config="${m1d}:$1" \
    --config.dataset=mnist1d_val --methods=dense,gmp,rigl,dpf,dcil \
    --sparsities=0.9,0.98,0.8,0.95 --progress=false &
  local first=$!
  nice -n 10 python -m experiments.fast_sweep --workdir="${dir}" --config="${m1d}:$1" \
    --config.dataset=mnist1d_val --methods=dcil_robust --sparsities=0.9,0.98,0.8,0.95 \
    --progress=false &
  local second=$!
  wait "${first}"  # a failed process fails the script
  wait "${second}"
}
tuned cnn &
cnn=$!
tuned resnet1d &
resnet=$!
wait "${cnn}"
wait "${resnet}"
tuned_dirs=results/mnist1d_tuned_cnn,results/mnist1d_tuned_resnet1d
report() {
  python -m experiments.report results/mnist1d_cnn results/mnist1d_resnet1d \
    results/mnist1d_filter results/digits_small_cnn results/digits_resnet8 \
    results/ablation_layerwise results/ablation_no_kd --out=results --notes=results/NOTES.md \
    --tuned="${tuned_dirs}"
}
if [[ "${TUNED_ONLY:-0}" == 1 ]]; then
  report
  exit 0
fi
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
mnist1d_sweeps() {  # shard k of n
  for model_seeds in cnn:0,1,2,3,4 resnet1d:0,1,2; do
    model=${model_seeds%%:*}
    python -m experiments.sweep --workdir="results/mnist1d_${model}" --config="${m1d}:${model}" \
      --methods=dense,gmp,rigl,dpf,dcil --sparsities=0.8,0.9,0.95,0.98 \
      --seeds="${model_seeds#*:}" --shard="$1/$2" --progress=false
  done
  python -m experiments.sweep --workdir=results/mnist1d_filter --config="${m1d}:resnet1d" \
    --config.granularity=filter --methods=dpf,dcil --sparsities=0.3,0.4,0.5 \
    --seeds=0,1,2 --shard="$1/$2" --progress=false
}
shards=${SHARDS:-2}
pids=()
for ((k = 0; k < shards; k++)); do
  mnist1d_sweeps "$k" "$shards" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed shard fails the script
report
