"""A run's config resolved in one place: recipe, milestones, accelerator defaults, checks.

Every entry point (``experiments.cifar``/``imagenet``/``digits``, ``experiments.sweep``,
``experiments.quickstart``, the benchmarks) trains through :func:`resolve_config`, so they agree
on the dtype of a platform, the recipe of a model and what a bad setting says.

The config has two parts (``experiments/configs/common.py``): the experiment (model, method,
recipe, ...: what a run computes) and ``config.run`` (where the data is, workers, progress bar,
evaluation and checkpoint settings, NaN policy: how a run is executed). A workdir may be resumed
with another ``config.run``, never with another experiment.
"""

from __future__ import annotations

import os

import ml_collections

import dcil_jax
from dcil_jax.granularity import FILTER_SCORES
from dcil_jax.models import MODELS
from experiments import input_pipeline, recipes, run_state

# What each platform sets unless the config says otherwise.
ACCELERATOR_DEFAULTS = {
  "tpu": {"dtype": "bfloat16"},
  "gpu": {"dtype": "bfloat16"},
  "cpu": {"dtype": "float32"},
}
NONFINITE_MODES = ("stop", "skip")
# Recipe fields counted in epochs: scaled with num_epochs when only num_epochs is overridden.
EPOCH_FIELDS = ("warmup_epochs", "lr_boundaries", "ramp_end_epoch", "kd_start_epoch")


class BadConfigError(ValueError):
  """A config setting that cannot work; the message says what to change."""


def platform_name(backend: str) -> str:
  """``jax.default_backend()`` -> ``"tpu"``, ``"gpu"`` or ``"cpu"``."""
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def resolve_config(
  config: ml_collections.ConfigDict, data_parallelism: int = 1, platform: str = "cpu"
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the recipe's values filled in, checked for sense.

  - Recipe fields left at ``None`` come from the recipe. When ``num_epochs`` is set to another
    length than the recipe's, the recipe's epoch milestones (warm-up, lr boundaries, ramp end,
    distillation start) that are not set either are scaled with it, at the recipe's ratios.
  - ``per_device_batch_size``, when set, gives ``batch_size`` = it × ``data_parallelism`` (the
    devices the batch is split over); a recipe that scales its learning rate with the batch
    (ImageNet) follows.
  - ``dtype`` defaults to the platform's (bfloat16 on TPU and GPU, float32 on CPU).

  Raises:
    BadConfigError: with what is wrong and how to fix it, for any setting that cannot work.
  """
  try:
    return _resolve_config(config, data_parallelism, platform)
  except BadConfigError:
    raise
  except ValueError as e:  # from the library's and the recipes' own checks
    raise BadConfigError(str(e)) from e


def _resolve_config(config: ml_collections.ConfigDict, data_parallelism: int, platform: str):
  config = ml_collections.ConfigDict(config.to_dict())  # plain copy, no shared references
  if config.dataset not in input_pipeline.DATASETS:
    raise ValueError(
      f"Unknown dataset {config.dataset!r}; expected one of {sorted(input_pipeline.DATASETS)}."
    )
  if config.model not in MODELS:
    raise ValueError(f"Unknown model {config.model!r}; expected one of {sorted(MODELS)}.")
  if platform not in ACCELERATOR_DEFAULTS:
    raise ValueError(f"Unknown platform {platform!r}; expected one of {list(ACCELERATOR_DEFAULTS)}")
  dcil_jax.get_method(config.method)  # an unknown method: ValueError naming the methods
  recipe = recipes.recipe_for(config.recipe, config.model)
  scale = 1.0
  if config.num_epochs is not None and config.num_epochs != recipe["num_epochs"]:
    if config.num_epochs <= 0:
      raise ValueError(f"num_epochs must be positive, got {config.num_epochs}")
    scale = config.num_epochs / recipe["num_epochs"]
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
        config[name] = _scaled(recipe[name], scale) if name in EPOCH_FIELDS else recipe[name]
    config.lr_boundaries = tuple(config.lr_boundaries)
    if config.image_size is None:
      config.image_size = input_pipeline.DATASETS[config.dataset].image_size
    for name, value in ACCELERATOR_DEFAULTS[platform].items():
      if config[name] is None:
        config[name] = value
    if config.run.worker_count is None:
      config.run.worker_count = default_worker_count()
    if config.max_step_norm is None:
      robust = config.method == "dcil" and config.dcil_preset == "robust"
      config.max_step_norm = dcil_jax.DCIL.ROBUST_MAX_STEP_NORM if robust else 0.0
  _check_config(config)
  return config


def _scaled(value, scale: float):
  if scale == 1.0:
    return value
  if isinstance(value, tuple | list):
    return tuple(round(v * scale, 6) for v in value)
  return round(value * scale, 6)


def default_worker_count(cpus: int | None = None) -> int:
  """Grain worker processes: all but 4 cores (for the step, the prefetch and the OS), at most 64
  (the decoding rate per core: benchmarks/results/input_pipeline_cpu.md); none on
  small machines, where reader threads in the main process do as well."""
  if cpus is None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return 0 if cpus <= 4 else min(64, cpus - 4)


def milestones(config: ml_collections.ConfigDict, steps_per_epoch: int) -> str:
  """The resolved schedule in epochs and steps, printed when a run starts."""
  step = lambda epochs: round(epochs * steps_per_epoch)
  parts = [f"{config.num_epochs:g} epochs of {steps_per_epoch} steps"]
  if config.warmup_epochs:
    parts.append(f"warm-up to epoch {config.warmup_epochs:g} (step {step(config.warmup_epochs)})")
  if config.lr_schedule == "step" and config.lr_boundaries:
    at = ", ".join(f"{b:g} (step {step(b)})" for b in config.lr_boundaries)
    parts.append(f"lr x{config.lr_decay:g} at epochs {at}")
  else:
    parts.append(f"lr {config.lr_schedule}")
  if config.method != "dense":
    parts.append(
      f"sparsity ramp to {config.sparsity:g} ends at epoch {config.ramp_end_epoch:g} "
      f"(step {run_state.ramp_steps(config, steps_per_epoch)})"
    )
  if config.method == "dcil":
    parts.append(
      f"distillation from epoch {config.kd_start_epoch:g} (step {step(config.kd_start_epoch)})"
    )
  return "schedule: " + "; ".join(parts)


def _check_config(config: ml_collections.ConfigDict) -> None:
  problems = []
  run = config.run
  if not 0.0 <= config.sparsity < 1.0:
    problems.append(f"sparsity must be in [0, 1), got {config.sparsity}")
  if config.method == "dense" and config.sparsity:
    problems.append("method='dense' trains no masks: set --config.sparsity=0 or another method")
  if config.dtype not in run_state.DTYPES:
    problems.append(f"dtype must be one of {sorted(run_state.DTYPES)}, got {config.dtype!r}")
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
  if config.granularity not in ("weight", "filter"):
    problems.append(f"granularity must be 'weight' or 'filter', got {config.granularity!r}")
  if config.granularity == "filter" and (
    config.filter_score not in FILTER_SCORES or config.distribution == "erk"
  ):
    problems.append(
      f"filter masks take filter_score in {FILTER_SCORES} and a global/layerwise split"
    )
  allocation = config.get("filter_allocation", "global")
  if allocation not in run_state.FILTER_ALLOCATIONS:
    problems.append(
      f"filter_allocation must be one of {tuple(run_state.FILTER_ALLOCATIONS)}, got {allocation!r}"
    )
  elif allocation != "global" and (
    config.granularity != "filter"
    or config.distribution != "global"
    or config.method not in ("dcil", "dpf")
  ):
    problems.append(
      f"filter_allocation={allocation!r} prunes channel groups of filter masks: it needs "
      "granularity='filter', distribution='global' and method dcil or dpf (got "
      f"{config.granularity!r}, {config.distribution!r}, {config.method!r})"
    )
  if config.dcil_preset not in dcil_jax.DCIL.PRESETS:
    problems.append(
      f"dcil_preset must be one of {dcil_jax.DCIL.PRESETS}, got {config.dcil_preset!r}"
    )
  if config.kd_ramp_epochs is not None and config.kd_ramp_epochs < 0:
    problems.append(f"kd_ramp_epochs must be >= 0, got {config.kd_ramp_epochs}")
  if config.kd_clip is not None and not config.kd_clip > 0:
    problems.append(f"kd_clip must be None or > 0, got {config.kd_clip}")
  if not config.grad_clip_norm >= 0:
    problems.append(f"grad_clip_norm must be >= 0 (0: no clipping), got {config.grad_clip_norm}")
  if not config.max_step_norm >= 0:
    problems.append(f"max_step_norm must be >= 0 (0: no bound), got {config.max_step_norm}")
  if config.path_parallel and config.method != "dcil":
    problems.append("path_parallel runs DCIL's two paths on two devices; it needs method='dcil'")
  if config.update_every <= 0 or config.log_every_steps <= 0:
    problems.append("update_every and log_every_steps must be positive")
  if run.prefetch < 1:
    problems.append(f"run.prefetch must be >= 1 batch, got {run.prefetch}")
  if run.worker_count < 0:
    problems.append(f"run.worker_count must be >= 0, got {run.worker_count}")
  if run.eval_every_epochs <= 0:
    problems.append(f"run.eval_every_epochs must be positive, got {run.eval_every_epochs}")
  if run.on_nonfinite not in NONFINITE_MODES:
    problems.append(f"run.on_nonfinite must be one of {NONFINITE_MODES}, got {run.on_nonfinite!r}")
  if run.max_consecutive_nonfinite < 1 or run.keep_checkpoints < 1:
    problems.append("run.max_consecutive_nonfinite and run.keep_checkpoints must be >= 1")
  if run.checkpoint_every_steps is not None and run.checkpoint_every_steps < 1:
    problems.append(f"run.checkpoint_every_steps must be >= 1, got {run.checkpoint_every_steps}")
  if problems:
    raise BadConfigError("Bad config:\n  - " + "\n  - ".join(problems))
