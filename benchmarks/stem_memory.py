"""Step memory of sequential DCIL on a user's own ResNet-like model, by stem: compile-only.

  python -m benchmarks.stem_memory            # writes benchmarks/results/stem_memory_cpu.{md,json}

The "sequential" strategy aims at the step memory of dense training. How close it gets depends on
the model on CPU (whose form is the unrolled one, :func:`dcil_jax.default_strategy`): XLA:CPU
places operand-free buffers (a pooling gradient's index arrays, zero broadcasts) at the start of
the step, where they overlap the other path's peak. This measures it on a small own ResNet (no
zoo model) whose stem is a max-pool, an average pool or a strided convolution, for both forms of
``"sequential"``, against dense training with the same optimizer. Memory is XLA's
``memory_analysis`` of the compiled ``train_step`` (temp + arguments + outputs): deterministic,
so it does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import dcil_jax
from benchmarks.common import MB, log, machine_info, memory_stats

RESULTS = Path(__file__).parent / "results"
STEMS = ("max_pool", "avg_pool", "strided_conv")
CONFIGS = (
  ("dense", None),
  ("dcil", "sequential_unrolled"),  # the CPU form
  ("dcil", "sequential_loop"),  # the accelerator form
  ("dcil", "unrolled"),
)


class Block(nn.Module):
  width: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(self.width, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
    y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.width, (1, 1), self.strides, use_bias=False)(x)
    return nn.relu(x + y)


class OwnResNet(nn.Module):
  """A small ImageNet-style ResNet written as a user would: a 7x7/2 conv stem, then ``stem``
  (a 3x3/2 max-pool, a 3x3/2 average pool, or a 3x3/2 convolution), then 3 stages."""

  stem: str = "max_pool"
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(32, (7, 7), 2, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    if self.stem == "max_pool":
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    elif self.stem == "avg_pool":
      x = nn.avg_pool(x, (3, 3), (2, 2), padding="SAME")
    else:
      x = nn.relu(nn.Conv(32, (3, 3), 2, use_bias=False)(x))
    for i, width in enumerate((32, 64, 128)):
      x = Block(width, 1 if i == 0 else 2)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def measure(stem: str, method: str, strategy: str | None, batch: int, size: int) -> dict[str, Any]:
  model = OwnResNet(stem)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  parts = [optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True)]
  if method != "dense":
    parts.append(dcil_jax.masked_update(dcil_jax.constant_sparsity(0.9)))
  state = dcil_jax.TrainState.create(
    model,
    variables,
    optax.chain(*parts),
    method=method,
    strategy=strategy,
    example_input=jnp.zeros((1, size, size, 3)),
  )
  shapes = {
    "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
    "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
  }
  t = time.perf_counter()
  memory = memory_stats(dcil_jax.train_step.lower(state, shapes).compile())
  return {"memory": memory, "compile_s": time.perf_counter() - t}


def report(result: dict[str, Any]) -> str:
  lines = [
    "# Sequential DCIL step memory by stem (CPU, compile-only)",
    "",
    f"Written by `python -m benchmarks.stem_memory` on {result['date']} (jax "
    f"{result['machine']['jax']}); "
    f"model `OwnResNet` (benchmarks/stem_memory.py), batch {result['batch']}, "
    f"{result['size']}x{result['size']}x3 images, 90 % sparsity. Memory = XLA `memory_analysis` "
    "(temp + arguments + outputs) of the compiled `train_step`; ratios against dense training "
    "of the same model and optimizer.",
    "",
    "| stem | dense (MiB) | sequential, CPU form | sequential, loop form | unrolled |",
    "|---|---|---|---|---|",
  ]
  for stem in result["stems"]:
    rows = {r["label"]: r for r in result["records"] if r["stem"] == stem}
    dense = rows["dense"]["memory"]["total_bytes"]

    def ratio(label: str, rows=rows, dense=dense) -> str:
      return f"{rows[label]['memory']['total_bytes'] / dense:.3f}x"

    lines.append(
      f"| {stem} | {dense / MB:.0f} | {ratio('dcil/sequential_unrolled')} | "
      f"{ratio('dcil/sequential_loop')} | {ratio('dcil/unrolled')} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=128, help="image side (default 128)")
  p.add_argument("--stems", default=",".join(STEMS))
  p.add_argument("--out", default=str(RESULTS / "stem_memory_cpu"))
  args = p.parse_args(argv)
  stems = args.stems.split(",")
  records = []
  for stem in stems:
    for method, strategy in CONFIGS:
      label = method if strategy is None else f"{method}/{strategy}"
      log(f"{stem} {label}: compiling at batch {args.batch}")
      records.append(
        {"stem": stem, "label": label, **measure(stem, method, strategy, args.batch, args.size)}
      )
      gc.collect()
  result = {
    "date": time.strftime("%Y-%m-%d"),
    "machine": machine_info(),
    "batch": args.batch,
    "size": args.size,
    "stems": stems,
    "records": records,
  }
  Path(args.out + ".json").write_text(json.dumps(result, indent=2))
  Path(args.out + ".md").write_text(report(result))
  print(report(result))


if __name__ == "__main__":
  main()
