"""Inference speed of dense and compact models on this CPU, in XLA:CPU (JAX) and onnxruntime.

Run ``python -m benchmarks.inference`` (``--help`` for options). Writes
``<out>/inference_cpu.json`` and ``<out>/inference_cpu.md``.

Models: the small CNN trained on scikit-learn's digits (a short dense training here, so its
filter masks come from trained weights) and ResNet-32 at CIFAR's shape with random weights
(Kaiming-normal kernels, random BatchNorm statistics; no CIFAR data is at hand offline: its
masks say where a criterion puts the pruned filters, not which are right). Filter masks prune
30/40/50 % of the conv filters with each *allocation criterion*:

- ``global``: today's allocation, :func:`dcil_jax.granularity.filter_masks` (one mean-``|w|``
  threshold over all convs, the official rule);
- ``groups``: :func:`dcil_jax.deploy.allocation.cost_aware_filter_masks` with
  ``cost_weight=0``: coupled channel groups (a residual stream's writers together), scores
  normalised per layer;
- ``groups+macs``: the same with ``cost_weight=0.5``: a group's score divided by the square
  root of the MACs its removal saves (relative to the mean), so pruned filters land where they
  pay.

Each masked model is compacted (:func:`dcil_jax.deploy.compact`), checked against the masked
model, and timed jitted in JAX and as ONNX (:func:`dcil_jax.deploy.to_onnx`) in onnxruntime, at
batch 1 and 128, round-robin over all models (so drift of a shared machine cancels in the
ratios), each a median of ``--rounds`` calls; ratios are medians of per-round ratios to the
dense model in the same runtime. For the digits model the held-out accuracy is recorded after
``--finetune-epochs`` of masked fine-tuning (Adam, pruned weights kept at zero), and before it
(one-shot) in parentheses: masks of a trained model, not DCIL's own training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import optax

import dcil_jax
from dcil_jax import granularity as gr
from dcil_jax import models
from dcil_jax.deploy import compact, cost_aware_filter_masks, deploy_stats, masked_function, to_onnx

TARGET_SPEEDUP = 1.4  # compact vs dense at batch 128, 40 % of filters (the goal)
CRITERIA = ("global", "groups", "groups+macs")


def conv_kernels(path, leaf):
  """Convolution kernels (the zoo's Dense heads are 2-D)."""
  return path[-1].key == "kernel" and leaf.ndim >= 3


def random_variables(model: Any, shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
  """Kaiming-normal (fan-out) kernels and random BN statistics, from the shapes alone."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if name == "['kernel']":
      fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1] if leaf.ndim > 2 else leaf.shape[0]
      return rng.normal(size=leaf.shape, scale=np.sqrt(2.0 / fan_out)).astype(np.float32)
    if name in ("['var']", "['scale']"):
      return rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
    return rng.normal(size=leaf.shape, scale=0.1).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


def digits_data() -> tuple[np.ndarray, ...]:
  """scikit-learn's digits, shuffled: 80 % to train, 20 % held out."""
  from sklearn.datasets import load_digits

  data = load_digits()
  x = (data.images[..., None] / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  split = int(0.8 * len(x))
  return x[:split], y[:split], x[split:], y[split:]


def train(model, variables, x, y, epochs: int, masks: Any = None) -> dict[str, Any]:
  """Adam on batches of 64; with ``masks``, pruned weights stay zero (masked fine-tuning)."""
  tx = optax.adam(1e-3)
  params, stats = variables["params"], variables["batch_stats"]
  if masks is not None:
    params = dcil_jax.apply_masks(params, masks)
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, xb, yb):
    def loss(p):
      logits, new = model.apply(
        {"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new

    (_, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    if masks is not None:
      params = dcil_jax.apply_masks(params, masks)
    return params, new["batch_stats"], opt

  for _ in range(epochs):
    for i in range(0, len(x) - 63, 64):
      params, stats, opt = step(params, stats, opt, x[i : i + 64], y[i : i + 64])
  return {"params": params, "batch_stats": stats}


def make_masks(criterion, model, variables, template, fraction, shape):
  if criterion == "global":
    return gr.filter_masks(variables["params"], template, fraction)
  weight = {"groups": 0.0, "groups+macs": 0.5}[criterion]
  return cost_aware_filter_masks(model, variables, template, fraction, shape, cost_weight=weight)


def configs_for(
  name, model, variables, shape, fractions, data=None, finetune_epochs=0
) -> list[dict[str, Any]]:
  template = dcil_jax.masks_like(variables["params"], conv_kernels)
  dense_macs = deploy_stats(model, variables, shape)["macs"]
  dense_fn = masked_function(model, variables)
  configs = [{"model": name, "label": "dense", "fn": dense_fn, "macs": dense_macs, "shape": shape}]
  accuracy = lambda fn: float(np.mean(np.argmax(jax.jit(fn)(data[2]), -1) == data[3]))
  if data is not None:
    configs[0]["accuracy"] = accuracy(dense_fn)
  for criterion in CRITERIA:
    for fraction in fractions:
      masks = make_masks(criterion, model, variables, template, fraction, shape)
      c = compact(model, variables, masks, shape)
      masked = masked_function(model, variables, masks)
      x = np.random.default_rng(1).normal(size=(4, *shape)).astype(np.float32)
      diff = float(jnp.max(jnp.abs(jax.jit(c.apply)(x) - jax.jit(masked)(x))))
      config = {
        "model": name,
        "label": f"{criterion} {round(100 * fraction)}%",
        "criterion": criterion,
        "fraction": fraction,
        "fn": c.apply,
        "macs": deploy_stats(c.module, c.variables, shape)["macs"],
        "filters": c.report["filters"],
        "pruned": c.report["pruned"],
        "removed": c.report["removed"],
        "max_abs_logit_diff": diff,
        "shape": shape,
      }
      if data is not None:
        config["accuracy_one_shot"] = accuracy(masked)
        tuned = train(model, variables, data[0], data[1], finetune_epochs, masks)
        config["accuracy"] = accuracy(masked_function(model, tuned, masks))
      configs.append(config)
  return configs


def time_all(configs: list[dict[str, Any]], batch: int, rounds: int) -> None:
  """Median seconds per call, JAX and onnxruntime, round-robin; ratios per round to dense."""
  for c in configs:
    x = np.random.default_rng(2).normal(size=(batch, *c["shape"])).astype(np.float32)
    jitted = jax.jit(c["fn"])
    jax.block_until_ready(jitted(x))
    c.setdefault("_runners", {})[batch] = {
      "jax": lambda jitted=jitted, x=x: jax.block_until_ready(jitted(x)),
      "onnxruntime": (lambda s=c["_session"], x=x: s.run(None, {"x": x})),
    }
    c["_runners"][batch]["onnxruntime"]()
  times = {(id(c), rt): [] for c in configs for rt in ("jax", "onnxruntime")}
  for _ in range(rounds):
    for c in configs:
      for rt, run in c["_runners"][batch].items():
        start = time.perf_counter()
        run()
        times[(id(c), rt)].append(time.perf_counter() - start)
  for c in configs:
    dense = next(d for d in configs if d["model"] == c["model"] and d["label"] == "dense")
    for rt in ("jax", "onnxruntime"):
      t, base = np.asarray(times[(id(c), rt)]), np.asarray(times[(id(dense), rt)])
      c.setdefault("median_s", {})[f"{rt} b{batch}"] = float(np.median(t))
      c.setdefault("speedup", {})[f"{rt} b{batch}"] = float(np.median(base / t))


def report(result: dict[str, Any]) -> str:
  """The Markdown table of a result (``inference_cpu.json``)."""
  m = result["machine"]
  keys = [f"{rt} b{b}" for rt in ("jax", "onnxruntime") for b in result["batches"]]
  lines = [
    "# Inference on CPU: dense vs compact, by filter allocation criterion",
    "",
    f"Measured {result['date']} by `python -m benchmarks.inference` on {m['cpu']} "
    f"({m['cores']} cores; load average {m['load_average_start'][0]:.1f} at the start, "
    f"{result['load_average_end'][0]:.1f} at the end: a shared machine, so ratios are medians "
    f"of per-round ratios over {result['rounds']} rounds), jax {m['jax']}, flax {m['flax']}, "
    f"onnxruntime {m['onnxruntime']}.",
    "",
    "Allocation criteria (see the module docstring of `benchmarks/inference.py`): **global** = "
    "today's `filter_masks` (one mean-|w| threshold over all convs); **groups** = "
    "`cost_aware_filter_masks(cost_weight=0)` (coupled channel groups, per-layer-normalised "
    "scores); **groups+macs** = `cost_aware_filter_masks(cost_weight=0.5)` (score divided by "
    "the square root of the MACs saved).",
    "",
    "Speed-up = dense time / compact time in the same runtime and batch (higher is faster).",
    "",
  ]
  for name in dict.fromkeys(c["model"] for c in result["configs"]):
    lines += [f"## {name}", ""]
    head = "| model | pruned / removed of filters | MACs (M) | acc. (one-shot) | "
    lines += [head + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
    for c in result["configs"]:
      if c["model"] != name:
        continue
      filt = f"{c['pruned']} / {c['removed']} of {c['filters']}" if "pruned" in c else "-"
      acc = f"{100 * c['accuracy']:.1f} %" if "accuracy" in c else "-"
      if "accuracy_one_shot" in c:
        acc += f" ({100 * c['accuracy_one_shot']:.1f} %)"
      speed = " | ".join(f"{c['speedup'][k]:.2f}× ({1e3 * c['median_s'][k]:.2f} ms)" for k in keys)
      lines.append(f"| {c['label']} | {filt} | {c['macs'] / 1e6:.2f} | {acc} | {speed} |")
    lines.append("")
  goal = result["goal"]
  measured = ", ".join(
    f"{k} {v:.2f}× ({'met' if v >= goal['speedup'] else 'not met'})"
    for k, v in goal["at_40"].items()
  )
  lines += [
    f"Goal: compact ≥ {goal['speedup']}× dense at 40 % of filters, batch 128, on "
    f"{goal['model']}: {measured}.",
    "",
    f"Max |logit difference| compact vs masked over all configs: {result['max_diff']:.1e}.",
    "",
    result.get("notes", ""),
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  parser.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.4, 0.5])
  parser.add_argument("--digits-epochs", type=int, default=15)
  parser.add_argument("--finetune-epochs", type=int, default=5)
  parser.add_argument("--models", nargs="+", default=["digits_small_cnn", "resnet32"])
  parser.add_argument("--notes", default="")
  args = parser.parse_args(argv)
  machine = {
    "cpu": platform.processor() or platform.machine(),
    "cores": os.cpu_count(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "onnxruntime": onnxruntime.__version__,
    "load_average_start": os.getloadavg(),
  }
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        machine["cpu"] = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  configs = []
  if "digits_small_cnn" in args.models:
    data = digits_data()
    model = models.SmallCNN(num_classes=10)
    initial = model.init(jax.random.PRNGKey(0), data[0][:1])
    variables = train(model, initial, data[0], data[1], args.digits_epochs)
    configs += configs_for(
      "digits_small_cnn", model, variables, (8, 8, 1), args.fractions, data, args.finetune_epochs
    )
  if "resnet32" in args.models:
    model = models.resnet32(num_classes=10)
    variables = random_variables(model, (32, 32, 3))
    configs += configs_for("resnet32", model, variables, (32, 32, 3), args.fractions)
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = os.cpu_count() or 1
  for c in configs:
    onnx_model = to_onnx(c["fn"], c["shape"])
    c["onnx_bytes"] = len(onnx_model.SerializeToString())
    c["_session"] = onnxruntime.InferenceSession(
      onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
  for batch in args.batches:
    time_all(configs, batch, args.rounds)
  goal_model = "resnet32" if "resnet32" in args.models else args.models[0]
  at40 = {
    f"{c['criterion']}, {rt}": c["speedup"][f"{rt} b128"]
    for c in configs
    for rt in ("jax", "onnxruntime")
    if c["model"] == goal_model and c.get("fraction") == 0.4 and f"{rt} b128" in c["speedup"]
  }
  result = {
    "date": datetime.date.today().isoformat(),
    "machine": machine,
    "load_average_end": os.getloadavg(),
    "rounds": args.rounds,
    "batches": args.batches,
    "notes": args.notes,
    "goal": {"speedup": TARGET_SPEEDUP, "model": goal_model, "at_40": at40},
    "max_diff": max(c.get("max_abs_logit_diff", 0.0) for c in configs),
    "configs": [
      {k: v for k, v in c.items() if not k.startswith("_") and k != "fn"} for c in configs
    ],
  }
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "inference_cpu.json").write_text(json.dumps(result, indent=1))
  (out / "inference_cpu.md").write_text(report(result))
  print(report(result))
  return result


if __name__ == "__main__":
  main()
