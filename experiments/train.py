"""The training loop shared by ``experiments.cifar`` and ``experiments.imagenet``.

One loop for every dataset, model and method: the library's ``TrainState`` and jitted
``train_step`` on a device mesh (batch split over ``data``, state replicated, optionally one
DCIL path per device), TFDS + grain input, an evaluation of the sparse path (and DCIL's dense
path) every epoch, TensorBoard + JSONL metrics, and a final summary in ``summary.json``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

import dcil_jax
from dcil_jax import sharding, stability
from dcil_jax.models import MODELS, create_model
from dcil_jax.transform import find_masked_state
from experiments import checkpoints, input_pipeline, preemption, recipes
from experiments.metric_writers import MetricWriter, read_jsonl

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
METRICS_FILE = "metrics.jsonl"
NONFINITE_MODES = ("stop", "skip")


class BadConfigError(ValueError):
  """A config setting that cannot work; the message says what to change."""


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


def resolve_config(
  config: ml_collections.ConfigDict, data_parallelism: int = 1
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the recipe's values filled in, checked for sense.

  ``per_device_batch_size``, when set, gives ``batch_size`` = it × ``data_parallelism`` (the
  devices the batch is split over); a recipe that scales its learning rate with the batch
  (ImageNet) follows.

  Raises:
    ValueError: with what is wrong and how to fix it, for any setting that cannot work.
  """
  try:
    return _resolve_config(config, data_parallelism)
  except BadConfigError:
    raise
  except ValueError as e:  # from the library's and the recipes' own checks
    raise BadConfigError(str(e)) from e


def _resolve_config(config: ml_collections.ConfigDict, data_parallelism: int):
  config = ml_collections.ConfigDict(config.to_dict())  # plain copy, no shared references
  if config.dataset not in input_pipeline.DATASETS:
    raise ValueError(
      f"Unknown dataset {config.dataset!r}; expected one of {sorted(input_pipeline.DATASETS)}."
    )
  if config.model not in MODELS:
    raise ValueError(f"Unknown model {config.model!r}; expected one of {sorted(MODELS)}.")
  dcil_jax.get_method(config.method)
  recipe = recipes.recipe_for(config.recipe, config.model)
  with config.unlocked():
    if config.per_device_batch_size is not None:
      if config.batch_size is not None:
        raise ValueError(
          f"Set batch_size ({config.batch_size}, global) or per_device_batch_size "
          f"({config.per_device_batch_size}), not both."
        )
      config.batch_size = config.per_device_batch_size * data_parallelism
    for name in recipes.RECIPE_FIELDS:
      if config[name] is None:
        config[name] = recipe[name]
    config.lr_boundaries = tuple(config.lr_boundaries)
    if config.image_size is None:
      config.image_size = input_pipeline.DATASETS[config.dataset].image_size
    if config.dtype is None:
      config.dtype = "float32"
    if config.worker_count is None:
      config.worker_count = default_worker_count()
  _check_config(config)
  return config


def default_worker_count(cpus: int | None = None) -> int:
  """Grain worker processes: all but 4 cores (for the step, the prefetch and the OS), at most 64
  (enough for ~24k ImageNet images/s, benchmarks/results/input_pipeline_cpu.md); none on
  small machines, where reader threads in the main process do as well."""
  if cpus is None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return 0 if cpus <= 4 else min(64, cpus - 4)


def _check_config(config: ml_collections.ConfigDict) -> None:
  problems = []
  if not 0.0 <= config.sparsity < 1.0:
    problems.append(f"sparsity must be in [0, 1), got {config.sparsity}")
  if config.method == "dense" and config.sparsity:
    problems.append("method='dense' trains no masks: set --config.sparsity=0 or another method")
  if config.dtype not in DTYPES:
    problems.append(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
  if config.lr_schedule not in ("step", "cosine"):
    problems.append(f"lr_schedule must be 'step' or 'cosine', got {config.lr_schedule!r}")
  if config.batch_size <= 0 or config.num_epochs <= 0 or config.learning_rate <= 0:
    problems.append("batch_size, num_epochs and learning_rate must be positive")
  if not 0 <= config.warmup_epochs < config.num_epochs:
    problems.append(f"warmup_epochs={config.warmup_epochs} must be in [0, num_epochs)")
  if any(not 0 < b <= config.num_epochs for b in config.lr_boundaries) or list(
    config.lr_boundaries
  ) != sorted(config.lr_boundaries):
    problems.append(f"lr_boundaries={config.lr_boundaries} must be increasing, in (0, num_epochs]")
  if config.method != "dense" and not 0 < config.ramp_end_epoch <= config.num_epochs:
    problems.append(
      f"ramp_end_epoch={config.ramp_end_epoch} must be in (0, num_epochs={config.num_epochs}]"
    )
  if config.path_parallel and config.method != "dcil":
    problems.append("path_parallel runs DCIL's two paths on two devices; it needs method='dcil'")
  if config.prefetch < 1:
    problems.append(f"prefetch must be >= 1 batch, got {config.prefetch}")
  if config.worker_count < 0:
    problems.append(f"worker_count must be >= 0, got {config.worker_count}")
  if config.update_every <= 0 or config.eval_every_epochs <= 0 or config.log_every_steps <= 0:
    problems.append("update_every, eval_every_epochs and log_every_steps must be positive")
  if config.on_nonfinite not in NONFINITE_MODES:
    problems.append(f"on_nonfinite must be one of {NONFINITE_MODES}, got {config.on_nonfinite!r}")
  if config.max_consecutive_nonfinite < 1 or config.keep_checkpoints < 1:
    problems.append("max_consecutive_nonfinite and keep_checkpoints must be >= 1")
  if config.checkpoint_every_steps is not None and config.checkpoint_every_steps < 1:
    problems.append(f"checkpoint_every_steps must be >= 1, got {config.checkpoint_every_steps}")
  if problems:
    raise BadConfigError("Bad config:\n  - " + "\n  - ".join(problems))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The recipe's learning rate per step: linear warm-up, then steps or cosine."""
  peak = config.learning_rate
  if config.lr_reference_batch:
    peak *= config.batch_size / config.lr_reference_batch  # the linear scaling rule
  warmup = round(config.warmup_epochs * steps_per_epoch)
  total = round(config.num_epochs * steps_per_epoch)
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      config.warmup_init_lr, peak, warmup_steps=warmup, decay_steps=total, end_value=0.0
    )
  after = optax.piecewise_constant_schedule(
    peak,
    {round(b * steps_per_epoch) - warmup: config.lr_decay for b in config.lr_boundaries},
  )
  if not warmup:
    return after
  ramp = optax.linear_schedule(config.warmup_init_lr, peak, warmup)
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """SGD (Nesterov) with weight decay on every parameter, as the official code, and for DCIL and
  DPF ``masked_update`` (its rule: the model's convolutions, found by ``TrainState.create``)."""
  parts = [
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(
      learning_rate_schedule(config, steps_per_epoch),
      momentum=config.momentum,
      nesterov=config.nesterov,
    ),
  ]
  if config.method != "dense":
    ramp_steps = max(1, round(config.ramp_end_epoch * steps_per_epoch))
    # Official: the ramp is evaluated at the integer epoch. A ramp shorter than an epoch (smoke
    # configs) is evaluated every step instead.
    stage = steps_per_epoch if ramp_steps >= steps_per_epoch else 1
    schedule = dcil_jax.cubic_sparsity(config.sparsity, ramp_steps, steps_per_stage=stage)
    parts.append(
      dcil_jax.masked_update(
        schedule, update_every=config.update_every, distribution=config.distribution
      )
    )
  return optax.chain(*parts)


def create_train_state(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int
) -> dcil_jax.TrainState:
  """The model's variables lifted into a ``TrainState`` placed on ``mesh``."""
  info = input_pipeline.DATASETS[config.dataset]
  model = create_model(config.model, info.num_classes, dtype=DTYPES[config.dtype])
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  shape = (1, config.image_size, config.image_size, info.channels)
  dummy = jnp.zeros(shape, DTYPES[config.dtype])
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)
  method = dcil_jax.get_method(config.method)
  if isinstance(method, dcil_jax.DCIL):
    method = dcil_jax.DCIL(
      kd_start_step=round(config.kd_start_epoch * steps_per_epoch),
      temperature=config.temperature,
      strategy=config.strategy,
    )
  return dcil_jax.TrainState.create(
    model,
    variables,
    make_optimizer(config, steps_per_epoch),
    method=method,
    example_input=dummy,
    mesh=mesh,
    rng=state_rng,
  )


def create_train_input(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, position: Any = None
) -> tuple[Any, Iterator[tuple[dict[str, jax.Array], Any]]]:
  """``(iterator, batches)``: the grain train iterator (close it when done) and
  ``(batch on the mesh, position after it)`` pairs, prefetched by a thread.

  ``position`` (from an earlier pair) starts the iterator at the batch after that one: a
  checkpoint saves the position of the last batch trained on, not the iterator's own, which
  is ahead by the prefetched batches.
  """
  iterator = input_pipeline.create_train_iterator(
    config.dataset,
    global_batch_size=config.batch_size,
    seed=config.seed,
    data_dir=config.data_dir,
    image_size=config.image_size,
    dtype=np.dtype(DTYPES[config.dtype]),
    worker_count=config.worker_count,
  )
  if position is not None:
    iterator.set_state(position)
  batches = input_pipeline.prefetch(
    ((sharding.shard_batch(batch, mesh), iterator.get_state()) for batch in iterator),
    config.prefetch,
  )
  return iterator, batches


def evaluate(
  state: dcil_jax.TrainState, batches: Iterable[dict[str, jax.Array]]
) -> dict[str, float]:
  """Sparse-path (deployable) metrics over ``batches``, and DCIL's dense path as ``dense_*``."""
  path_names = state.method.path_names
  totals = {path: None for path in path_names}
  for batch in batches:
    for path in path_names:
      counts = dcil_jax.eval_step(state, batch, path)
      totals[path] = counts if totals[path] is None else jax.tree.map(jnp.add, totals[path], counts)
  results = {}
  for path in path_names:
    t = jax.device_get(totals[path])
    prefix = "" if path == "sparse" else "dense_"
    n = max(float(t["count"]), 1.0)
    results |= {f"{prefix}{k}": float(t[k]) / n for k in ("loss", "top1", "top5")}
  results["examples"] = float(jax.device_get(totals["sparse"])["count"])
  return results


@jax.jit
def track_refresh(
  tracker: stability.RevivalTracker, state: dcil_jax.TrainState
) -> tuple[stability.RevivalTracker, dict[str, Any]]:
  """Mask churn of the refresh the next step makes (``state.trained_masks`` -> ``state.masks``)
  if it makes one; called before the step (the step donates the old masks).

  Runs on the devices, without a host sync; the loop fetches the results when it logs, and
  keeps those of the steps whose ``mask_refreshed`` metric is set. A step that is skipped
  (non-finite) refreshes again at the next one, to the same masks: the tracker's update is
  idempotent, so the early update changes nothing.
  """
  masked = find_masked_state(state.opt_state)
  refreshed = masked.refresh.due(masked.count) & (masked.count > 0)

  def measure(tracker):
    old, new = state.trained_masks, state.masks
    tracker = tracker.update(old, new)
    return tracker, {
      "flip_rate": dcil_jax.flip_rate(old, new),
      "revived": stability.fraction(stability.revived(old, new)),
      "ever_revived": tracker.ever_revived_fraction,
      "layer_flip_rate": stability.layer_flip_rates(old, new),
    }

  skip = lambda tracker: (
    tracker,
    jax.tree.map(jnp.zeros_like, jax.eval_shape(measure, tracker)[1]),
  )
  return jax.lax.cond(refreshed, measure, skip, tracker)


def _refresh_scalars(result: dict[str, Any]) -> dict[str, float]:
  """A :func:`track_refresh` result as flat scalars (``flip_rate/<layer>`` per layer)."""
  out = {k: float(v) for k, v in result.items() if k != "layer_flip_rate"}
  out |= {f"flip_rate/{_layer_name(k)}": float(v) for k, v in result["layer_flip_rate"].items()}
  return out


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  """Averages a window of step metrics over its applied (finite) steps; the flip rate only over
  steps that refreshed masks. In float64, so host values restored from a checkpoint's JSON give
  the same numbers as the live float32 ones."""
  stacked = {k: np.stack([np.asarray(h[k]) for h in history]) for k in history[0]}
  finite = stacked.pop("finite").astype(bool)
  refreshed = stacked.pop("mask_refreshed", np.zeros_like(finite)).astype(bool) & finite
  flips = stacked.pop("flip_rate", None)
  out = {
    k: float(v[finite].astype(np.float64).mean()) if finite.any() else float("nan")
    for k, v in stacked.items()
  }
  if refreshed.any():
    out["flip_rate"] = float(flips[refreshed].astype(np.float64).mean())
  out["nonfinite_steps"] = float((~finite).sum())
  return out


class RunHistory(NamedTuple):
  """What a resumed run knows of the steps before its checkpoint (from ``metrics.jsonl``)."""

  evals: list[dict[str, Any]]
  refreshes: list[dict[str, Any]]


def _rewind_metrics(workpath: epath.Path, step: int, write: bool) -> RunHistory:
  """Drops the records after ``step`` from ``metrics.jsonl`` (a resumed run writes them again)
  and returns the eval and refresh records up to it."""
  path = workpath / METRICS_FILE
  records = read_jsonl(str(path)) if path.exists() else []
  kept = [r for r in records if r["step"] <= step]
  if write and len(kept) != len(records):
    tmp = workpath / (METRICS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)  # atomic: a crash here leaves the old file or the new one
  strip = lambda r: {k: v for k, v in r.items() if k != "split"}
  return RunHistory(
    [strip(r) for r in kept if r["split"] == "eval"],
    [strip(r) for r in kept if r["split"] == "refresh"],
  )


def prepare_workdir(workdir: str, lead: bool) -> epath.Path:
  """Creates ``workdir`` and checks that it can be written, before any work is done."""
  workpath = epath.Path(workdir)
  if not lead:
    return workpath
  try:
    workpath.mkdir(parents=True, exist_ok=True)
    probe = workpath / ".write_test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(
      f"Cannot write to --workdir={workdir}: {e}. Pick a writable directory."
    ) from e
  return workpath


def _checkpoint_tree(state: dcil_jax.TrainState, tracker: Any) -> dict[str, Any]:
  """The arrays a checkpoint holds (the static parts of the state come from the config)."""
  tree = {
    "step": state.step,
    "params": state.params,
    "model_state": state.model_state,
    "opt_state": state.opt_state,
    "rng": state.rng,
  }
  return tree if tracker is None else tree | {"tracker": tracker}


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, progress: Any = None
) -> dict[str, Any]:
  """Trains ``config`` and evaluates every ``eval_every_epochs``; returns the summary.

  A ``workdir`` that holds checkpoints of the same experiment is continued from the newest
  readable one, and the continued run computes exactly what an uninterrupted one would (same
  data order, parameters and metrics). Checkpoints go to ``workdir/checkpoints`` at every
  evaluation, every ``checkpoint_every_steps``, at the end, and on SIGTERM/SIGINT (then
  :class:`experiments.preemption.Preempted` is raised).

  Writes ``config.json``, ``metrics.jsonl`` (``train`` records every ``log_every_steps``,
  ``eval`` records, and for DCIL/DPF a ``refresh`` record per mask refresh with the flip rate
  overall and per layer and the revived fractions), TensorBoard events and ``summary.json`` to
  ``workdir`` (from process 0 only).

  Args:
    progress: a tqdm bar to advance by one per step (a sweep's bar over many runs); the run
      then prints nothing itself. Default: its own bar (``config.progress``) and printed evals.

  Raises:
    ValueError: a bad config (:class:`BadConfigError`), or a workdir or checkpoint of another
      experiment (:class:`experiments.checkpoints.CheckpointMismatchError`).
    WorkdirError: the workdir cannot be written.
    FloatingPointError: a non-finite loss or gradient with ``on_nonfinite="stop"``.
    Preempted: SIGTERM or SIGINT; a checkpoint was written.
  """
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(path_parallel=config.path_parallel)
  ways, hosts = sharding.data_parallelism(mesh), jax.process_count()
  config = resolve_config(config, data_parallelism=ways)
  if config.batch_size % ways or config.batch_size % hosts:
    raise BadConfigError(
      f"batch_size={config.batch_size} must split evenly over the {ways} data-parallel devices "
      f"and {hosts} processes; try a multiple of {math.lcm(ways, hosts)}."
    )
  steps_per_epoch = config.steps_per_epoch or input_pipeline.steps_per_epoch(
    config.dataset, config.batch_size, config.data_dir
  )
  num_steps = config.num_train_steps or round(config.num_epochs * steps_per_epoch)
  eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
  checkpoint_every = config.checkpoint_every_steps or num_steps + 1

  workpath = prepare_workdir(workdir, lead)
  state = create_train_state(config, mesh, steps_per_epoch)
  tracker = None
  if state.method.uses_masks:  # on the mesh like the state (a checkpoint restores it there)
    tracker = sharding.place_state(stability.RevivalTracker.create(state.masks), mesh)
  checkpointer = checkpoints.RunCheckpointer(
    workpath / checkpoints.CHECKPOINT_DIR,
    keep=config.keep_checkpoints,
    async_save=config.async_checkpointing,
  )
  try:
    restored = checkpointer.restore_latest(_checkpoint_tree(state, tracker))
    config_path = workpath / "config.json"
    if restored is not None:
      checkpoints.check_config(
        restored.meta["config"], config.to_dict(), force=config.force_resume, what=workdir
      )
    elif config_path.exists():  # a run that wrote no checkpoint yet, or another experiment
      saved = json.loads(config_path.read_text())
      checkpoints.check_config(saved, config.to_dict(), force=config.force_resume, what=workdir)
  except BaseException:
    checkpointer.close()
    raise
  start_step, data_position, pending = 0, None, []
  if restored is not None:
    tree = restored.state
    state = state.replace(**{k: v for k, v in tree.items() if k != "tracker"})
    tracker = tree.get("tracker")
    start_step, data_position = restored.step, restored.meta["data"]
    pending = restored.meta["pending_train"]
  history = _rewind_metrics(workpath, start_step, write=lead)
  if lead and restored is None:
    config_path.write_text(json.dumps(config.to_dict(), indent=2, default=str))
  writer = MetricWriter(workdir, enabled=lead)
  num_params = sum(x.size for x in jax.tree.leaves(dcil_jax.export_variables(state)["params"]))
  dtype = np.dtype(DTYPES[config.dtype])

  def eval_batches() -> Iterator[dict[str, jax.Array]]:
    it = input_pipeline.create_eval_iterator(
      config.dataset,
      global_batch_size=config.batch_size,
      data_dir=config.data_dir,
      image_size=config.image_size,
      dtype=dtype,
      worker_count=config.worker_count,
    )
    try:
      for i, batch in enumerate(it):
        if config.max_eval_steps is not None and i >= config.max_eval_steps:
          break
        yield sharding.shard_batch(batch, mesh)
    finally:
      _close(it)

  verbose = lead and progress is None
  if verbose:
    resumed = f", resumed at step {start_step}" if start_step else ""
    strategy = getattr(state.method, "strategy", None)
    print(
      f"{config.model} ({num_params:,} params) on {config.dataset}, method={config.method}, "
      f"sparsity={config.sparsity}, {num_steps} steps ({steps_per_epoch}/epoch){resumed}, "
      f"batch {config.batch_size} ({config.batch_size // ways} per device) on "
      f"{jax.device_count()} {jax.default_backend()} device(s), "
      f"mesh {dict(mesh.shape)}, strategy={strategy}, dtype={config.dtype}"
    )

  lr_fn = learning_rate_schedule(config, steps_per_epoch)
  evals, refreshes = history.evals, history.refreshes
  # Train metrics of steps not yet logged (host values; a checkpoint carries them over).
  window: list[Any] = list(pending)
  checked = len(window)  # window[:checked] was checked for NaN/Inf already
  refresh_window: list[tuple[int, Any]] = []
  faults = NonfiniteMonitor(config.on_nonfinite, config.max_consecutive_nonfinite)
  if restored is not None:
    faults.total, faults.consecutive = restored.meta.get("nonfinite", (0, 0))
  train_iterator, train_batches = None, None
  timer_start, timed_images, step_fn = None, 0, None

  def flush(step: int) -> None:
    """Writes the refresh records so far and checks the steps so far for NaN/Inf."""
    nonlocal window, refresh_window, checked
    for refresh_step, result in jax.device_get(refresh_window):
      if not result.pop("refreshed"):
        continue
      record = _refresh_scalars(result)
      refreshes.append({"step": refresh_step, **record})
      writer.write(refresh_step, "refresh", record)
    refresh_window = []
    window = jax.device_get(window)
    faults.check(window[checked:], first_step=step - len(window) + 1 + checked)
    checked = len(window)

  def log_train(step: int) -> None:
    nonlocal window, checked
    scalars = _mean_metrics(window)
    window, checked = [], 0
    scalars["learning_rate"] = float(lr_fn(step - 1))
    if timed_images:
      scalars["images_per_second"] = timed_images / (time.perf_counter() - timer_start)
    writer.write(step, "train", scalars)
    progress.set_postfix(
      loss=f"{scalars['loss']:.3f}", acc=f"{scalars['accuracy_sparse']:.3f}", refresh=False
    )

  own_progress = progress is None
  if own_progress:
    progress = _progress(num_steps, enabled=lead and config.progress)
  progress.update(start_step)
  with preemption.PreemptionGuard() as guard:
    try:
      if start_step < num_steps:
        train_iterator, train_batches = create_train_input(config, mesh, data_position)
      for step in range(start_step + 1, num_steps + 1):
        batch, data_position = next(train_batches)
        if step_fn is None:
          # Compile once up front: a step that cannot fit in device memory fails here, clearly.
          step_fn = dcil_jax.train_step.lower(state, batch).compile()
          check_memory(step_fn, config.batch_size // ways)
        if tracker is not None:
          tracker, refresh = track_refresh(tracker, state)
        state, metrics = step_fn(state, batch)
        if timer_start is None:  # throughput from here on, without the compilation
          jax.block_until_ready(metrics)
          timer_start = time.perf_counter()
        else:
          timed_images += config.batch_size
        window.append(metrics)
        if tracker is not None:
          refresh_window.append((step, refresh | {"refreshed": metrics["mask_refreshed"]}))
        progress.update(1)
        if step % config.log_every_steps == 0 or step == num_steps:
          flush(step)
          log_train(step)
        evaluated = step % eval_every == 0 or step == num_steps
        if evaluated:
          result = evaluate(state, eval_batches()) | {"step": step, "epoch": step / steps_per_epoch}
          if tracker is not None:
            result["ever_revived"] = float(tracker.ever_revived_fraction)
            result["sparsity"] = float(dcil_jax.sparsity(state.trained_masks))
          evals.append(result)
          writer.write(step, "eval", {k: v for k, v in result.items() if k != "step"})
          if verbose:
            progress.write(_format_eval(result))
        # One process: checked after every step. Several: they agree when they log (a host sync
        # they make anyway), so all stop at the same step.
        multi = jax.process_count() > 1
        stop = _agree(guard.requested) if not multi or step % config.log_every_steps == 0 else False
        if evaluated or stop or step % checkpoint_every == 0:
          flush(step)  # every record up to `step` is written before its checkpoint exists
          checkpointer.save(
            step,
            _checkpoint_tree(state, tracker),
            {
              "data": data_position,
              "pending_train": checkpoints.to_jsonable(window),
              "nonfinite": (faults.total, faults.consecutive),
              "config": config.to_dict(),
            },
            metrics={"top1": evals[-1]["top1"]} if evaluated else None,
          )
        if stop:
          checkpointer.wait()
          raise preemption.Preempted(step, guard.signum or signal.SIGTERM)
      checkpointer.wait()
      jax.block_until_ready(state)
      train_seconds = time.perf_counter() - timer_start if timer_start else 0.0
    finally:
      if own_progress:
        progress.close()
      # Stop the input threads (and worker processes) before the interpreter exits: a thread
      # killed inside JAX or grain at exit aborts the process.
      if train_batches is not None:
        train_batches.close()
        _close(train_iterator)
      checkpointer.close()

  summary = _summary(config, state, tracker, evals, refreshes, num_params, steps_per_epoch)
  summary["nonfinite_steps"] = faults.total
  # Eval time is included; the first step (compilation) is not.
  summary |= {
    "train_seconds": train_seconds,
    "images_per_second": timed_images / train_seconds if train_seconds else None,
  }
  if lead:
    (workpath / "summary.json").write_text(json.dumps(summary, indent=2))
  if verbose:
    print(format_summary(summary))
  writer.close()
  return summary


def _agree(flag: bool) -> bool:
  """``flag`` on any process (so every host stops at the same step); local on one process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.bool_(flag))))


class NonfiniteMonitor:
  """Acts on the ``finite`` metric of each step (the step itself already skipped the update).

  ``"stop"``: raise at the first non-finite step; ``"skip"``: go on, but stop after
  ``max_consecutive`` non-finite steps in a row (the run is not recovering).
  """

  def __init__(self, mode: str, max_consecutive: int):
    self.mode, self.max_consecutive = mode, max_consecutive
    self.total, self.consecutive = 0, 0

  def check(self, window: list[dict[str, Any]], first_step: int) -> None:
    for i, metrics in enumerate(window):
      step = first_step + i
      if bool(metrics["finite"]):
        self.consecutive = 0
        continue
      self.total += 1
      self.consecutive += 1
      loss = float(metrics["loss"])
      if self.mode == "stop":
        raise FloatingPointError(
          f"Step {step}: the loss ({loss}) or a gradient or parameter is NaN/Inf. The step was "
          "not applied and the run stops; the checkpoints in the workdir hold only good steps. "
          "Lower the learning rate, check the data, or set --config.on_nonfinite=skip."
        )
      logging.warning(
        "Step %d: non-finite loss (%s) or gradients; the step was skipped.", step, loss
      )
      if self.consecutive >= self.max_consecutive:
        raise FloatingPointError(
          f"Steps {step - self.consecutive + 1}..{step}: {self.consecutive} non-finite steps "
          "in a row (all skipped); the run is not recovering and stops. The checkpoints in the "
          "workdir hold only good steps."
        )


def check_memory(compiled: Any, per_device_batch: int) -> None:
  """Raises a clear error when XLA's estimate of one step exceeds a device's memory.

  Backends that report no memory limit (CPU) are not checked.
  """
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  analysis = compiled.memory_analysis()
  if "bytes_limit" not in stats or analysis is None:
    return
  need = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )
  if need > stats["bytes_limit"]:
    gib = 2.0**30
    raise MemoryError(
      f"One train step needs about {need / gib:.1f} GiB per device, but {device.device_kind} has "
      f"{stats['bytes_limit'] / gib:.1f} GiB. The batch is {per_device_batch} per device: lower "
      "--config.batch_size (and the learning rate with it), use bfloat16, or add devices."
    )


def _summary(
  config, state, tracker, evals, refreshes, num_params, steps_per_epoch
) -> dict[str, Any]:
  """Best and final sparse-path accuracy, its variability over the last quarter of the evals,
  per-layer sparsity, mask flip rates and revived weights."""
  final = evals[-1]
  best = max(evals, key=lambda r: r["top1"])
  summary: dict[str, Any] = {
    "model": config.model,
    "dataset": config.dataset,
    "method": config.method,
    "target_sparsity": config.sparsity,
    "num_params": int(num_params),
    "steps": int(final["step"]),
    "final": {k: v for k, v in final.items() if k not in ("examples",)},
    # Picked on the evaluation split, like the official logs: report the final numbers.
    "best": {k: best[k] for k in ("top1", "top5", "step", "epoch")},
  }
  if len(evals) >= 2:
    summary["top1_variability"] = stability.accuracy_variability([r["top1"] for r in evals])
  if state.method.uses_masks:
    masks = jax.device_get(state.trained_masks)
    summary["sparsity"] = float(dcil_jax.sparsity(masks))
    summary["layer_sparsity"] = {k: float(v) for k, v in dcil_jax.layer_sparsities(masks).items()}
    ramp_end = round(config.ramp_end_epoch * steps_per_epoch)
    flips = [r["flip_rate"] for r in refreshes]
    after = [r for r in refreshes if r["step"] > ramp_end]
    summary["flip_rate"] = {
      "mean": float(np.mean(flips)) if flips else None,
      "mean_after_ramp": float(np.mean([r["flip_rate"] for r in after])) if after else None,
      "last": flips[-1] if flips else None,
      "refreshes": len(refreshes),
    }
    if after:
      layers = [k for k in after[0] if k.startswith("flip_rate/")]
      summary["layer_flip_rate_after_ramp"] = {
        k.removeprefix("flip_rate/"): float(np.mean([r[k] for r in after])) for k in layers
      }
    summary["ever_revived"] = float(tracker.ever_revived_fraction)
  return summary


def _close(iterator: Any) -> None:
  """Closes a grain iterator (its reader threads and worker processes), if it can be closed."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


def _layer_name(keystr: str) -> str:
  """``"['BasicBlock_0']['Conv_1']['kernel']"`` -> ``"BasicBlock_0/Conv_1/kernel"``."""
  return "/".join(part.strip("'\"") for part in keystr.strip("[]").split("]["))


def _format_eval(result: dict[str, float]) -> str:
  text = (
    f"epoch {result['epoch']:.2f} (step {result['step']}): sparse top-1 {result['top1']:.4f} "
    f"top-5 {result['top5']:.4f} loss {result['loss']:.4f}"
  )
  if "dense_top1" in result:
    text += f" | dense top-1 {result['dense_top1']:.4f}"
  return text


def format_summary(summary: dict[str, Any]) -> str:
  """The summary as a short text report with the per-layer sparsity table."""
  final, best = summary["final"], summary["best"]
  lines = [
    f"== {summary['model']} / {summary['dataset']} / {summary['method']}, "
    f"{summary['steps']} steps ==",
    f"final sparse-path top-1 {final['top1']:.4f}  top-5 {final['top5']:.4f}"
    + (f"  (dense path top-1 {final['dense_top1']:.4f})" if "dense_top1" in final else ""),
    f"best  sparse-path top-1 {best['top1']:.4f}  top-5 {best['top5']:.4f} at epoch "
    f"{best['epoch']:.2f} (picked on the eval split: report the final numbers)",
    f"throughput {summary.get('images_per_second') or float('nan'):.1f} images/s",
  ]
  if "sparsity" in summary:
    flips = summary["flip_rate"]
    fmt = lambda x: "n/a" if x is None else f"{x:.5f}"
    lines += [
      f"sparsity {summary['sparsity']:.4f} (target {summary['target_sparsity']}); mask flip rate "
      f"mean {fmt(flips['mean'])}, after the ramp {fmt(flips['mean_after_ramp'])}, "
      f"last {fmt(flips['last'])} over {flips['refreshes']} refreshes",
      "layer sparsity:",
    ]
    width = max(len(k) for k in summary["layer_sparsity"])
    lines += [f"  {k:<{width}}  {v:.4f}" for k, v in summary["layer_sparsity"].items()]
  return "\n".join(lines)


def _progress(total: int, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
