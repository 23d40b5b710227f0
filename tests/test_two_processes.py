"""Two processes (``jax.distributed`` on CPU, gloo collectives) running the real command on the
offline digits data: they train like one process, stop together on a SIGTERM to one of them, and
resume exactly."""

import json
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import start_processes, subprocess_env
from test_resume import FLAGS, STEPS, assert_same_run, checkpoint_steps, wait_for_checkpoint

from experiments import launch, preemption, train, watchdog
from experiments.configs import digits

SHORT = 11  # one epoch (an eval at its end): enough to compare with one process


# A start that logs no step within this many seconds, with both processes alive, is a hang.
STARTUP_HANG_S = 150


def start_two(workdir, steps: int = STEPS, *extra: str):
  """The digits command as two processes, once more if the pair hangs at start-up.

  One clean-clone CI run (of about eight) saw both processes of a fresh start sleep in futex
  waits before their first step, with no output written, until the test's timeout; the same
  test passed alone and in every other run. The cause is not found yet (somewhere in the
  distributed start-up or the first collective), so a start that logs nothing within
  ``STARTUP_HANG_S`` seconds is killed and started again in the same workdir (nothing was
  written: the second start is the same run), with a warning that carries the output."""
  # The hosts agree on stopping when they log: every step here.
  flags = [f for f in FLAGS if not f.startswith("--config.num_train_steps=")]
  argv = ["-m", "experiments.digits", f"--workdir={workdir}", *flags]
  argv += [f"--config.num_train_steps={steps}", "--config.log_every_steps=1", *extra]
  metrics = Path(workdir) / "metrics.jsonl"
  logged = metrics.stat().st_size if metrics.exists() else 0
  procs = start_processes(argv, merge_output=True)
  if not logs_a_step(procs, metrics, logged):
    for p in procs:
      p.kill()
    outs = [p.communicate()[0][-2000:] for p in procs]
    warnings.warn(f"two-process start-up hang; started again. Output: {outs}", stacklevel=2)
    procs = start_processes(argv, merge_output=True)  # a second hang: the caller's timeout
  return procs


def logs_a_step(procs, metrics: Path, logged: int) -> bool:
  """Whether, within ``STARTUP_HANG_S`` seconds, ``metrics`` grows past ``logged`` bytes or a
  process exits (the caller then checks how)."""
  deadline = time.time() + STARTUP_HANG_S
  while time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      return True
    if metrics.exists() and metrics.stat().st_size > logged:
      return True
    time.sleep(0.1)
  return False


def finish_two(procs, expected):
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [expected] * 2, "\n".join(o[-3000:] for o in outs)
  return outs


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory):
  """An uninterrupted run of the command as two processes."""
  workdir = tmp_path_factory.mktemp("two_processes")
  return workdir, finish_two(start_two(workdir), 0)


def test_two_processes_train_like_one(tmp_path):
  """Each process reads its half of every global batch; only process 0 reports and writes; the
  run equals the one-process run (in this process) to float tolerance over its first steps.
  (Later the two drift apart: the gloo all-reduce sums in another order, and the warm-up's
  large steps amplify the last-bit differences, as any change of reduction order would.)"""
  workdir = tmp_path / "two"
  # One checkpoint, at the end: the stop-and-resume test below checkpoints every 2 steps.
  outs = finish_two(start_two(workdir, SHORT, f"--config.run.checkpoint_every_steps={SHORT}"), 0)
  assert "final sparse-path top-1" in outs[0] and "final sparse-path top-1" not in outs[1]
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  config = digits.get_config("local")
  with config.unlocked():
    config.num_train_steps, config.log_every_steps = SHORT, 1
    config.run.checkpoint_every_steps, config.run.progress = SHORT, False
  train.train_and_evaluate(config, str(tmp_path / "single"))
  read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]
  single, multi = read(tmp_path / "single" / "metrics.jsonl"), read(workdir / "metrics.jsonl")
  assert [(r["split"], r["step"]) for r in multi] == [(r["split"], r["step"]) for r in single]
  for a, b in zip(multi, single, strict=True):
    if a["split"] == "train" and a["step"] <= 4:
      for key in ("loss", "ce_sparse", "ce_dense", "sparsity", "accuracy_sparse"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  evals = [(a, b) for a, b in zip(multi, single, strict=True) if a["split"] == "eval"]
  assert evals
  for a, b in evals:
    assert a["examples"] == b["examples"] == 360  # every test digit once, on either count
    assert a["sparsity"] == b["sparsity"]  # exact-count masks: the same number pruned
    assert abs(a["top1"] - b["top1"]) <= 0.05  # the drift above, on 360 test digits


# The default run checks a signal and exact resume through one process (test_resume.py), the
# stop agreement of two processes in process (test_loop.py) and two processes training like one
# (above); this is the two-process form of the stop, over the full run.
@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_to_one_and_resume_exactly(
  tmp_path, two_process_reference
):
  """SIGTERM reaches only process 1 of 2: both agree to stop after the same step, checkpoint
  (each its shards) and exit 75; the same command on both continues, and the result equals
  an uninterrupted two-process run bit for bit."""
  reference, _ = two_process_reference
  workdir = tmp_path / "run"
  procs = start_two(workdir)
  wait_for_checkpoint(workdir, procs[0], after=2, timeout=300)
  procs[1].send_signal(signal.SIGTERM)
  outs = finish_two(procs, preemption.PREEMPTED_EXIT_CODE)
  stopped = checkpoint_steps(workdir)[-1]
  assert all(f"after step {stopped}" in o for o in outs)
  outs = finish_two(start_two(workdir), 0)
  assert f"resumed at step {stopped}" in outs[0]
  assert_same_run(workdir, reference)


def test_watchdog_prints_every_stack_and_exits_when_a_peer_never_joins(tmp_path):
  """Process 0 of 2 starts alone: it waits in jax.distributed.initialize() for a peer that never
  comes. After --watchdog_seconds without progress it prints where it was and every thread's
  stack, and exits with the watchdog's code (no watchdog: it would wait for minutes)."""
  argv = ["-m", "experiments.digits", f"--workdir={tmp_path}", *FLAGS, "--watchdog_seconds=2"]
  root = Path(__file__).parent.parent
  (p,) = launch.start_local_processes(argv, process_ids=[0], cwd=root, env=subprocess_env())
  out = p.communicate(timeout=120)[0]
  assert p.returncode == watchdog.EXIT_STALLED, out[-3000:]
  assert "watchdog (process 0, pid" in out and "no progress for 2 s" in out
  assert "the last progress was: jax.distributed.initialize() called" in out
  # Every thread: the watchdog's own and the main thread, stuck in the distributed start.
  assert "Current thread" in out and "in _watch" in out
  assert "in initialize_distributed" in out and "jax/_src/distributed.py" in out
