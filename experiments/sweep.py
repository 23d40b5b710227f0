"""A grid of runs: methods x sparsities x seeds, resumable, with one progress bar.

  python -m experiments.sweep --workdir=results/digits_small_cnn \
      --config=experiments/configs/digits.py:small_cnn
  python -m experiments.sweep --workdir=runs/c10 --config=experiments/configs/cifar.py \
      --config.model=resnet20 --sparsities=0.9,0.95 --seeds=0,1,2 --shard=1/4

Each run trains the base ``--config`` with ``method``, ``sparsity`` and ``seed`` set, through the
same loop and the same config resolution as ``experiments.cifar``
(:func:`experiments.train.train_and_evaluate`; ``--accelerator`` and ``--distributed`` as there,
so a sweep on TPU runs in bfloat16 like a single run), into
``WORKDIR/<run name>/``. ``dense`` runs once per seed (it has no sparsity). A run whose
``summary.json`` exists is finished and skipped, and an interrupted run continues from its
newest checkpoint, so the same command continues an interrupted sweep exactly (on SIGTERM it
checkpoints and exits with code 75, like the single-run commands). ``--shard=k/n`` runs
every n-th run only, for n separate processes or machines sharing one WORKDIR.
``WORKDIR/sweep.json`` lists the grid; ``python -m experiments.report WORKDIR`` turns the
finished runs into ``REPORT.md`` and figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from absl import app, flags
from ml_collections import ConfigDict, config_flags

import dcil_jax
from experiments import launch

DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
SUMMARY = "summary.json"


class Run(NamedTuple):
  """One cell of the grid."""

  method: str
  sparsity: float
  seed: int

  @property
  def name(self) -> str:
    if self.method == "dense":
      return f"dense_seed{self.seed}"
    return f"{self.method}_s{self.sparsity:g}_seed{self.seed}"


def make_grid(
  methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]
) -> list[Run]:
  """The runs, seed by seed (so a partial sweep already covers every method and sparsity)."""
  unknown = [m for m in methods if m not in dcil_jax.METHODS]
  if unknown or not methods:
    raise ValueError(
      f"methods must be a non-empty subset of {tuple(dcil_jax.METHODS)}, got {list(methods)}."
    )
  bad = [s for s in sparsities if not 0 < s < 1]
  if bad or not sparsities:
    raise ValueError(f"sparsities must be a non-empty list in (0, 1), got {list(sparsities)}.")
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct and non-negative, got {list(seeds)}.")
  runs = []
  for seed in seeds:
    if "dense" in methods:
      runs.append(Run("dense", 0.0, seed))
    runs += [Run(m, s, seed) for s in sparsities for m in methods if m != "dense"]
  return runs


def parse_shard(text: str) -> tuple[int, int]:
  """``"k/n"`` -> ``(k, n)`` with ``0 <= k < n``."""
  try:
    k, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard must look like k/n (e.g. 0/4), got {text!r}.") from None
  if not 0 <= k < n:
    raise ValueError(f"--shard={text}: need 0 <= k < n.")
  return k, n


def run_config(base: ConfigDict, run: Run) -> ConfigDict:
  """``base`` with the run's method, sparsity and seed, and no per-run progress bar."""
  config = ConfigDict(base.to_dict())
  with config.unlocked():
    config.method, config.sparsity, config.seed = run.method, run.sparsity, run.seed
    config.run.progress = False
  return config


def is_finished(workdir: str, run: Run) -> bool:
  return os.path.exists(os.path.join(workdir, run.name, SUMMARY))


def run_steps(config: ConfigDict) -> int:
  """Train steps of one run (for the sweep's progress bar)."""
  import jax

  from experiments import input_pipeline, resolve

  platform = resolve.platform_name(jax.default_backend())
  resolved = resolve.resolve_config(config, jax.device_count(), platform)
  per_epoch = resolved.steps_per_epoch or input_pipeline.steps_per_epoch(
    resolved.dataset, resolved.batch_size, resolved.run.data_dir
  )
  return resolved.num_train_steps or round(resolved.num_epochs * per_epoch)


def run_sweep(
  base: ConfigDict,
  workdir: str,
  runs: Sequence[Run],
  *,
  shard: tuple[int, int] = (0, 1),
  progress: bool = True,
) -> list[dict[str, Any]]:
  """Trains every unfinished run of this shard in turn; returns the summaries of those it ran.

  A run directory without ``summary.json`` is an interrupted run: it continues from its newest
  checkpoint (:func:`experiments.train.train_and_evaluate`).
  """
  from tqdm.auto import tqdm

  from experiments import train

  os.makedirs(workdir, exist_ok=True)
  grid = {
    "config": base.to_dict(),
    "runs": [r._asdict() | {"name": r.name} for r in runs],
  }
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(grid, f, indent=2, default=str)
  k, n = shard
  mine = [r for i, r in enumerate(runs) if i % n == k]
  steps = {r: run_steps(run_config(base, r)) for r in mine}
  done = [r for r in mine if is_finished(workdir, r)]
  bar = tqdm(
    total=sum(steps.values()),
    initial=sum(steps[r] for r in done),
    desc=f"sweep ({len(done)}/{len(mine)} runs done)",
    unit="step",
    disable=not progress,
    dynamic_ncols=True,
  )
  summaries = []
  try:
    for run in mine:
      if run in done:
        continue
      rundir = os.path.join(workdir, run.name)
      start = time.perf_counter()
      summary = train.train_and_evaluate(run_config(base, run), rundir, progress=bar)
      summaries.append(summary)
      done.append(run)
      bar.set_description(f"sweep ({len(done)}/{len(mine)} runs done)")
      text = f"{run.name}: final sparse top-1 {summary['final']['top1']:.4f}"
      if "sparsity" in summary:
        text += f", sparsity {summary['sparsity']:.3f}"
        text += f", flip rate after ramp {summary['flip_rate']['mean_after_ramp'] or 0:.5f}"
      bar.write(text + f" ({time.perf_counter() - start:.0f} s)")
  finally:
    bar.close()
  return summaries


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def define_flags() -> None:
  default_config = os.path.join(os.path.dirname(__file__), "configs", "digits.py")
  flags.DEFINE_string("workdir", None, "Sweep directory: one sub-directory per run.")
  config_flags.DEFINE_config_file(
    "config", default_config, "Base config file (path[:arg]); override with --config.x=..."
  )
  flags.DEFINE_list("methods", list(dcil_jax.METHODS), "Methods to compare.")
  flags.DEFINE_string("sparsities", ",".join(map(str, DEFAULT_SPARSITIES)), "Target sparsities.")
  flags.DEFINE_string("seeds", "0,1,2", "Seeds (model init, data order and augmentation).")
  flags.DEFINE_string("shard", "0/1", "k/n: run only runs k, k+n, k+2n, ... of the grid.")
  flags.DEFINE_bool("progress", True, "Show the progress bar.")
  launch.define_platform_flags()
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    runs = make_grid(f.methods, _floats(f.sparsities), _ints(f.seeds))
    shard = parse_shard(f.shard)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  launch.start(f.accelerator, f.distributed, f.watchdog_seconds)
  run_or_exit(f.config, f.workdir, runs, shard=shard, progress=f.progress)


def run_or_exit(base: ConfigDict, workdir: str, runs: Sequence[Run], **kwargs: Any):
  """:func:`run_sweep` with the exit codes of ``experiments.launch`` (75 on a signal, 2 and one
  message for bad input, 3 for a NaN/Inf step); returns the summaries."""
  from experiments import preemption

  try:
    return run_sweep(base, workdir, runs, **kwargs)
  except preemption.Preempted as e:
    print(f"{e} The same sweep command continues it.", file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except launch.bad_input_errors() as e:
    launch.fail(launch.EXIT_BAD_INPUT, e)
  except FloatingPointError as e:
    launch.fail(launch.EXIT_NONFINITE, e)


if __name__ == "__main__":
  define_flags()
  app.run(main)
