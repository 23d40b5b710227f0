"""Command-line entry shared by ``experiments.cifar`` and ``experiments.imagenet``.

Flags follow Flax's examples: ``--workdir``, ``--config`` (an ``ml_collections`` config file,
overridable as ``--config.x=...``), plus ``--accelerator`` (platform and its defaults) and
``--distributed`` (``jax.distributed.initialize()`` for TPU pod slices and multi-host GPU) and
``--watchdog_seconds`` (see ``experiments.watchdog``).

Exit codes: 0 finished; 2 bad input (config, accelerator, data, workdir, or a checkpoint of
another experiment: one message says what to change); 3 a NaN/Inf step with
``--config.run.on_nonfinite=stop``; 75 stopped by SIGTERM/SIGINT after writing a checkpoint (run the
same command to continue); 128 + signal number for a second signal (exit at once); 4 the watchdog
saw no progress for ``--watchdog_seconds`` (every thread's stack is printed first: a hang, or a
peer process that died); 5 another process of a multi-process run is gone (killed, crashed, lost
its host): this one stops at its next collective, without waiting for the runtime's shutdown
barrier (run the same command on every host to resume from the last checkpoint); 1 anything
else (a bug: please report it with the traceback). A process whose coordinator (process 0) dies
is stopped by the JAX runtime itself within seconds ("the JAX distributed service detected
fatal errors": SIGABRT).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

ACCELERATORS = ("tpu", "gpu", "cpu")  # dtype defaults per platform: experiments.resolve
# jax_platforms values. None for gpu: naming "cuda,rocm" (or the "gpu" alias) fails on any
# machine that lacks one of them, so the GPU is found by JAX's own search and then checked.
PLATFORMS = {"tpu": "tpu", "gpu": None, "cpu": "cpu"}
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_PEER_LOST = 5
# What the runtime's errors say when another process of the run is gone: gloo's broken
# connection in a collective, the coordination service's missed heartbeats or failed barriers.
PEER_LOST_MARKERS = (
  "Gloo",
  "Connection closed by peer",
  "Connection reset by peer",
  "heartbeat timeout",
  "CoordinationService",
  "coordination service",
)
# The watchdog's limit for a multi-process run (one that calls jax.distributed.initialize): long
# enough for the slowest legitimate gap between two progress beats (a first compilation of a
# large model, an ImageNet evaluation pass, a checkpoint write on a slow disk), short enough
# that a hung pod slice is not left idle for hours. Single-process runs have no peer to wait
# for: no watchdog unless asked.
DEFAULT_WATCHDOG_SECONDS = 1800.0


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
  flags.DEFINE_float(
    "watchdog_seconds",
    None,
    "Exit with code 4, after printing every thread's stack, when no progress (a start-up stage, "
    "a train step, an eval batch, a checkpoint) is made for this many seconds; 0 turns it off. "
    f"Default: {DEFAULT_WATCHDOG_SECONDS:g} for a multi-process run, off for one process. "
    "SIGUSR1 prints every thread's stack at any time.",
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


def watchdog_seconds(setting: float | None, distributed: bool) -> float:
  """The watchdog's limit: ``setting`` if given, else the multi-process default or off."""
  if setting is not None:
    return setting
  return DEFAULT_WATCHDOG_SECONDS if distributed else 0.0


def start(accelerator: str | None, distributed: str, watch: float | None = None) -> str:
  """What every entry point does first: a calm console (WARNING unless ``--verbosity`` is
  given: orbax logs every save, and JAX an INFO line for each platform it does not find), the
  watchdog started (``watch`` seconds, see :func:`watchdog_seconds`), the platform chosen, the
  distributed runtime started where asked, and the platform checked.

  Returns ``"tpu"``, ``"gpu"`` or ``"cpu"``; exits with code 2 and one message if the asked
  platform is not there. ``experiments.resolve.resolve_config`` takes the dtype from it.
  """
  import jax

  from experiments import watchdog

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  many = wants_distributed(distributed, accelerator)
  env_id = os.environ.get("JAX_PROCESS_ID")
  watchdog.start(watchdog_seconds(watch, many), name=f"process {env_id}" if env_id else "")
  select_platform(accelerator)
  watchdog.beat("jax.distributed.initialize() called" if many else "platform selected")
  initialize_distributed(distributed, accelerator)  # before anything touches the devices
  watchdog.beat("distributed runtime started; starting the backend")
  try:
    platform = started_platform(accelerator)
  except RuntimeError as e:
    fail(EXIT_BAD_INPUT, e)
  watchdog.beat("backend started")
  if jax.process_count() > 1:
    who = f"process {jax.process_index()} of {jax.process_count()}"
    watchdog.name(who)
    print(f"{who} on {platform}", file=sys.stderr)
  return platform


def lost_peer(error: BaseException) -> bool:
  """Whether ``error`` means that another process of this multi-process run is gone."""
  import jax

  if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
    return False
  return any(marker in str(error) for marker in PEER_LOST_MARKERS)


def exit_lost_peer(error: BaseException) -> None:
  """One clear message and exit :data:`EXIT_PEER_LOST` at once: a normal exit would wait in the
  runtime's shutdown barrier for the dead peer, then abort with a C++ stack trace."""
  import jax

  first = str(error).strip().splitlines()[0][:400]
  print(
    f"error: process {jax.process_index()} of {jax.process_count()}: another process of this "
    f"run is gone (killed, crashed, or its host lost), so this one stops too ({first}). Run the "
    "same command on every host to resume from the last checkpoint.",
    file=sys.stderr,
    flush=True,
  )
  sys.stdout.flush()
  os._exit(EXIT_PEER_LOST)


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
  start(f.accelerator, f.distributed, f.watchdog_seconds)
  try:
    train.train_and_evaluate(f.config, f.workdir)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except bad_input_errors() as e:
    fail(EXIT_BAD_INPUT, e)
  except FloatingPointError as e:
    fail(EXIT_NONFINITE, e)
  except Exception as e:
    if lost_peer(e):
      exit_lost_peer(e)
    raise


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
  """A socket bound to a free port of ``host``, not listening: hold it while the coordinator
  starts on that port (``sock.getsockname()[1]``), then close it.

  Why: picking a port by binding port 0 and closing the socket leaves the port free for anyone
  until the coordinator binds it; another run starting at the same time (other test sessions,
  other worktrees) can pick the same one. The gRPC server behind ``jax.distributed`` binds with
  ``SO_REUSEPORT``, and so does this socket, so the coordinator binds the held port while the
  kernel hands it to no one else (only listening sockets receive connections: this one gets
  none).
  """
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  sock.bind((host, 0))
  return sock


def start_local_processes(
  argv: Sequence[str],
  *,
  count: int = 2,
  cwd: str | os.PathLike | None = None,
  env: Mapping[str, str] | None = None,
  merge_output: bool = True,
  process_ids: Sequence[int] | None = None,
) -> list[subprocess.Popen]:
  """``python argv...`` as ``count`` JAX processes on this host (``jax.distributed`` on CPU,
  gloo collectives), for tests and the start-up loop (``benchmarks/two_process_starts.py``).

  The coordinator's port is reserved (:func:`reserve_port`) for as long as the returned
  processes are referenced (each holds the socket as ``coordinator_port``). ``env`` is added to
  this process's environment. Output is text; stderr goes to stdout unless ``merge_output`` is
  false. ``process_ids`` starts only those of the ``count`` processes (a peer that never comes).
  """
  held = reserve_port()
  coordinator = f"127.0.0.1:{held.getsockname()[1]}"
  procs = []
  for process_id in range(count) if process_ids is None else process_ids:
    p = subprocess.Popen(
      [sys.executable, *argv],
      cwd=cwd,
      env=dict(
        os.environ,
        **(env or {}),
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=coordinator,
        JAX_NUM_PROCESSES=str(count),
        JAX_PROCESS_ID=str(process_id),
      ),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
      text=True,
    )
    p.coordinator_port = held  # type: ignore[attr-defined]
    procs.append(p)
  return procs


def run(config_file: str) -> None:
  define_flags(config_file)
  app.run(main)
