"""Quickstart: dense vs DPF vs DCIL on scikit-learn's digits, offline, in a few CPU minutes.

``python -m experiments.quickstart`` trains :class:`dcil_jax.models.SmallCNN` three times from the
same initialisation and on the same minibatch sequence — dense, DPF and DCIL at 90% sparsity —
using nothing but the public ``dcil_jax`` API, then prints a table and writes ``results.json`` and
``curves.png`` to ``--workdir``. The data is real (1,797 8x8 digits shipped with scikit-learn), so
the run needs no network and the numbers mean something; the recipe is the official CIFAR one
(SGD Nesterov, cubic ramp, refresh every 16 steps, KD from ~1/4 of training) scaled down.

Tests call :func:`run` directly: it does everything without parsing flags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dcil_jax
from dcil_jax.models import SmallCNN

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
# Train metrics fetched to the host at eval points (the others stay on device and are dropped).
TRAIN_METRIC_KEYS = ("loss", "ce_sparse", "accuracy_sparse", "mask_refreshed", "flip_rate")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on; written verbatim to ``results.json``."""

  methods: tuple[str, ...] = ("dense", "dpf", "dcil")
  sparsity: float = 0.9
  steps: int = 1000
  batch_size: int = 128
  eval_every: int = 50
  seed: int = 0  # model init and minibatch order (shared by all methods)
  split_seed: int = 0  # the train/test split stays fixed whatever ``seed`` is
  test_size: float = 0.2
  lr: float = 0.1
  warmup_frac: float = 0.05
  weight_decay: float = 5e-4
  momentum: float = 0.9
  update_every: int = 16
  ramp_frac: float = 0.65  # cubic ramp ends here (official: 225 of 300 epochs)
  kd_start_frac: float = 0.25  # mutual distillation from here (official: epoch 70 of 300)
  temperature: float = 2.0
  workdir: str | None = "runs/quickstart"
  progress: bool = True

  @property
  def ramp_steps(self) -> int:
    return max(1, round(self.ramp_frac * self.steps))

  @property
  def kd_start_step(self) -> int:
    return round(self.kd_start_frac * self.steps)

  @property
  def warmup_steps(self) -> int:
    return max(1, round(self.warmup_frac * self.steps))

  def validate(self) -> None:
    unknown = [m for m in self.methods if m not in dcil_jax.METHODS]
    if unknown or not self.methods:
      raise ValueError(f"methods must be a non-empty subset of {dcil_jax.METHODS}, got {unknown}.")
    if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1 or self.update_every < 1:
      raise ValueError("steps, eval_every, batch_size and update_every must be positive.")
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}.")


class Digits(NamedTuple):
  """The digits split: NHWC float32 images normalised with train statistics, int32 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  mean: float
  std: float


def load_digits_data(seed: int = 0, test_size: float = 0.2) -> Digits:
  """scikit-learn's digits with a fixed stratified split, so every method sees the same data.

  Pixels (0..16) are scaled to [0, 1], then standardised with the *train* set's mean and std
  (one channel, so one scalar each; per-pixel statistics would divide by zero on the always-blank
  border pixels).
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=test_size, random_state=seed, stratify=labels
  )
  mean, std = float(x_train.mean()), float(x_train.std())
  normalise = lambda x: ((x - mean) / std).astype(np.float32)
  return Digits(normalise(x_train), y_train, normalise(x_test), y_test, mean, std)


def batch_indices(num_examples: int, batch_size: int, rng: np.random.Generator) -> Iterator:
  """Epoch-wise reshuffled minibatch indices.

  The ragged tail of each epoch is dropped so every batch has the same shape and the train step
  compiles once; a new permutation each epoch means no example is left out for good.
  """
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples.")
  while True:
    perm = rng.permutation(num_examples)
    for i in range(num_examples // batch_size):
      yield perm[i * batch_size : (i + 1) * batch_size]


def make_optimizer(method: str, config: Config) -> optax.GradientTransformation:
  """The official recipe's optimizer, scaled down, with ``masked_update`` for DCIL and DPF."""
  lr_schedule = optax.warmup_cosine_decay_schedule(
    init_value=config.lr / 10,
    peak_value=config.lr,
    warmup_steps=config.warmup_steps,
    decay_steps=config.steps,
  )
  parts = [
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(lr_schedule, momentum=config.momentum, nesterov=True),
  ]
  if method != "dense":
    schedule = dcil_jax.cubic_sparsity(config.sparsity, ramp_steps=config.ramp_steps)
    parts.append(
      dcil_jax.masked_update(schedule, update_every=config.update_every, prunable=is_conv_kernel)
    )
  return optax.chain(*parts)


def is_conv_kernel(path: Any, leaf: Any) -> bool:
  """SmallCNN's convolution kernels (its one Dense kernel is 2-D)."""
  return dcil_jax.rules.all_kernels(path, leaf) and leaf.ndim == 4


def num_prunable(params: Any) -> int:
  """Number of entries the quickstart prunes (every conv kernel)."""
  return sum(m.size for m in jax.tree.leaves(dcil_jax.masks_like(params, is_conv_kernel)))


def zero_fraction(variables: dict[str, Any]) -> float:
  """Fraction of exact zeros among the conv kernels of exported variables: the real sparsity."""
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  conv = [np.asarray(x) for path, x in flat if is_conv_kernel(path, x)]
  return float(sum((x == 0).sum() for x in conv) / sum(x.size for x in conv))


def evaluate(state: dcil_jax.TrainState, test_batch: dict[str, jax.Array]) -> dict[str, float]:
  """Full-test-set metrics: the sparse path (deployable model), plus DCIL's dense path.

  Both use the masks the last step trained with (``state.trained_masks``), as the official code
  does, not the ones just refreshed for the next step.
  """
  out = {}
  for path in state.method.path_names:
    m = jax.device_get(dcil_jax.eval_step(state, test_batch, path=path))
    out[f"test_acc_{path}"] = float(m["top1"] / m["count"])
    out[f"test_loss_{path}"] = float(m["loss"] / m["count"])
  masks = state.trained_masks
  out["sparsity"] = 0.0 if masks is None else float(dcil_jax.sparsity(masks))
  return out


def train_method(
  method: str, config: Config, data: Digits, model: SmallCNN, variables: Any
) -> dict[str, Any]:
  """Trains one method from ``variables``; returns its final metrics and curves."""
  start = time.perf_counter()
  tx = make_optimizer(method, config)
  method_object = dcil_jax.get_method(method)
  if method == "dcil":
    method_object = dcil_jax.DCIL(
      kd_start_step=config.kd_start_step, temperature=config.temperature
    )
  state = dcil_jax.TrainState.create(
    model, variables, tx, method=method_object, rng=jax.random.PRNGKey(config.seed)
  )
  test_batch = {"image": jnp.asarray(data.x_test), "label": jnp.asarray(data.y_test)}
  # Same seed for every method: all three see the identical minibatch sequence.
  batches = batch_indices(len(data.y_train), config.batch_size, np.random.default_rng(config.seed))

  curves: dict[str, list] = {"eval_step": [], "train_step": [], "refresh_step": [], "flip_rate": []}
  curves |= {k: [] for k in ("train_loss", "train_ce_sparse", "train_acc_sparse")}

  def record_eval(step: int) -> dict[str, float]:
    metrics = evaluate(state, test_batch)
    curves["eval_step"].append(step)
    for k, v in metrics.items():
      curves.setdefault(k, []).append(v)
    return metrics

  record_eval(0)
  pending: list[dict[str, jax.Array]] = []  # device arrays since the last eval: no per-step sync
  startup_s = 0.0
  bar = _progress(config.steps, method, config.progress)
  for step in range(1, config.steps + 1):
    idx = next(batches)
    state, metrics = dcil_jax.train_step(
      state, {"image": data.x_train[idx], "label": data.y_train[idx]}
    )
    pending.append({k: metrics[k] for k in TRAIN_METRIC_KEYS if k in metrics})
    if step == 1:  # one sync: state creation + compilation, timed apart from training
      jax.block_until_ready(metrics)
      startup_s = time.perf_counter() - start
    if step % config.eval_every == 0 or step == config.steps:
      host = jax.device_get(pending)
      for offset, m in enumerate(host):
        s = step - len(host) + 1 + offset
        curves["train_step"].append(s)
        curves["train_loss"].append(float(m["loss"]))
        curves["train_ce_sparse"].append(float(m["ce_sparse"]))
        curves["train_acc_sparse"].append(float(m["accuracy_sparse"]))
        if bool(m.get("mask_refreshed", False)):  # refreshed for step s (1-based): after s - 1
          curves["refresh_step"].append(s - 1)
          curves["flip_rate"].append(float(m["flip_rate"]))
      pending = []
      ev = record_eval(step)
      postfix = {"loss": f"{curves['train_loss'][-1]:.3f}", "acc": f"{ev['test_acc_sparse']:.3f}"}
      if method != "dense":
        postfix["sparsity"] = f"{ev['sparsity']:.3f}"
      bar.set_postfix(postfix)
    bar.update(1)
  bar.close()
  train_time_s = time.perf_counter() - start

  final = {k: v[-1] for k, v in curves.items() if k.startswith(("test_", "sparsity"))}
  flips = np.asarray(curves["flip_rate"])
  refresh = np.asarray(curves["refresh_step"])
  # Refreshes whose old and new masks both sit at the final target: pure swaps, the stability
  # measure (during the ramp most flips are simply newly pruned weights).
  post = flips[refresh - config.update_every >= config.ramp_steps]
  final |= {
    "mean_flip_rate": float(flips.mean()) if flips.size else None,
    "mean_flip_rate_post_ramp": float(post.mean()) if post.size else None,
    "num_refreshes": int(flips.size),
    "exported_zero_fraction": zero_fraction(dcil_jax.export_variables(state)),
    "train_time_s": train_time_s,
    "startup_s": startup_s,
    "steps_per_s": (config.steps - 1) / max(train_time_s - startup_s, 1e-9),
  }
  return {"final": final, "curves": curves}


def _progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=f"{desc:>5}", disable=not enabled, dynamic_ncols=True)


def format_table(results: dict[str, Any]) -> str:
  """The per-method summary table printed at the end of a run."""
  header = (
    "method",
    "sparse acc",
    "dense acc",
    "sparsity",
    "flip (all)",
    "flip (post-ramp)",
    "train time (s)",
  )
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  rows = [header]
  for method, r in results["methods"].items():
    f = r["final"]
    rows.append(
      (
        method,
        fmt(f["test_acc_sparse"], ".4f"),
        fmt(f.get("test_acc_dense"), ".4f"),
        fmt(f["sparsity"], ".4f"),
        fmt(f["mean_flip_rate"], ".5f"),
        fmt(f["mean_flip_rate_post_ramp"], ".5f"),
        fmt(f["train_time_s"], ".1f"),
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: str) -> None:
  """Test accuracy, actual sparsity and mask flip rate against step, one line per method."""
  import matplotlib

  logging.getLogger("matplotlib").setLevel(logging.WARNING)  # absl would print its font cache logs
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  config, schedule = results["config"], results["schedule"]
  fig, (ax_acc, ax_sp, ax_flip) = plt.subplots(1, 3, figsize=(17, 4.8))
  # DPF and DCIL share the sparsity schedule: distinct markers keep both visible where they overlap.
  style = {
    "dense": dict(color="tab:gray"),
    "dpf": dict(color="tab:orange", marker="s", ms=3),
    "dcil": dict(color="tab:blue", marker="o", ms=3),
  }
  lowest = 1.0
  for method, r in results["methods"].items():
    c, st = r["curves"], style.get(method, {})
    label = method if method == "dense" else f"{method} (sparse path)"
    ax_acc.plot(c["eval_step"], c["test_acc_sparse"], label=label, **st)
    lowest = min([lowest, *c["test_acc_sparse"][1:]])
    if "test_acc_dense" in c:
      ax_acc.plot(
        c["eval_step"], c["test_acc_dense"], ls="--", label=f"{method} (dense path)", **st
      )
      lowest = min([lowest, *c["test_acc_dense"][1:]])
    if method != "dense":
      ax_sp.plot(c["eval_step"], c["sparsity"], label=method, **st)
    if c["refresh_step"]:
      ax_flip.plot(c["refresh_step"], c["flip_rate"], label=method, **st)
  grid = np.arange(config["steps"] + 1)
  target = config["sparsity"] * (1.0 - (1.0 - np.minimum(grid / schedule["ramp_steps"], 1.0)) ** 3)
  ax_sp.plot(grid, target, color="k", lw=0.8, label="cubic target")
  for ax in (ax_acc, ax_sp, ax_flip):
    ax.axvline(schedule["ramp_steps"], color="k", ls=":", lw=0.8, label="ramp end")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  ax_acc.axvline(schedule["kd_start_step"], color="tab:green", ls=":", lw=0.8, label="KD start")
  # The untrained point (chance) is left below the axis so the trained curves are readable.
  ax_acc.set(title="Test accuracy (full test set)", ylabel="accuracy")
  ax_acc.set_ylim(max(0.0, lowest - 0.02), 1.005)
  ax_sp.set(title=f"Actual sparsity of the masks (target {config['sparsity']:g})")
  ax_sp.set_ylabel("pruned fraction of conv weights")
  ax_flip.set(title=f"Mask flip rate at each refresh (every {config['update_every']} steps)")
  ax_flip.set_ylabel("fraction of conv weights flipped")
  ax_flip.set_yscale("symlog", linthresh=1e-4)
  ax_flip.set_ylim(bottom=0.0)
  for ax in (ax_acc, ax_sp, ax_flip):
    ax.legend(fontsize=8)
  fig.suptitle(
    f"SmallCNN on sklearn digits: dense vs DPF vs DCIL, {config['steps']} steps, "
    f"seed {config['seed']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: Config | None = None, **overrides: Any) -> dict[str, Any]:
  """Trains every method in ``config.methods``, prints the table, writes the workdir files.

  Args:
    config: the run's settings (default: :class:`Config`'s defaults).
    **overrides: fields replaced in ``config``, e.g. ``run(steps=200, workdir=None)``.

  Returns:
    ``{"config", "data", "model", "schedule", "methods": {method: {"final", "curves"}},
    "total_time_s"}`` — the content of ``results.json``.
  """
  config = dataclasses.replace(config or Config(), **overrides)
  config = dataclasses.replace(config, methods=tuple(config.methods))
  config.validate()
  start = time.perf_counter()
  data = load_digits_data(config.split_seed, config.test_size)
  model = SmallCNN(num_classes=NUM_CLASSES)
  variables = model.init(
    jax.random.PRNGKey(config.seed), jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False
  )
  results: dict[str, Any] = {
    "config": dataclasses.asdict(config),
    "data": {
      "dataset": "sklearn.datasets.load_digits",
      "num_train": len(data.y_train),
      "num_test": len(data.y_test),
      "train_mean": data.mean,
      "train_std": data.std,
    },
    "model": {"name": "SmallCNN", "num_prunable": num_prunable(variables["params"])},
    "schedule": {
      "ramp_steps": config.ramp_steps,
      "kd_start_step": config.kd_start_step,
      "warmup_steps": config.warmup_steps,
    },
    "backend": jax.default_backend(),
    "methods": {},
  }
  for method in config.methods:
    results["methods"][method] = train_method(method, config, data, model, variables)
  results["total_time_s"] = time.perf_counter() - start
  print(format_table(results))
  print(f"total time: {results['total_time_s']:.1f} s ({jax.default_backend()})")
  if config.workdir:
    os.makedirs(config.workdir, exist_ok=True)
    with open(os.path.join(config.workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    plot_curves(results, os.path.join(config.workdir, "curves.png"))
    print(f"wrote {config.workdir}/results.json and {config.workdir}/curves.png")
  return results


def main(argv: Sequence[str]) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  run(
    Config(
      methods=tuple(f.methods),
      sparsity=f.sparsity,
      steps=f.steps,
      batch_size=f.batch_size,
      eval_every=f.eval_every,
      seed=f.seed,
      lr=f.lr,
      weight_decay=f.weight_decay,
      update_every=f.update_every,
      workdir=f.workdir,
      progress=f.progress,
    )
  )


def _define_flags() -> None:
  """absl flags mirroring :class:`Config` (defined only when run as a script)."""
  from absl import flags

  d = Config()
  flags.DEFINE_list("methods", list(d.methods), f"Methods to train, from {dcil_jax.METHODS}.")
  flags.DEFINE_float("sparsity", d.sparsity, "Target sparsity of the conv kernels.")
  flags.DEFINE_integer("steps", d.steps, "Training steps per method.")
  flags.DEFINE_integer("batch_size", d.batch_size, "Minibatch size.")
  flags.DEFINE_integer("eval_every", d.eval_every, "Evaluate on the full test set this often.")
  flags.DEFINE_integer("seed", d.seed, "Init and minibatch-order seed (the split stays fixed).")
  flags.DEFINE_float("lr", d.lr, "Peak learning rate (warm-up then cosine decay).")
  flags.DEFINE_float("weight_decay", d.weight_decay, "Weight decay on every parameter.")
  flags.DEFINE_integer("update_every", d.update_every, "Mask refresh period in steps.")
  flags.DEFINE_string("workdir", d.workdir, "Where results.json and curves.png go.")
  flags.DEFINE_bool("progress", d.progress, "Show a tqdm progress bar.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
