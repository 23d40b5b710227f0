"""Where DCIL blows up: a per-step trace of one DCIL run, and its figures.

  python -m experiments.instability --workdir=runs/instab_cnn \\
    --config.learning_rate=0.2 --config.warmup_init_lr=0.1
  python -m experiments.instability --workdir=runs/instab_r1d \\
    --config=experiments/configs/mnist1d.py:resnet1d --steps=500
  python -m experiments.instability --plot=docs/figures/x.png runs/instab_cnn runs/instab_r1d

Before every step of the run, for the batch that step trains on, it records (``trace.jsonl``):

- per prunable layer: the norm of the kept and of the pruned weights, and the largest ``|w|``;
- the sparse/dense logit gap (mean over the batch of ``‖z_s − z_d‖``) and both KL terms;
- the task gradient (``kd_weight = 0``) and the distillation gradient (the KL terms alone, at
  unit weight) of the kernels, split into kept entries (the sparse path's) and pruned entries
  (the dense path's): their norms and cosines;
- at each mask refresh: how many weights regrow (pruned before, kept now), their mean ``|w|``
  and that of the weights kept throughout.

The run stops at the first non-finite step (``train_step`` does not apply it). The findings are
in ``docs/method.md`` ("When DCIL is unstable").
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import dcil_jax
from dcil_jax import losses, sharding
from experiments import input_pipeline, resolve, run_state, train

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "mnist1d.py")
TRACE_FILE = "trace.jsonl"


def _leaves(tree: Any) -> dict[str, jax.Array]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in flat}


def _norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _dot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cosine(a: Any, b: Any) -> jax.Array:
  return _dot(a, b) / jnp.maximum(_norm(a) * _norm(b), 1e-30)


def _split(kernels: Any, masks: Any) -> tuple[Any, Any]:
  """(kept entries, pruned entries) of a kernels tree, zeros elsewhere."""
  kept = jax.tree.map(lambda x, m: jnp.where(m, x, 0.0), kernels, masks)
  pruned = jax.tree.map(lambda x, m: jnp.where(m, 0.0, x), kernels, masks)
  return kept, pruned


@jax.jit
def diagnose(state: dcil_jax.TrainState, batch: dict[str, jax.Array]) -> dict[str, Any]:
  """The quantities of the module docstring for the step ``state`` is about to take."""
  method = state.method
  masks, old = state.masks, state.trained_masks
  kernel_masks = masks[dcil_jax.PRUNABLE]

  def loss(params, kd_weight, task_loss):
    return losses.dcil_loss(
      state.model,
      params,
      masks,
      batch,
      state.model_state,
      kd_weight=kd_weight,
      temperature=method.temperature,
      strategy="unrolled",
      task_loss=task_loss,
    )

  grad = jax.grad(loss, has_aux=True)
  g_task, aux = grad(state.params, 0.0, losses.batch_cross_entropy)
  g_kl, _ = grad(state.params, 1.0, lambda z, b: jnp.zeros([], jnp.float32))
  (task_kept, task_pruned), (kl_kept, kl_pruned) = (
    _split(g[dcil_jax.PRUNABLE], kernel_masks) for g in (g_task, g_kl)
  )
  z_s, z_d = aux["logits"]
  kernels = state.params[dcil_jax.PRUNABLE]
  w_kept, w_pruned = _split(kernels, kernel_masks)
  layers = {}
  for name, w in _leaves(kernels).items():
    kept, pruned = _leaves(w_kept)[name], _leaves(w_pruned)[name]
    layers[name] = {
      "kept_norm": _norm(kept),
      "pruned_norm": _norm(pruned),
      "max_abs": jnp.max(jnp.abs(w)),
    }
  regrown = jax.tree.map(lambda a, b: ~a & b, old[dcil_jax.PRUNABLE], kernel_masks)
  stayed = jax.tree.map(lambda a, b: a & b, old[dcil_jax.PRUNABLE], kernel_masks)
  abs_w = jax.tree.map(jnp.abs, kernels)

  def count(selected):
    return sum(jnp.sum(x) for x in jax.tree.leaves(selected))

  def mean_abs(selected):
    pairs = zip(jax.tree.leaves(selected), jax.tree.leaves(abs_w))
    return sum(jnp.sum(jnp.where(s, w, 0.0)) for s, w in pairs) / jnp.maximum(count(selected), 1)

  return {
    "kd_weight": method.kd_weight_at(state.optimizer_step),
    "ce_sparse": aux["ce"][0],
    "ce_dense": aux["ce"][1],
    "kl_sparse": aux["kl"][0],
    "kl_dense": aux["kl"][1],
    "logit_gap": jnp.mean(jnp.linalg.norm(z_s - z_d, axis=-1)),
    "logit_norm_sparse": jnp.mean(jnp.linalg.norm(z_s, axis=-1)),
    "logit_norm_dense": jnp.mean(jnp.linalg.norm(z_d, axis=-1)),
    "task_grad_kept": _norm(task_kept),
    "task_grad_pruned": _norm(task_pruned),
    "kl_grad_kept": _norm(kl_kept),
    "kl_grad_pruned": _norm(kl_pruned),
    "cos_kept": _cosine(task_kept, kl_kept),
    "cos_pruned": _cosine(task_pruned, kl_pruned),
    "task_grad_heads": _norm({k: v for k, v in g_task.items() if k != dcil_jax.PRUNABLE}),
    "kl_grad_heads": _norm({k: v for k, v in g_kl.items() if k != dcil_jax.PRUNABLE}),
    "regrown": count(regrown),
    "regrown_mean_abs": mean_abs(regrown),
    "stayed_mean_abs": mean_abs(stayed),
    "kept_min_abs": jnp.min(
      jnp.stack(
        [
          jnp.min(jnp.where(m, w, jnp.inf))
          for m, w in zip(jax.tree.leaves(kernel_masks), jax.tree.leaves(abs_w))
        ]
      )
    ),
    "layers": layers,
  }


@functools.partial(jax.jit, static_argnames="iterations")
def sharpness(
  state: dcil_jax.TrainState, batch: dict[str, jax.Array], kd_weight: float, iterations: int = 20
) -> jax.Array:
  """The largest Hessian eigenvalue of the DCIL loss at ``kd_weight`` on ``batch`` (power
  iteration on Hessian-vector products, from a fixed start), for all trained parameters.

  Gradient descent with learning rate ``η`` (and momentum ``β``) is stable on a quadratic only
  while this is below ``2(1 + β)/η`` (heavy ball); networks trained at a high rate sit near that
  edge, so a loss term that adds curvature in one step can push them over it.
  """
  method = state.method

  def loss(params):
    return losses.dcil_loss(
      state.model,
      params,
      state.masks,
      batch,
      state.model_state,
      kd_weight=kd_weight,
      temperature=method.temperature,
      strategy="unrolled",
    )[0]

  def hvp(v):
    return jax.jvp(jax.grad(loss), (state.params,), (v,))[1]

  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

  def body(_, carry):
    v, _ = carry
    v = jax.tree.map(lambda x: x / _norm(v), v)
    hv = hvp(v)
    return hv, _dot(v, hv)

  _, value = jax.lax.fori_loop(0, iterations, body, (v, jnp.zeros([], jnp.float32)))
  return value


def _host(tree: Any) -> Any:
  return jax.tree.map(lambda x: float(x), jax.device_get(tree))


def trace(
  config,
  workdir: str,
  steps: int | None = None,
  sharpness_every: int = 0,
  trace_from: int = 0,
) -> list[dict[str, Any]]:
  """Trains ``config`` (a DCIL config) for ``steps`` (default: the whole run), writing a record
  per step from step ``trace_from`` on (before it, once per epoch: a large model's diagnostics
  cost several steps each) to ``workdir/trace.jsonl``; returns the records. Every
  ``sharpness_every`` traced steps (0: never) a record also holds :func:`sharpness` without and
  with distillation."""
  platform = resolve.platform_name(jax.default_backend())
  config = resolve.resolve_config(config, data_parallelism=1, platform=platform)
  if config.method != "dcil":
    raise ValueError(f"instability traces DCIL runs; got method={config.method!r}.")
  mesh = sharding.make_mesh()
  plan = train.Plan.from_config(config)
  state = run_state.create_train_state(config, mesh, plan.steps_per_epoch)
  iterator = input_pipeline.create_train_iterator(
    config.dataset,
    global_batch_size=config.batch_size,
    seed=config.seed,
    data_dir=config.run.data_dir,
    image_size=config.image_size,
    dtype=np.dtype(run_state.DTYPES[config.dtype]),
    worker_count=0,
  )
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict() | {"steps_per_epoch": plan.steps_per_epoch}, f, default=str)
  records = []
  num_steps = steps or plan.num_steps
  lr_fn = run_state.learning_rate_schedule(config, plan.steps_per_epoch)
  with open(os.path.join(workdir, TRACE_FILE), "w") as out:
    for step in range(1, num_steps + 1):
      batch = sharding.shard_batch(next(iterator), mesh)
      if step < trace_from and step % plan.steps_per_epoch:
        state, metrics = dcil_jax.train_step(state, batch)
        if not bool(metrics["finite"]):
          print(f"non-finite at step {step}; stopping", file=sys.stderr)
          break
        continue
      record = _host(diagnose(state, batch))
      if sharpness_every and step % sharpness_every == 0:
        record["sharpness_task"] = float(sharpness(state, batch, 0.0))
        record["sharpness_kd"] = float(sharpness(state, batch, 1.0))
      state, metrics = dcil_jax.train_step(state, batch)
      record |= {"step": step, "epoch": step / plan.steps_per_epoch}
      record["learning_rate"] = float(lr_fn(step - 1))
      record |= {"loss": float(metrics["loss"]), "finite": bool(metrics["finite"])}
      record["sparsity"] = float(metrics["sparsity"])
      out.write(json.dumps(record) + "\n")
      records.append(record)
      if not record["finite"]:
        print(f"non-finite at step {step}; stopping", file=sys.stderr)
        break
  return records


def stability_edge(learning_rate: float, momentum: float, nesterov: bool) -> float:
  """The largest curvature on which SGD with this learning rate and momentum converges on a
  quadratic: ``2(1 + β) / ((1 + 2β) η)`` for optax's Nesterov form, ``2(1 + β) / η`` for heavy
  ball (where an eigenvalue of the two-step iteration reaches −1)."""
  b = momentum
  return 2 * (1 + b) / (((1 + 2 * b) if nesterov else 1.0) * learning_rate)


def read_trace(workdir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  with open(os.path.join(workdir, TRACE_FILE)) as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  return records, config


def plot(workdirs: list[str], path: str, labels: list[str] | None = None) -> None:
  """One column per trace: weight norms, logit gap and KL, gradient norms and cosine, regrowth."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = labels or [os.path.basename(w.rstrip("/")) for w in workdirs]
  fig, axes = plt.subplots(5, len(workdirs), figsize=(5 * len(workdirs), 15), squeeze=False)
  for col, (workdir, label) in enumerate(zip(workdirs, labels)):
    records, config = read_trace(workdir)
    epoch = np.array([r["epoch"] for r in records])
    kd_epoch = config["kd_start_epoch"]
    ax = axes[0, col]
    for name in records[0]["layers"]:
      kept = [r["layers"][name]["kept_norm"] for r in records]
      pruned = [r["layers"][name]["pruned_norm"] for r in records]
      (line,) = ax.semilogy(epoch, kept, label=f"{name} kept")
      ax.semilogy(epoch, pruned, "--", color=line.get_color())
    ax.set_title(f"{label}: layer weight norms (solid kept, dashed pruned)", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[1, col]
    ax.semilogy(epoch, [r["logit_gap"] for r in records], label="logit gap ‖z_s − z_d‖")
    ax.semilogy(epoch, [r["kl_sparse"] + 1e-12 for r in records], label="KL sparse←dense")
    ax.semilogy(epoch, [r["kl_dense"] + 1e-12 for r in records], label="KL dense←sparse")
    ax.semilogy(epoch, [r["ce_sparse"] for r in records], label="CE sparse")
    ax.set_title("logits and loss terms", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[2, col]
    for key, style in (
      ("task_grad_kept", "-"),
      ("task_grad_pruned", "-"),
      ("kl_grad_kept", "--"),
      ("kl_grad_pruned", "--"),
    ):
      ax.semilogy(epoch, [r[key] + 1e-12 for r in records], style, label=key)
    twin = ax.twinx()
    twin.plot(epoch, [r["cos_pruned"] for r in records], ":", color="k", label="cos pruned")
    twin.set_ylim(-1, 1)
    twin.set_ylabel("cos(task, KL) on pruned entries", fontsize=7)
    ax.set_title("kernel gradients: task vs distillation (unit weight)", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    ax = axes[3, col]
    refresh = [r for r in records if r["regrown"] > 0]
    ax.semilogy(
      [r["epoch"] for r in refresh], [r["regrown"] for r in refresh], "o", ms=3, label="regrown"
    )
    twin = ax.twinx()
    twin.semilogy(
      [r["epoch"] for r in refresh],
      [r["regrown_mean_abs"] / max(r["stayed_mean_abs"], 1e-30) for r in refresh],
      "x",
      ms=3,
      color="C3",
      label="mean |w| regrown / kept",
    )
    twin.set_ylabel("mean |w| regrown / kept throughout", fontsize=7)
    ax.set_title("regrowth at each refresh", fontsize=9)
    ax = axes[4, col]
    sharp = [r for r in records if "sharpness_task" in r and np.isfinite(r["sharpness_kd"])]
    sharp = [r for r in sharp if abs(r["sharpness_kd"]) < 1e4]
    ax.plot(
      [r["epoch"] for r in sharp],
      [r["sharpness_task"] for r in sharp],
      "o-",
      ms=3,
      label="sharpness, task terms only",
    )
    ax.plot(
      [r["epoch"] for r in sharp],
      [r["sharpness_kd"] for r in sharp],
      "s-",
      ms=3,
      label="sharpness with distillation (weight 1)",
    )
    beta = config["momentum"]
    lr_fn = run_state.learning_rate_schedule(
      ml_collections.ConfigDict(config), config["steps_per_epoch"]
    )
    edge = [stability_edge(float(lr_fn(r["step"] - 1)), beta, config["nesterov"]) for r in records]
    ax.plot(epoch, edge, "k--", lw=0.8, label="stability edge of SGD at this lr")
    ax.set_ylim(0, 4 * max(edge[-1], 1.0))
    ax.set_title("largest Hessian eigenvalue of the loss", fontsize=9)
    ax.legend(fontsize=6)
    ax.set_xlabel("epoch")
    for row in range(5):
      axes[row, col].axvline(kd_epoch, color="grey", lw=0.8)
      if not records[-1]["finite"]:
        axes[row, col].axvline(records[-1]["epoch"], color="red", lw=0.8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=80)


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The DCIL run to trace.")
flags.DEFINE_string("workdir", None, "Where trace.jsonl and config.json go.")
flags.DEFINE_integer("steps", None, "Trace this many steps (default: the whole run).")
flags.DEFINE_integer("sharpness_every", 0, "Measure the loss sharpness every this many steps.")
flags.DEFINE_integer("trace_from", 0, "Trace every step from this one (before: once an epoch).")
flags.DEFINE_string("plot", None, "Plot the traces in the positional workdirs to this PNG.")
flags.DEFINE_list("labels", None, "Column titles for --plot (default: the workdirs' names).")


def main(argv: list[str]) -> None:
  if FLAGS.plot:
    plot(argv[1:], FLAGS.plot, FLAGS.labels)
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required to trace a run.")
  config = FLAGS.config
  config.run.progress = False
  trace(config, FLAGS.workdir, FLAGS.steps, FLAGS.sharpness_every, FLAGS.trace_from)


if __name__ == "__main__":
  app.run(main)
