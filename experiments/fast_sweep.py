"""Many small runs in one process and one compiled step: MNIST-1D studies on a few CPU cores.

  python -m experiments.fast_sweep --workdir=results/mnist1d_v2_cnn \
      --config=experiments/configs/mnist1d.py:cnn --lrs=0.02,0.05,0.1,0.2 --seeds=0,1,2,3,4

A run of a tiny model through ``experiments.train`` spends nearly all its time on per-step
overhead (input pipeline, dispatch, an evaluation and a checkpoint every epoch), not on the
model (``benchmarks/results/sweep_throughput_cpu.md``). Here one **cell** (a method variant at a
sparsity) trains every learning rate x seed of the grid together:

- the library's own ``dcil_jax.TrainState.create`` (under ``jax.vmap``) and
  ``dcil_jax.train_step``: each run has its own initialisation, data order, dropout key, masks and
  learning rate, and computes what ``experiments.mnist1d`` computes for that config
  (``tests/test_fast_sweep.py`` checks a few steps against the single-run path);
- the learning rate's peak is a leaf of the optimizer state (``optax.inject_hyperparams``
  around ``optax.scale`` after SGD, the recipe's schedule normalised to a peak of 1), so the
  learning rates share one compiled step: the warm-up starts at the recipe's ratio of the peak
  (``warmup_init_lr / learning_rate``, 0.5 in the MNIST-1D configs);
- the data sit on the device; each step gathers its batch by indices that reproduce
  ``input_pipeline.create_train_iterator``'s order (:func:`input_pipeline.train_order`);
- each step of each run is one call of the compiled single-run step, queued from the host
  without waiting (nothing returns to the host within an epoch; :func:`make_epoch_fn` says why
  this beats one program per epoch on CPU); after each epoch the validation split is evaluated
  (cheap), and at the end validation and test;
- a run whose step is not finite (NaN/Inf loss, gradients or parameters: the step the library
  skips, and where the loop's default ``on_nonfinite="stop"`` ends a run) is **stopped there**
  (its state frozen at the last good step) and recorded as diverged with that step; the other
  runs go on;
- no checkpoints: a finished cell is written to ``WORKDIR/<variant>_s<sparsity>.json`` and a
  rerun of the same command skips it (a cell is a few minutes at most).

Dense has one cell (sparsity 0). ``python -m experiments.fast_report`` turns the cells into the
study's tables and figures.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import dcil_jax
from dcil_jax import find_masked_state
from dcil_jax.models import create_model
from experiments import input_pipeline, resolve, run_state

# Method variants of a grid: the config's method and the config fields the variant sets.
# "dcil" is ``dcil_jax.DCIL.official`` (exactly the official code); "dcil_robust" is
# ``dcil_jax.DCIL.robust`` with its step bound (``max_step_norm``, resolved from the preset);
# "dcil_clip1" the fixed clip that was the robust preset's optimizer half before the step bound
# replaced it.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
  "dense": ("dense", {}),
  "gmp": ("gmp", {}),
  "rigl": ("rigl", {}),
  "dpf": ("dpf", {}),
  "dcil": ("dcil", {"dcil_preset": "official"}),
  "dcil_robust": ("dcil", {"dcil_preset": "robust"}),
  # The robust preset's first candidate (branch issue26 before 11:21 UTC): the distillation
  # term capped at its task loss, on top of the gradient clipping.
  "dcil_clip1": ("dcil", {"grad_clip_norm": 1.0}),
  "dcil_robust_kdclip": ("dcil", {"grad_clip_norm": 1.0, "kd_clip": 1.0}),
}
DEFAULT_LRS = (0.02, 0.05, 0.1, 0.2)
BATCHING = ("host", "map", "vmap")
COLLAPSE_FACTOR = 2.0  # a final accuracy below this x chance counts as collapsed


class Cell(NamedTuple):
  """One compiled program of a grid: a method variant at one sparsity."""

  variant: str
  sparsity: float

  @property
  def name(self) -> str:
    return "dense" if self.variant == "dense" else f"{self.variant}_s{self.sparsity:g}"


def make_cells(variants: Sequence[str], sparsities: Sequence[float]) -> list[Cell]:
  """The cells, sparsity by sparsity (dense once, first)."""
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    raise ValueError(f"variants must be a non-empty subset of {sorted(VARIANTS)}, got {variants}.")
  if not sparsities or any(not 0 < s < 1 for s in sparsities):
    raise ValueError(f"sparsities must be a non-empty list in (0, 1), got {list(sparsities)}.")
  cells = [Cell("dense", 0.0)] if "dense" in variants else []
  return cells + [Cell(v, s) for s in sparsities for v in variants if v != "dense"]


# --------------------------------------------------------------------------------------------
# Config, optimizer and method of a cell


def cell_config(base: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
  """``base`` resolved (recipe filled in) for ``cell``, with the learning rate normalised: peak
  1 and warm-up from the base's ratio, so that the run's peak multiplies the whole schedule."""
  config = ml_collections.ConfigDict(base.to_dict())
  with config.unlocked():
    method, fields = VARIANTS[cell.variant]
    config.method, config.sparsity = method, cell.sparsity
    for name, value in fields.items():
      config[name] = value
  platform = resolve.platform_name(jax.default_backend())
  config = resolve.resolve_config(config, 1, platform)
  with config.unlocked():
    config.warmup_init_lr = config.warmup_init_lr / config.learning_rate
    config.learning_rate = 1.0
  return config


def run_config(
  config: ml_collections.ConfigDict, lr: float, seed: int
) -> ml_collections.ConfigDict:
  """The single-run config (``experiments.mnist1d``) that one run of a cell computes."""
  out = ml_collections.ConfigDict(config.to_dict())
  with out.unlocked():
    out.warmup_init_lr = config.warmup_init_lr * lr
    out.learning_rate = lr
    out.seed = seed
  return out


def make_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """``experiments.run_state.make_optimizer``'s chain with one change: SGD follows the normalised
  schedule and ``inject_hyperparams(scale)`` multiplies its update by the run's peak learning
  rate, a leaf of the optimizer state (``step_size``) that ``vmap`` can give each run. SGD's
  update is linear in the learning rate, so this is the same step up to float rounding.

  The step bound of robust DCIL (``max_step_norm``) clips at ``max_step_norm / (peak ·
  normalised schedule)``: its ``max_step`` is a state leaf too, set per run to
  ``max_step_norm / peak`` (:func:`init_states`).

  The ``rigl`` wrapper and ``masked_update`` sit where ``make_optimizer`` puts them (``rigl``
  writes ``-params`` into pruned entries, so the scaling must happen inside it).
  """
  if config.get("filter_allocation", "global") != "global":
    raise ValueError(
      f"fast_sweep trains with the global filter threshold only; filter_allocation="
      f"{config.filter_allocation!r} needs the model's channel groups: run experiments.digits "
      "(or another entry point of experiments.train) for it."
    )
  normalised = run_state.learning_rate_schedule(config, steps_per_epoch)
  step_bound = optax.inject_hyperparams(dcil_jax.clip_step_norm, static_args="learning_rate")
  parts = [
    *([optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []),
    *([step_bound(config.max_step_norm, normalised)] if config.max_step_norm else []),
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(normalised, momentum=config.momentum, nesterov=config.nesterov),
    optax.inject_hyperparams(optax.scale)(step_size=1.0),
  ]
  return run_state.sparsify(config, steps_per_epoch, parts)


def make_method(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Any:
  """The method object, as ``experiments.run_state.create_train_state`` builds it (for DCIL the
  config's preset with the recipe's distillation start)."""
  method = dcil_jax.get_method(config.method)
  if isinstance(method, dcil_jax.DCIL):
    method = run_state.dcil_method(config, steps_per_epoch)
  return method


# --------------------------------------------------------------------------------------------
# The runs of a cell: one step of each run at a time


class Data(NamedTuple):
  """The splits of a small data set as arrays (they go to the device once)."""

  train: tuple[np.ndarray, np.ndarray]
  validation: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]


def mnist1d_data() -> Data:
  """MNIST-1D: train on ``fit``, choose on ``validation``, report ``test``
  (``input_pipeline.MNIST1D_VALIDATION_SIZE``)."""
  get = input_pipeline.mnist1d_arrays
  return Data(get("fit"), get("validation"), get("test"))


def _eval_batch(split: tuple[np.ndarray, np.ndarray]) -> dict[str, jax.Array]:
  x, y = split
  return {"image": jnp.asarray(x), "label": jnp.asarray(y), "mask": jnp.ones(len(y), bool)}


def init_states(
  config: ml_collections.ConfigDict,
  method: Any,
  tx: optax.GradientTransformation,
  seeds: Sequence[int],
  lrs: Sequence[float],
) -> dcil_jax.TrainState:
  """The states of ``len(seeds) * len(lrs)`` runs stacked on a leading axis (learning rate
  major): ``TrainState.create`` under ``vmap``, with the seed's initialisation and step key as
  ``experiments.run_state.create_train_state`` draws them."""
  info = input_pipeline.DATASETS[config.dataset]
  model = create_model(config.model, info.num_classes, dtype=run_state.DTYPES[config.dtype])
  dummy = run_state.example_input(config)

  def one(seed: jax.Array, lr: jax.Array) -> dcil_jax.TrainState:
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_rng, dummy, train=False)
    state = dcil_jax.TrainState.create(
      model, variables, tx, method=method, example_input=dummy, rng=state_rng
    )
    per_run = {"step_size": lr}
    if config.max_step_norm:
      per_run["max_step"] = config.max_step_norm / lr
    return state.replace(opt_state=optax.tree_utils.tree_set(state.opt_state, **per_run))

  seed_arr = jnp.asarray([s for _ in lrs for s in seeds], jnp.int32)
  lr_arr = jnp.asarray([lr for lr in lrs for _ in seeds], jnp.float32)
  return jax.jit(jax.vmap(one))(seed_arr, lr_arr)


def _where_runs(flag: jax.Array, a: Any, b: Any) -> Any:
  """Per run (leading axis): ``a`` where ``flag``, else ``b``."""
  pick = lambda x, y: jnp.where(flag.reshape(flag.shape + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(pick, a, b)


def _guard(old: Any, new: Any, finite: jax.Array, stopped_at: jax.Array, step: Any) -> Any:
  """``(state, stopped_at)`` after a step of one run or of runs on a leading axis: a run whose
  step is not finite stops at ``step`` (1-based); a stopped run keeps its old state."""
  stopped_at = jnp.where((stopped_at == 0) & ~finite, step, stopped_at)
  return _where_runs(stopped_at > 0, old, new), stopped_at


def _eval_all(
  states: dcil_jax.TrainState, batch: dict[str, jax.Array], path: str | None
) -> jax.Array:
  """Top-1 of the deployable model (``path=None``) or one DCIL path of every run on one whole
  split."""
  sums = jax.lax.map(lambda s: dcil_jax.eval_step(s, batch, path), states)
  return sums["top1"] / sums["count"]


def make_epoch_fn(steps_per_epoch: int, batching: str = "host") -> Callable[..., Any]:
  """``(states, stopped_at, images, labels, order, first_step, val) -> (states, stopped_at,
  losses [R, steps], val_top1 [R])``: one epoch of every run (the one-program engines donate
  ``states``).

  ``stopped_at`` is each run's first non-finite step (1-based, as the loop counts), or 0; a
  stopped run's state no longer changes.

  ``batching``:

  - ``"host"`` (default): each step of each run is one call of a compiled single-run step,
    queued from the host without waiting for it (JAX dispatches asynchronously: nothing
    returns to the host until the epoch's end);
  - ``"map"``: one program per epoch, the runs' steps one after the other (``lax.map`` inside
    ``lax.scan``);
  - ``"vmap"``: one program per epoch, the runs' steps batched (``vmap`` inside ``lax.scan``).

  The host loop is the fastest on CPU by far: XLA:CPU compiles the backward convolutions inside
  a loop body with their operands in the layout the loop carries, for which it has only a slow
  generic convolution, and batching (``vmap``) turns each convolution into a grouped one, which
  it also runs slowly (``benchmarks/results/sweep_throughput_cpu.md``).
  """
  if batching not in BATCHING:
    raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}.")
  if batching == "host":
    return _host_epoch_fn(steps_per_epoch)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def epoch(states, stopped_at, images, labels, order, first_step, val):
    def body(carry, t):
      states, stopped_at = carry
      idx = order[:, t]
      batch = {"image": images[idx], "label": labels[idx]}
      if batching == "vmap":
        new, metrics = jax.vmap(dcil_jax.train_step)(states, batch)
      else:
        new, metrics = jax.lax.map(lambda sb: dcil_jax.train_step(*sb), (states, batch))
      states, stopped_at = _guard(states, new, metrics["finite"], stopped_at, first_step + t + 1)
      return (states, stopped_at), metrics["loss"]

    (states, stopped_at), losses = jax.lax.scan(
      body, (states, stopped_at), jnp.arange(steps_per_epoch)
    )
    return states, stopped_at, losses.T, _eval_all(states, val, None)

  return epoch


@functools.partial(jax.jit, donate_argnums=(0,))
def _guarded_step(state, stopped_at, images, labels, order, r, t, first_step):
  """One step of run ``r`` (its batch: row ``t`` of its ``order``); a run that has stopped,
  or whose step is not finite, keeps its state (``stopped_at`` as in :func:`make_epoch_fn`)."""
  idx = order[r, t]
  new, metrics = dcil_jax.train_step(state, {"image": images[idx], "label": labels[idx]})
  state, stopped_at = _guard(state, new, metrics["finite"], stopped_at, first_step + t + 1)
  return state, stopped_at, metrics["loss"]


@functools.partial(jax.jit, static_argnums=(1,))
def _unstack(states: Any, runs: int) -> list[Any]:
  return [jax.tree.map(lambda a, r=r: a[r], states) for r in range(runs)]


@jax.jit
def _stack(states: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@functools.partial(jax.jit, static_argnums=(2,))
def _top1(state: dcil_jax.TrainState, batch: dict[str, jax.Array], path: str | None) -> jax.Array:
  sums = dcil_jax.eval_step(state, batch, path)
  return sums["top1"] / sums["count"]


def _host_epoch_fn(steps_per_epoch: int) -> Callable[..., Any]:
  def epoch(states, stopped_at, images, labels, order, first_step, val):
    runs = len(stopped_at)
    order = jnp.asarray(order)
    each = _unstack(states, runs)
    stopped = [stopped_at[r] for r in range(runs)]
    losses = []
    for r in range(runs):
      run_losses = []
      for t in range(steps_per_epoch):
        each[r], stopped[r], loss = _guarded_step(
          each[r], stopped[r], images, labels, order, r, t, first_step
        )
        run_losses.append(loss)
      losses.append(jnp.stack(run_losses))
    top1 = jnp.stack([_top1(s, val, None) for s in each])
    return _stack(each), jnp.stack(stopped), jnp.stack(losses), top1

  return epoch


@jax.jit
def _final(states: dcil_jax.TrainState, val: Any, test: Any) -> dict[str, jax.Array]:
  out = {}
  for path in (None, *(p for p in states.method.path_names if p != "sparse")):
    prefix = "" if path is None else f"{path}_"
    out[f"{prefix}val_top1"] = _eval_all(states, val, path)
    out[f"{prefix}test_top1"] = _eval_all(states, test, path)
  if states.method.uses_masks:
    fraction = lambda s: find_masked_state(s.opt_state).refresh.pruned_fraction(s.trained_masks)
    out["sparsity"] = jax.vmap(fraction)(states)
  return out


def run_cell(
  base: ml_collections.ConfigDict,
  cell: Cell,
  seeds: Sequence[int],
  lrs: Sequence[float],
  data: Data,
  *,
  progress: Any = None,
  num_steps: int | None = None,
  batching: str = "host",
) -> dict[str, Any]:
  """Trains every ``lrs`` x ``seeds`` run of ``cell`` together; returns the cell's record.

  Args:
    num_steps: stop after this many steps (tests, benchmarks); default: the recipe's epochs.
    progress: a tqdm bar advanced by one per epoch.
    batching: how the runs share a step (:func:`make_epoch_fn`).

  Returns:
    ``{"cell", "variant", "sparsity", "config", "wall_s", "runs": [...]}``; each run has its
    ``lr``, ``seed``, final ``val_top1`` / ``test_top1`` (and DCIL's ``dense_*``), the mask
    ``sparsity``, ``val_curve`` (validation top-1 after each epoch), ``epoch_loss`` (mean train
    loss of each epoch over its finite steps), ``diverged_step`` (first non-finite step, or
    None) and ``collapsed`` (final test top-1 below ``COLLAPSE_FACTOR`` x chance).
  """
  start, cpu_start = time.perf_counter(), time.process_time()
  config = cell_config(base, cell)
  x, y = data.train
  info = input_pipeline.DATASETS[config.dataset]
  if len(y) != input_pipeline.num_examples(config.dataset, info.train_split):
    raise ValueError(
      f"The data's train split has {len(y)} examples, not those of config.dataset="
      f"{config.dataset!r} ({info.train_split!r}); for MNIST-1D with validation use mnist1d_val."
    )
  steps_per_epoch = len(y) // config.batch_size
  total = num_steps or round(config.num_epochs * steps_per_epoch)
  tx = make_optimizer(config, steps_per_epoch)
  method = make_method(config, steps_per_epoch)
  states = init_states(config, method, tx, seeds, lrs)
  runs = len(seeds) * len(lrs)
  orders = {s: input_pipeline.train_order(len(y), config.batch_size, s, total) for s in seeds}
  order = np.stack([orders[s] for _ in lrs for s in seeds])  # [R, total, B]
  images, labels = jnp.asarray(x), jnp.asarray(y)
  val, test = _eval_batch(data.validation), _eval_batch(data.test)
  epoch_fn = make_epoch_fn(steps_per_epoch, batching)
  stopped_at = jnp.zeros(runs, jnp.int32)
  losses, curve, epoch_wall = [], [], []
  for first in range(0, total, steps_per_epoch):
    steps = min(steps_per_epoch, total - first)
    if steps != steps_per_epoch:  # a cut run's last partial epoch
      epoch_fn = make_epoch_fn(steps, batching)
    states, stopped_at, loss, val_top1 = epoch_fn(
      states, stopped_at, images, labels, jnp.asarray(order[:, first : first + steps]), first, val
    )
    losses.append(loss)
    curve.append(val_top1)
    jax.block_until_ready(val_top1)  # one sync per epoch: the epoch's wall time
    epoch_wall.append(time.perf_counter() - start)
    if progress is not None:
      progress.update(1)
  final = jax.device_get(_final(states, val, test))
  losses, curve, stopped_at = jax.device_get((losses, curve, stopped_at))
  loss = np.concatenate(losses, axis=1)  # [R, total]
  chance = 1.0 / input_pipeline.DATASETS[config.dataset].num_classes
  records = []
  for r in range(runs):
    lr, seed = lrs[r // len(seeds)], seeds[r % len(seeds)]
    epoch_loss = [_finite_mean(chunk[r]) for chunk in losses]
    record = {
      "lr": float(lr),
      "seed": int(seed),
      **{k: float(v[r]) for k, v in final.items()},
      "val_curve": [float(c[r]) for c in curve],
      "epoch_loss": epoch_loss,
      "final_loss": _finite_mean(loss[r, -steps_per_epoch:]),
      "diverged_step": int(stopped_at[r]) or None,
    }
    record["collapsed"] = bool(record["test_top1"] < COLLAPSE_FACTOR * chance)
    records.append(record)
  return {
    "cell": cell.name,
    "variant": cell.variant,
    "sparsity": cell.sparsity,
    "config": config.to_dict(),
    "method": repr(method),  # the options a preset resolved to
    "optimizer_clip": config.get("grad_clip_norm"),
    "max_step_norm": config.get("max_step_norm"),
    "steps": total,
    "steps_per_epoch": steps_per_epoch,
    "wall_s": time.perf_counter() - start,
    "cpu_s": time.process_time() - cpu_start,  # this process, all threads
    "load_avg": os.getloadavg()[0],  # other jobs on the machine inflate wall_s
    "batching": batching,
    "epoch_end_s": epoch_wall,  # seconds since the cell started: the first includes compiling
    "runs": records,
  }


def _finite_mean(values: np.ndarray) -> float | None:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else None


# --------------------------------------------------------------------------------------------
# A grid of cells, resumable


def cell_path(workdir: str, cell: Cell) -> str:
  return os.path.join(workdir, f"{cell.name}.json")


def run_grid(
  base: ml_collections.ConfigDict,
  workdir: str,
  cells: Sequence[Cell],
  seeds: Sequence[int],
  lrs: Sequence[float],
  *,
  data: Data | None = None,
  progress: bool = True,
  num_steps: int | None = None,
  batching: str = "host",
) -> list[dict[str, Any]]:
  """Runs every cell whose file is missing (a finished cell is skipped), writing each as it
  finishes; returns the records of the cells it ran. ``WORKDIR/grid.json`` lists the grid."""
  from tqdm.auto import tqdm

  os.makedirs(workdir, exist_ok=True)
  grid = {
    "config": base.to_dict(),
    "cells": [c.name for c in cells],
    "seeds": list(seeds),
    "lrs": list(lrs),
    "num_steps": num_steps,
  }
  grid_path = os.path.join(workdir, "grid.json")
  if os.path.exists(grid_path):  # more cells of the same grid (e.g. another process's variants)
    with open(grid_path) as f:
      old = json.load(f)
    if [old[k] for k in ("seeds", "lrs", "num_steps")] != [
      grid[k] for k in ("seeds", "lrs", "num_steps")
    ]:
      raise ValueError(f"{workdir} holds a grid of other seeds, learning rates or steps.")
    grid["cells"] = old["cells"] + [c for c in grid["cells"] if c not in old["cells"]]
  _write_json(grid_path, grid)
  data = mnist1d_data() if data is None else data
  todo = [c for c in cells if not os.path.exists(cell_path(workdir, c))]
  bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress, dynamic_ncols=True)
  out = []
  try:
    for cell in todo:
      # Several processes may share a grid: a cell is claimed by creating its lock file, and
      # one finished or claimed by another process meanwhile is left to it.
      if os.path.exists(cell_path(workdir, cell)) or not _claim(workdir, cell):
        bar.update(1)
        continue
      try:
        record = run_cell(base, cell, seeds, lrs, data, num_steps=num_steps, batching=batching)
        _write_json(cell_path(workdir, cell), record)
      finally:
        os.remove(_lock_path(workdir, cell))
      out.append(record)
      bar.update(1)
      finals = np.array([r["test_top1"] for r in record["runs"]])
      diverged = sum(r["diverged_step"] is not None for r in record["runs"])
      bar.write(
        f"{cell.name}: {len(finals)} runs in {record['wall_s']:.0f} s; test top-1 "
        f"{np.nanmin(finals):.3f}..{np.nanmax(finals):.3f}, {diverged} diverged"
      )
  finally:
    bar.close()
  return out


def _lock_path(workdir: str, cell: Cell) -> str:
  return os.path.join(workdir, f"{cell.name}.lock")


def _claim(workdir: str, cell: Cell) -> bool:
  """Creates the cell's lock file; False if another process holds it. A process killed while
  running a cell leaves its lock: delete ``WORKDIR/*.lock`` before continuing such a grid."""
  try:
    with open(_lock_path(workdir, cell), "x") as f:
      f.write(str(os.getpid()))
  except FileExistsError:
    return False
  return True


def _write_json(path: str, record: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, default=str)
  os.replace(tmp, path)  # a cell file exists only when complete


def load_cells(workdir: str) -> list[dict[str, Any]]:
  """The finished cells of a grid directory (none for a grid that has not started: no
  directory yet)."""
  if not os.path.isdir(workdir):
    return []
  names = sorted(n for n in os.listdir(workdir) if n.endswith(".json") and n != "grid.json")
  out = []
  for name in names:
    with open(os.path.join(workdir, name)) as f:
      out.append(json.load(f))
  return out


# --------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str]) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    cells = make_cells(f.methods, _floats(f.sparsities))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  run_grid(
    f.config,
    f.workdir,
    cells,
    _ints(f.seeds),
    _floats(f.lrs),
    progress=f.progress,
    batching=f.batching,
  )


def define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  default_config = os.path.join(os.path.dirname(__file__), "configs", "mnist1d.py")
  flags.DEFINE_string("workdir", None, "Grid directory: one JSON file per finished cell.")
  config_flags.DEFINE_config_file("config", default_config, "Base config (path[:arg]).")
  flags.DEFINE_list("methods", list(VARIANTS), "Method variants (see VARIANTS).")
  flags.DEFINE_string("sparsities", "0.8,0.9,0.95,0.98", "Target sparsities.")
  flags.DEFINE_string("seeds", "0,1,2,3,4", "Seeds (initialisation, data order, dropout).")
  flags.DEFINE_string("lrs", ",".join(map(str, DEFAULT_LRS)), "Peak learning rates.")
  flags.DEFINE_bool("progress", True, "Show the progress bar.")
  flags.DEFINE_enum("batching", "host", BATCHING, "How the runs of a cell share a step.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app

  define_flags()
  app.run(main)
