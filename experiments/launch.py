"""Command-line entry shared by ``experiments.cifar`` and ``experiments.imagenet``.

Flags follow Flax's examples: ``--workdir``, ``--config`` (an ``ml_collections`` config file,
overridable as ``--config.x=...``), plus ``--accelerator`` (platform and its defaults) and
``--distributed`` (``jax.distributed.initialize()`` for TPU pod slices and multi-host GPU).

Exit codes: 0 finished; 2 bad input (config, accelerator, data, workdir, or a checkpoint of
another experiment: one message says what to change); 3 a NaN/Inf step with
``--config.run.on_nonfinite=stop``; 75 stopped by SIGTERM/SIGINT after writing a checkpoint (run the
same command to continue); 128 + signal number for a second signal (exit at once); 1 anything
else (a bug: please report it with the traceback).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

ACCELERATORS = ("tpu", "gpu", "cpu")  # dtype defaults per platform: experiments.resolve
# jax_platforms values. None for gpu: naming "cuda,rocm" (or the "gpu" alias) fails on any
# machine that lacks one of them, so the GPU is found by JAX's own search and then checked.
PLATFORMS = {"tpu": "tpu", "gpu": None, "cpu": "cpu"}
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def fail(code: int, error: BaseException) -> None:
  """One clear message, no traceback, a documented exit code."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(code)


def define_flags(config_file: str) -> None:
  """Defines ``--workdir``, ``--config`` (default ``config_file``), ``--accelerator`` and
  ``--distributed``."""
  flags.DEFINE_string("workdir", None, "Where metrics, TensorBoard events and summary.json go.")
  config_flags.DEFINE_config_file(
    "config",
    config_file,
    "Experiment config file (path[:arg]); override with --config.x=...",
    lock_config=True,
  )
  define_platform_flags()
  flags.mark_flags_as_required(["workdir"])


def define_platform_flags() -> None:
  """``--accelerator`` and ``--distributed``, for every entry point (see :func:`start`)."""
  flags.DEFINE_enum(
    "accelerator",
    None,
    ACCELERATORS,
    "Platform to run on, and its defaults: bfloat16 compute on tpu/gpu, float32 on cpu "
    "(default: whatever JAX finds, with that platform's defaults).",
  )
  flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "true", "false"],
    "Call jax.distributed.initialize() (multi-host). auto: on TPU, and where a coordinator, "
    "SLURM or Open MPI environment says there are several processes.",
  )


def multi_process_env() -> bool:
  """Whether the environment says this is one of several processes."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return any(int(os.environ.get(v) or 1) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def wants_distributed(setting: str, accelerator: str | None) -> bool:
  if setting != "auto":
    return setting == "true"
  return accelerator == "tpu" or multi_process_env()


def select_platform(accelerator: str | None) -> None:
  """Points JAX at ``accelerator`` (before any backend starts)."""
  import jax

  if accelerator is not None and PLATFORMS[accelerator]:
    jax.config.update("jax_platforms", PLATFORMS[accelerator])


def started_platform(accelerator: str | None) -> str:
  """Starts the backend and returns ``"tpu"``, ``"gpu"`` or ``"cpu"``, or explains what is
  missing."""
  import jax

  try:
    backend = jax.default_backend()
  except RuntimeError as e:
    raise RuntimeError(
      f"--accelerator={accelerator} but JAX cannot start that platform ({e}). Install the "
      "matching JAX build (jax[tpu] on a TPU VM, jax[cuda12] for NVIDIA GPUs), or pick another "
      "--accelerator."
    ) from e
  from experiments import resolve

  platform = resolve.platform_name(backend)
  if accelerator is not None and platform != accelerator:
    raise RuntimeError(
      f"--accelerator={accelerator} but JAX found no {accelerator} (it runs on {platform}). "
      "Install the matching JAX build (jax[cuda12] for NVIDIA GPUs, jax[tpu] on a TPU VM), or "
      "pick another --accelerator."
    )
  return platform


def initialize_distributed(setting: str, accelerator: str | None) -> None:
  """``jax.distributed.initialize()`` where asked (or, for ``auto``, where it makes sense)."""
  import jax

  if not wants_distributed(setting, accelerator):
    return
  # TPU pods, SLURM and Open MPI are detected by JAX; elsewhere (e.g. plain GPU hosts) set
  # JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host.
  explicit = {
    "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
    "process_id": os.environ.get("JAX_PROCESS_ID"),
  }
  kwargs = {k: int(v) for k, v in explicit.items() if v}
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    if setting == "true" or multi_process_env():
      raise  # several processes training alone would each write as process 0
    # A single TPU VM outside a pod slice has nothing to connect to.
    logging.warning("Running as a single process: jax.distributed.initialize() failed: %s", e)


def start(accelerator: str | None, distributed: str) -> str:
  """What every entry point does first: a calm console (WARNING unless ``--verbosity`` is
  given: orbax logs every save, and JAX an INFO line for each platform it does not find), the
  platform chosen, the distributed runtime started where asked, and the platform checked.

  Returns ``"tpu"``, ``"gpu"`` or ``"cpu"``; exits with code 2 and one message if the asked
  platform is not there. ``experiments.resolve.resolve_config`` takes the dtype from it.
  """
  import jax

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  select_platform(accelerator)
  initialize_distributed(distributed, accelerator)  # before anything touches the devices
  try:
    platform = started_platform(accelerator)
  except RuntimeError as e:
    fail(EXIT_BAD_INPUT, e)
  if jax.process_count() > 1:
    print(f"process {jax.process_index()} of {jax.process_count()} on {platform}", file=sys.stderr)
  return platform


def bad_input_errors() -> tuple[type[BaseException], ...]:
  """The exceptions that mean bad input (exit code 2, one message, no traceback)."""
  from experiments import checkpoints, input_pipeline, resolve, train

  return (
    resolve.BadConfigError,
    train.WorkdirError,
    checkpoints.CheckpointMismatchError,
    input_pipeline.DataNotPreparedError,
    MemoryError,
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from experiments import preemption, train

  f = flags.FLAGS
  start(f.accelerator, f.distributed)
  try:
    train.train_and_evaluate(f.config, f.workdir)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except bad_input_errors() as e:
    fail(EXIT_BAD_INPUT, e)
  except FloatingPointError as e:
    fail(EXIT_NONFINITE, e)


def run(config_file: str) -> None:
  define_flags(config_file)
  app.run(main)
