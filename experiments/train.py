"""The training loop shared by every entry point (``experiments.cifar``, ``imagenet``,
``digits``, ``sweep`` and ``quickstart``).

One loop for every dataset, model and method: the library's ``TrainState`` and jitted
``train_step`` on a device mesh (batch split over ``data``, state replicated, optionally one
DCIL path per device), TFDS + grain input, an evaluation of the sparse path (and DCIL's dense
path) every epoch, TensorBoard + JSONL metrics, checkpoints that resume exactly, and a final
summary in ``summary.json``.

Each responsibility has one owner: :func:`restore_or_init` (a fresh state or the newest
checkpoint), :class:`Evaluator`, :class:`CheckpointPolicy`, and from ``experiments.loop`` the
metric buffer, the refresh log, the NaN/Inf monitor, the throughput timer, the stop policy and
``itstime`` for every periodic decision. :func:`train_and_evaluate` wires them; its loop body
fits on a screen.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

import dcil_jax
from dcil_jax import sharding
from experiments import (
  checkpoints,
  input_pipeline,
  loop,
  preemption,
  resolve,
  run_state,
  statistics,
  watchdog,
)
from experiments.metric_writers import MetricWriter, read_jsonl
from experiments.resolve import BadConfigError  # noqa: F401  (the loop raises it)

METRICS_FILE = "metrics.jsonl"


class WorkdirError(OSError):
  """The workdir cannot be created or written."""


class Plan(NamedTuple):
  """The run's length and periods in steps, from the resolved config."""

  steps_per_epoch: int
  num_steps: int
  eval_every: int
  checkpoint_every: int | None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Plan:
    steps_per_epoch = config.steps_per_epoch or input_pipeline.steps_per_epoch(
      config.dataset, config.batch_size, config.run.data_dir
    )
    return cls(
      steps_per_epoch=steps_per_epoch,
      num_steps=config.num_train_steps or round(config.num_epochs * steps_per_epoch),
      eval_every=max(1, round(config.run.eval_every_epochs * steps_per_epoch)),
      checkpoint_every=config.run.checkpoint_every_steps,
    )


def prepare_workdir(workdir: str, lead: bool) -> epath.Path:
  """Creates ``workdir`` and checks that it can be written, before any work is done. A local
  relative path is made absolute (orbax writes only to absolute paths)."""
  if "://" not in str(workdir):
    workdir = os.path.abspath(os.path.expanduser(workdir))
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


class RunHistory(NamedTuple):
  """What a resumed run knows of the steps before its checkpoint (from ``metrics.jsonl``)."""

  evals: list[dict[str, Any]]
  refreshes: list[dict[str, Any]]


def rewind_metrics(workpath: epath.Path, step: int, write: bool) -> RunHistory:
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


class Start(NamedTuple):
  """Where a run starts: a fresh state at step 0, or what the newest checkpoint held."""

  state: Any
  step: int
  data_position: Any  # the train iterator's position after the last batch trained on
  pending: list[dict[str, Any]]  # train metrics not yet logged (host values)
  nonfinite: tuple[int, int]  # NonfiniteMonitor counts (total, consecutive)
  history: RunHistory


def restore_or_init(
  config: ml_collections.ConfigDict,
  workpath: epath.Path,
  checkpointer: checkpoints.RunCheckpointer,
  fresh: Any,
  lead: bool,
) -> Start:
  """``fresh``, or the newest readable checkpoint in ``workpath`` restored into it, after
  checking that the workdir holds this experiment (``config`` but ``run``).

  A fresh run writes ``config.json``; a resumed one cuts ``metrics.jsonl`` back to its step.

  Raises:
    CheckpointMismatchError: the workdir's config or checkpoint is another experiment's.
  """
  restored = checkpointer.restore_latest(run_state.checkpoint_tree(fresh))
  config_path = workpath / "config.json"
  force, what = config.run.force_resume, str(workpath)
  if restored is not None:
    checkpoints.check_config(restored.meta["config"], config.to_dict(), force=force, what=what)
  elif config_path.exists():  # a run that wrote no checkpoint yet, or another experiment
    saved = json.loads(config_path.read_text())
    checkpoints.check_config(saved, config.to_dict(), force=force, what=what)
  if restored is None:
    if lead:
      config_path.write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return Start(fresh, 0, None, [], (0, 0), rewind_metrics(workpath, 0, write=lead))
  meta = restored.meta
  return Start(
    run_state.from_checkpoint_tree(fresh, restored.state),
    restored.step,
    meta["data"],
    meta["pending_train"],
    tuple(meta.get("nonfinite", (0, 0))),
    rewind_metrics(workpath, restored.step, write=lead),
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
    data_dir=config.run.data_dir,
    image_size=config.image_size,
    dtype=np.dtype(run_state.DTYPES[config.dtype]),
    worker_count=config.run.worker_count,
  )
  if position is not None:
    iterator.set_state(position)
  batches = input_pipeline.prefetch(
    ((sharding.shard_batch(batch, mesh), iterator.get_state()) for batch in iterator),
    config.run.prefetch,
  )
  return iterator, batches


def evaluate(state: Any, batches) -> dict[str, float]:
  """Sparse-path (deployable) metrics over ``batches``, and DCIL's dense path as ``dense_*``."""
  paths = run_state.eval_paths(state)
  totals = {path: None for path in paths}
  for batch in batches:
    for path in paths:
      counts = dcil_jax.eval_step(state, batch, path)
      totals[path] = counts if totals[path] is None else jax.tree.map(jnp.add, totals[path], counts)
  results = {}
  for path in paths:
    t = jax.device_get(totals[path])
    prefix = "" if path is None else f"{path}_"
    n = max(float(t["count"]), 1.0)
    results |= {f"{prefix}{k}": float(t[k]) / n for k in ("loss", "top1", "top5")}
  results["examples"] = float(jax.device_get(totals[None])["count"])
  invalid = float(jax.device_get(totals[None])["invalid_labels"])
  if invalid:
    raise ValueError(
      f"{invalid:.0f} evaluation examples have a class index outside [0, num_classes): check "
      "the eval split's labels and the model's num_classes."
    )
  return results


class Evaluator:
  """Evaluates the state on the eval split, records the result (``records``, the writer) and
  returns it: sparse-path top-1/top-5/loss, DCIL's dense path, and for sparse methods the
  trained masks' sparsity and the fraction of weights ever revived."""

  def __init__(self, config, mesh, steps_per_epoch: int, writer, records=(), echo=None):
    self.config, self.mesh, self.steps_per_epoch = config, mesh, steps_per_epoch
    self.writer, self.echo = writer, echo
    self.records: list[dict[str, Any]] = list(records)

  def batches(self) -> Iterator[dict[str, jax.Array]]:
    config = self.config
    it = input_pipeline.create_eval_iterator(
      config.dataset,
      global_batch_size=config.batch_size,
      data_dir=config.run.data_dir,
      image_size=config.image_size,
      dtype=np.dtype(run_state.DTYPES[config.dtype]),
      worker_count=config.run.worker_count,
    )
    try:
      for i, batch in enumerate(it):
        if config.run.max_eval_steps is not None and i >= config.run.max_eval_steps:
          break
        watchdog.beat(f"eval batch {i}")
        yield sharding.shard_batch(batch, self.mesh)
    finally:
      _close(it)

  def __call__(self, state: Any, step: int) -> dict[str, Any]:
    result = evaluate(state, self.batches())
    result |= {"step": step, "epoch": step / self.steps_per_epoch}
    if state.method.uses_masks:
      result["ever_revived"] = run_state.ever_revived(state)
      result["sparsity"] = run_state.trained_sparsity(state)
    self.records.append(result)
    self.writer.write(step, "eval", {k: v for k, v in result.items() if k != "step"})
    if self.echo is not None:
      self.echo(format_eval(result))
    return result


class CheckpointPolicy:
  """When to checkpoint (at every evaluation, every ``every`` steps, on a stop) and what a
  checkpoint holds besides the arrays: the data position, the metrics not yet logged, the
  non-finite counts and the config (for :func:`checkpoints.check_config` on resume)."""

  def __init__(self, checkpointer: checkpoints.RunCheckpointer, every: int | None, config):
    self.checkpointer, self.every, self.config = checkpointer, every, config.to_dict()

  def due(self, step: int, evaluated: bool, stop: bool) -> bool:
    return evaluated or stop or loop.itstime(step, self.every)

  def save(self, step, state, data_position, buffer, monitor, top1=None) -> None:
    self.checkpointer.save(
      step,
      run_state.checkpoint_tree(state),
      {
        "data": data_position,
        "pending_train": buffer.pending(),
        "nonfinite": monitor.counts(),
        "config": self.config,
      },
      metrics=None if top1 is None else {"top1": top1},
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, progress: Any = None
) -> dict[str, Any]:
  """Trains ``config`` and evaluates every ``run.eval_every_epochs``; returns the summary.

  A ``workdir`` that holds checkpoints of the same experiment is continued from the newest
  readable one, and the continued run computes exactly what an uninterrupted one would (same
  data order, parameters and metrics). Checkpoints go to ``workdir/checkpoints`` at every
  evaluation, every ``run.checkpoint_every_steps``, at the end, and on SIGTERM/SIGINT (then
  :class:`experiments.preemption.Preempted` is raised).

  Writes ``config.json``, ``metrics.jsonl`` (``train`` records every ``log_every_steps``,
  ``eval`` records, and for DCIL/DPF a ``refresh`` record per mask refresh with the flip rate
  overall and per layer and the revived fractions), TensorBoard events and ``summary.json`` to
  ``workdir`` (from process 0 only).

  Args:
    progress: a tqdm bar to advance by one per step (a sweep's bar over many runs); the run
      then prints nothing itself. Default: its own bar (``config.run.progress``) and printed
      evals.

  Raises:
    ValueError: a bad config (:class:`BadConfigError`), or a workdir or checkpoint of another
      experiment (:class:`experiments.checkpoints.CheckpointMismatchError`).
    WorkdirError: the workdir cannot be written.
    FloatingPointError: a non-finite loss or gradient with ``run.on_nonfinite="stop"``.
    Preempted: SIGTERM or SIGINT; a checkpoint was written.
  """
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(path_parallel=config.path_parallel)
  ways, hosts = sharding.data_parallelism(mesh), jax.process_count()
  platform = resolve.platform_name(jax.default_backend())
  config = resolve.resolve_config(config, data_parallelism=ways, platform=platform)
  if config.batch_size % ways or config.batch_size % hosts:
    raise BadConfigError(
      f"batch_size={config.batch_size} must split evenly over the {ways} data-parallel devices "
      f"and {hosts} processes; try a multiple of {math.lcm(ways, hosts)}."
    )
  plan = Plan.from_config(config)
  workpath = prepare_workdir(workdir, lead)
  fresh = run_state.create_train_state(config, mesh, plan.steps_per_epoch)
  watchdog.beat("train state initialised")
  checkpointer = checkpoints.RunCheckpointer(
    workpath / checkpoints.CHECKPOINT_DIR,
    keep=config.run.keep_checkpoints,
    async_save=config.run.async_checkpointing,
  )
  watchdog.beat("checkpoint manager opened")
  try:
    start = restore_or_init(config, workpath, checkpointer, fresh, lead)
  except BaseException:
    checkpointer.close()
    raise
  state = start.state
  masked = state.method.uses_masks
  watchdog.beat(f"start state ready (step {start.step})")
  writer = MetricWriter(workdir, enabled=lead)
  verbose = lead and progress is None
  info = run_state.describe(state)
  if verbose:
    resumed = f", resumed at step {start.step}" if start.step else ""
    print(
      f"{config.model} ({info['num_params']:,} params) on {config.dataset}, "
      f"method={config.method}{_setting(config)}, sparsity={config.sparsity}, "
      f"{plan.num_steps} steps "
      f"({plan.steps_per_epoch}/epoch){resumed}, batch {config.batch_size} "
      f"({config.batch_size // ways} per device) on {jax.device_count()} "
      f"{jax.default_backend()} device(s), mesh {dict(mesh.shape)}, "
      f"strategy={info['strategy']}, dtype={config.dtype}\n"
      + resolve.milestones(config, plan.steps_per_epoch)
    )
  own_progress = progress is None
  if own_progress:
    progress = _progress(plan.num_steps, enabled=lead and config.run.progress)
  progress.update(start.step)

  lr_fn = jax.jit(run_state.learning_rate_schedule(config, plan.steps_per_epoch))
  monitor = loop.NonfiniteMonitor(
    config.run.on_nonfinite, config.run.max_consecutive_nonfinite, start.nonfinite
  )
  buffer = loop.MetricBuffer(monitor, start.pending)
  refreshes = loop.RefreshLog(
    lambda step, record: writer.write(step, "refresh", record), start.history.refreshes
  )
  evaluator = Evaluator(
    config,
    mesh,
    plan.steps_per_epoch,
    writer,
    start.history.evals,
    echo=progress.write if verbose else None,
  )
  saver = CheckpointPolicy(checkpointer, plan.checkpoint_every, config)
  throughput = loop.Throughput()

  def log_train(step: int) -> None:
    lr = jax.device_get(lr_fn(jax.device_put(step - 1)))  # explicit: the steps never transfer
    scalars = buffer.pop_mean() | {"learning_rate": float(lr)}
    if (rate := throughput.rate()) is not None:
      scalars["images_per_second"] = rate
    writer.write(step, "train", scalars)
    progress.set_postfix(
      loss=f"{scalars['loss']:.3f}", acc=f"{scalars['accuracy_sparse']:.3f}", refresh=False
    )

  def fetch(step: int) -> None:  # every record up to `step` reaches the host and the writer
    refreshes.flush()
    buffer.fetch(step)

  data_position, train_iterator, batches, step_fn = start.data_position, None, None, None
  with preemption.PreemptionGuard() as guard:
    should_stop = loop.StopPolicy(lambda: guard.requested, config.log_every_steps, hosts)
    try:
      if start.step < plan.num_steps:
        train_iterator, batches = create_train_input(config, mesh, data_position)
      for step in range(start.step + 1, plan.num_steps + 1):
        batch, data_position = next(batches)
        if step_fn is None:  # a step that cannot fit in device memory fails here, clearly
          watchdog.beat("first batch read; compiling the train step")
          step_fn = run_state.compile_train_step(state, batch)
          watchdog.beat("train step compiled")
          check_memory(step_fn, config.batch_size // ways)
        state, metrics = step_fn(state, batch)
        watchdog.beat(f"train step {step} dispatched")
        throughput.step(metrics, config.batch_size)
        buffer.append(metrics)
        if masked:  # the refresh's record, from the state (device values: no host sync)
          refreshes.append(step, run_state.refresh_record(state, metrics["mask_refreshed"]))
        progress.update(1)
        if loop.itstime(step, config.log_every_steps, plan.num_steps):
          fetch(step)
          log_train(step)
        evaluated = loop.itstime(step, plan.eval_every, plan.num_steps)
        top1 = evaluator(state, step)["top1"] if evaluated else None
        asked = step == config.run.stop_after_step and step < plan.num_steps
        stop = should_stop(step) or asked
        if saver.due(step, evaluated, stop):
          fetch(step)  # every record up to `step` is written before its checkpoint exists
          saver.save(step, state, data_position, buffer, monitor, top1)
        if stop:
          checkpointer.wait()
          watchdog.beat(f"checkpoint of step {step} written")
          signum = guard.signum or (None if asked else signal.SIGTERM)
          raise preemption.Preempted(step, signum)
      checkpointer.wait()
      jax.block_until_ready(state)
      train_seconds = throughput.seconds()
    finally:
      if own_progress:
        progress.close()
      # Stop the input threads (and worker processes) before the interpreter exits: a thread
      # killed inside JAX or grain at exit aborts the process.
      if batches is not None:
        batches.close()
        _close(train_iterator)
      checkpointer.close()

  summary = summarize(config, state, evaluator.records, refreshes.records, plan)
  summary["num_params"] = info["num_params"]
  summary["nonfinite_steps"] = monitor.total
  # Eval time is included; the first step (compilation) is not.
  summary |= {
    "train_seconds": train_seconds,
    "images_per_second": throughput.images / train_seconds if train_seconds else None,
  }
  if lead:
    (workpath / "summary.json").write_text(json.dumps(summary, indent=2))
  if verbose:
    print(format_summary(summary))
  writer.close()
  return summary


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


def flip_rate_summary(refreshes: list[dict[str, Any]], ramp_end: int) -> dict[str, Any]:
  """Mask flip rates of a run's refresh records: mean, mean after the ramp (the refreshes at
  steps after ``ramp_end``, when the masks only swap weights at the final sparsity), last, and
  per layer after the ramp. The one definition of "flip rate after the ramp"."""
  flips = [r["flip_rate"] for r in refreshes]
  after = [r for r in refreshes if r["step"] > ramp_end]
  out: dict[str, Any] = {
    "flip_rate": {
      "mean": float(np.mean(flips)) if flips else None,
      "mean_after_ramp": float(np.mean([r["flip_rate"] for r in after])) if after else None,
      "last": flips[-1] if flips else None,
      "refreshes": len(refreshes),
    }
  }
  if after:
    layers = [k for k in after[0] if k.startswith("flip_rate/")]
    out["layer_flip_rate_after_ramp"] = {
      k.removeprefix("flip_rate/"): float(np.mean([r[k] for r in after])) for k in layers
    }
  return out


def summarize(config, state, evals, refreshes, plan: Plan) -> dict[str, Any]:
  """Best and final sparse-path accuracy, its variability over the last quarter of the evals,
  per-layer sparsity, mask flip rates and revived weights, and the deployable model's kept
  parameters, MACs and bytes (``deploy``)."""
  final = evals[-1]
  best = max(evals, key=lambda r: r["top1"])
  summary: dict[str, Any] = {
    "model": config.model,
    "dataset": config.dataset,
    "method": config.method,
    "target_sparsity": config.sparsity,
    "steps": int(final["step"]),
    "final": {k: v for k, v in final.items() if k not in ("examples",)},
    # Picked on the evaluation split, like the official logs: report the final numbers.
    "best": {k: best[k] for k in ("top1", "top5", "step", "epoch")},
  }
  if len(evals) >= 2:
    summary["top1_variability"] = statistics.accuracy_variability([r["top1"] for r in evals])
  if state.method.uses_masks:
    summary |= run_state.mask_report(state)
    summary |= flip_rate_summary(refreshes, run_state.ramp_steps(config, plan.steps_per_epoch))
    summary["ever_revived"] = run_state.ever_revived(state)
  summary["deploy"] = run_state.deploy_report(state, run_state.example_input(config))
  return summary


def _close(iterator: Any) -> None:
  """Closes a grain iterator (its reader threads and worker processes), if it can be closed."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


def format_eval(result: dict[str, float]) -> str:
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
  if deploy := summary.get("deploy"):
    macs = "n/a" if deploy["macs"] is None else f"{deploy['kept_macs']:,} of {deploy['macs']:,}"
    lines.append(
      f"deployable model: {deploy['kept_params']:,} of {deploy['params']:,} params, MACs per "
      f"example {macs}, {deploy['compressed_bytes']:,} bytes compressed "
      f"({deploy['dense_bytes']:,} dense)"
    )
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


def _setting(config: ml_collections.ConfigDict) -> str:
  """The DCIL preset and any gradient clip, for the run's first line: a run never hides them."""
  parts = [f"preset {config.dcil_preset}"] if config.method == "dcil" else []
  if config.max_step_norm:
    parts.append(f"step bound lr·|g| <= {config.max_step_norm:g}")
  if config.grad_clip_norm:
    parts.append(f"gradient clipped at norm {config.grad_clip_norm:g}")
  return f" ({', '.join(parts)})" if parts else ""


def _progress(total: int, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
