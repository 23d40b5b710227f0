"""Fields shared by every experiment config (see ``cifar.py`` and ``imagenet.py``)."""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from experiments import recipes


def base_config() -> ConfigDict:
  """Defaults for every run; recipe fields stay ``None`` until the recipe fills them."""
  config = ConfigDict()
  config.dataset = "cifar10"
  config.model = "resnet32"
  config.image_size = config_dict.placeholder(int)  # default: the dataset's (32 or 224)
  config.method = "dcil"  # dcil | dpf | dense
  config.sparsity = 0.9  # final fraction of conv weights pruned
  config.distribution = "global"  # global (official) | layerwise | erk
  config.granularity = "weight"  # weight (official) | filter (official structured mode)
  # filter masks: l1 (mean |w|) | l2 (mean w^2), or l1_relative | l2_relative (divided by the
  # layer's mean filter score, dcil_jax.granularity.filter_scores)
  config.filter_score = "l1"
  # filter masks, which filters a refresh prunes: global (one threshold over all filters, the
  # official rule) | groups (coupled channel groups traced from the model, so that compaction
  # removes every pruned filter, per-layer-normalised scores; cost_weight 0) | groups_macs (the
  # same, each score divided by the square root of the MACs the channel saves relative to the
  # mean: cost_weight 0.5, as benchmarks/inference.py). dcil_jax.deploy.group_allocation,
  # docs/deploy.md. Groups need granularity=filter, distribution=global and method dcil|dpf.
  config.filter_allocation = "global"
  config.update_every = 16  # mask refresh period in steps (official: 16)
  config.temperature = 2.0  # distillation temperature (official: 2)
  # DCIL's setting: robust (dcil_jax.DCIL.robust: the official loss with the SGD step bounded,
  # which keeps it from blowing up at high learning rates; docs/method.md "When DCIL is
  # unstable") | official (the official code exactly).
  config.dcil_preset = "robust"
  # Override one option of the preset (None: the preset's): the distillation weight's linear
  # ramp length in epochs from kd_start_epoch (0: a step), and the cap of each path's
  # distillation term as a multiple of its task loss (dcil_jax.DCIL.kd_clip).
  config.kd_ramp_epochs = config_dict.placeholder(float)
  config.kd_clip = config_dict.placeholder(float)
  # Clip the gradient's global norm before the optimizer to this (0: no clipping, as official).
  config.grad_clip_norm = 0.0
  # Bound the SGD step: clip the gradient's global norm to max_step_norm / learning rate
  # (dcil_jax.clip_step_norm; 0: no bound, as official; None: the DCIL preset's,
  # dcil_jax.DCIL.ROBUST_MAX_STEP_NORM for robust, else 0). Any method may set it.
  config.max_step_norm = config_dict.placeholder(float)
  config.momentum = 0.9
  config.nesterov = True

  # The recipe ("auto": the model's own, from experiments/recipes.py); each field below left at
  # None is taken from it, any field set here overrides it.
  config.recipe = "auto"
  types = dict(
    num_epochs=int,
    batch_size=int,  # global batch over all devices and hosts
    learning_rate=float,  # peak; scaled by batch_size / lr_reference_batch when that is > 0
    lr_reference_batch=int,
    lr_schedule=str,  # step | cosine
    warmup_epochs=float,
    warmup_init_lr=float,
    lr_boundaries=tuple,  # epochs at which a step schedule multiplies the lr by lr_decay
    lr_decay=float,
    weight_decay=float,
    ramp_end_epoch=float,  # the cubic sparsity ramp reaches `sparsity` here
    kd_start_epoch=float,  # first epoch with the mutual-distillation terms
  )
  assert set(types) == set(recipes.RECIPE_FIELDS)
  for name, kind in types.items():
    setattr(config, name, config_dict.placeholder(kind))

  # Instead of batch_size: this many examples per data-parallel device (batch_size follows).
  config.per_device_batch_size = config_dict.placeholder(int)
  config.dtype = config_dict.placeholder(str)  # compute dtype; default: the platform's
  config.path_parallel = False  # DCIL: a mesh axis of 2 devices, one path each
  # DCIL path strategy: unrolled | vmap | sharded | sequential, or one of sequential's two forms
  # by name: sequential_loop | sequential_unrolled (None: dcil_jax's default)
  config.strategy = config_dict.placeholder(str)
  config.seed = 0
  config.num_train_steps = config_dict.placeholder(int)  # cut the run short (smoke runs)
  config.steps_per_epoch = config_dict.placeholder(int)  # default: split size // batch_size
  config.log_every_steps = 100  # train metrics (and, on several hosts, agreeing to stop)
  config.run = run_config()
  return config


def run_config() -> ConfigDict:
  """``config.run``: how a run is executed, not what it computes. A workdir may be resumed with
  other values here (every other field must match its checkpoint's)."""
  run = ConfigDict()
  run.data_dir = config_dict.placeholder(str)  # TFDS data dir (default ~/tensorflow_datasets)
  # grain worker processes that decode and augment; None: all but 4 cores, at most 64 (0 below
  # 5 cores: threads in the main process). Images/s per core:
  # benchmarks/results/input_pipeline_cpu.md.
  run.worker_count = config_dict.placeholder(int)
  run.prefetch = 2  # batches put on the devices ahead of the step
  run.progress = True  # tqdm progress bar (process 0 only)
  run.eval_every_epochs = 1
  run.max_eval_steps = config_dict.placeholder(int)  # default: the whole eval split
  # Checkpoints (WORKDIR/checkpoints): at every eval, at the end, on SIGTERM/SIGINT, and every
  # checkpoint_every_steps if set. The newest keep_checkpoints are kept, plus the best by
  # sparse-path eval top-1. A workdir with checkpoints is continued by the same command.
  run.checkpoint_every_steps = config_dict.placeholder(int)
  run.keep_checkpoints = 2
  run.async_checkpointing = True  # write while training goes on
  run.force_resume = False  # continue a workdir whose checkpoint has a different config
  # Stop after this step as on a SIGTERM (checkpoint, exit 75): to move a run to another machine,
  # process count or device count at a chosen step (the same command there continues it).
  run.stop_after_step = config_dict.placeholder(int)
  # A NaN/Inf loss, gradient or parameter: the step is never applied; then "stop" the run (and
  # name the step) or "skip" it and go on, up to max_consecutive_nonfinite steps in a row.
  run.on_nonfinite = "stop"
  run.max_consecutive_nonfinite = 100
  return run
