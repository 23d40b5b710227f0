"""DCIL step time of the same ResNet-20 written in Flax NNX and in Linen, in one process.

  python -m benchmarks.nnx_step_time   # writes benchmarks/results/nnx_step_time_cpu.{md,json}

Both models are the CIFAR ResNet-20 of ``dcil_jax.models`` (the NNX one is written here with the
same layers and parameter names, and gets the Linen model's weights); the state, optimizer and
batch are the step-time benchmark's. The steps are timed round-robin, so load hits both alike.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import dcil_jax
from benchmarks.step_time import make_problem, make_tx

OUT = Path(__file__).parent / "results"


class Block(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(  # noqa: E731
      i, o, (k, k), strides=s, padding=k // 2, use_bias=False, rngs=rngs
    )
    bn = lambda c: nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)  # noqa: E731
    self.conv1, self.bn1 = conv(cin, cout, 3, stride), bn(cout)
    self.conv2, self.bn2 = conv(cout, cout, 3, 1), bn(cout)
    projection = stride != 1 or cin != cout
    self.short_conv = conv(cin, cout, 1, stride) if projection else None
    self.short_bn = bn(cout) if projection else None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    s = x if self.short_conv is None else self.short_bn(self.short_conv(x))
    return nnx.relu(y + s)


class ResNet20(nnx.Module):
  """ResNet-20 (3 stages of 3 basic blocks, 16/32/64 planes) in NNX."""

  def __init__(self, rngs: nnx.Rngs, num_classes: int = 10):
    self.stem = nnx.Conv(3, 16, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.9, epsilon=1e-5, rngs=rngs)
    blocks, cin = [], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
      for i in range(3):
        blocks.append(Block(cin, cout, stride if i == 0 else 1, rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def main(rounds: int = 12) -> dict:
  linen_model, linen_variables, batch = make_problem("resnet20")
  nnx_model, nnx_variables = dcil_jax.from_nnx(ResNet20(nnx.Rngs(0)))
  states = {
    "linen": dcil_jax.TrainState.create(
      linen_model, linen_variables, make_tx(), example_input=batch["image"][:1]
    ),
    "nnx": dcil_jax.TrainState.create(nnx_model, nnx_variables, make_tx()),
  }
  params = {k: sum(x.size for x in jax.tree.leaves(s.params)) for k, s in states.items()}
  for name, state in states.items():  # compile and warm up
    for _ in range(2):
      state, metrics = dcil_jax.train_step(state, batch)
    jax.block_until_ready(metrics)
    states[name] = state
  times = {k: [] for k in states}
  for _ in range(rounds):
    for name in states:
      t = time.perf_counter()
      states[name], metrics = dcil_jax.train_step(states[name], batch)
      jax.block_until_ready((states[name], metrics))
      times[name].append(time.perf_counter() - t)
  ratios = [n / li for n, li in zip(times["nnx"], times["linen"])]
  result = {
    "machine": {
      "platform": platform.platform(),
      "backend": jax.default_backend(),
      "cpus": jax.device_count(),
    },
    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    "batch": int(batch["label"].shape[0]),
    "params": params,
    "median_s": {k: float(np.median(v)) for k, v in times.items()},
    "iqr_s": {k: float(np.subtract(*np.percentile(v, [75, 25]))) for k, v in times.items()},
    "nnx_over_linen_per_round_median": float(np.median(ratios)),
    "rounds": rounds,
  }
  OUT.mkdir(exist_ok=True)
  (OUT / "nnx_step_time_cpu.json").write_text(json.dumps(result, indent=1))
  m, q = result["median_s"], result["iqr_s"]
  lines = [
    "# DCIL step time: ResNet-20 in Flax NNX vs Linen",
    "",
    f"- {result['machine']['platform']}, backend `{result['machine']['backend']}`, "
    f"{result['date_utc']} UTC; command `python -m benchmarks.nnx_step_time`",
    f"- DCIL (default strategy), batch {result['batch']}, the step-time benchmark's optimizer; "
    f"{rounds} rounds after 2 warm-up steps, round-robin; same number of lifted parameters: "
    f"{params['linen'] == params['nnx']} ({params['nnx']:,})",
    "",
    "| model | median ms | IQR ms | x Linen (per-round median) |",
    "|---|---:|---:|---:|",
    f"| Linen | {m['linen'] * 1e3:.1f} | {q['linen'] * 1e3:.1f} | 1.00 |",
    f"| NNX | {m['nnx'] * 1e3:.1f} | {q['nnx'] * 1e3:.1f} | "
    f"**{result['nnx_over_linen_per_round_median']:.2f}** |",
  ]
  (OUT / "nnx_step_time_cpu.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return result


if __name__ == "__main__":
  main()
