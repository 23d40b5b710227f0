"""Two processes (``jax.distributed`` on CPU, gloo collectives) running the real command on the
offline digits data: they train like one process, stop together on a SIGTERM to one of them and
resume exactly, stop with a clear message when the other is killed, move to another process or
device count, and a hang ends under the watchdog with every stack.

Many two-process starts in a row under load are ``benchmarks/two_process_starts.py``; its record
is ``benchmarks/results/two_process_starts.md``.
"""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
  FLAGS,
  STEPS,
  assert_same_run,
  checkpoint_steps,
  outcome,
  run_in_process,
  start_processes,
  subprocess_env,
  wait_for_checkpoint,
)

from experiments import launch, preemption, train, watchdog
from experiments.configs import digits

SHORT = 11  # one epoch (an eval at its end): enough to compare with one process


# Every process of these runs stops itself with every thread's stack (exit 4) after this long
# without progress (a step, an eval batch, a checkpoint, a start-up stage): a hang fails the
# test with its stacks instead of running into the timeout. No gap of a healthy run comes near.
WATCHDOG_S = 240


def start_two(workdir, steps: int = STEPS, *extra: str):
  """The digits command as two processes (each under the launcher's watchdog)."""
  # The hosts agree on stopping when they log: every step here.
  flags = [f for f in FLAGS if not f.startswith("--config.num_train_steps=")]
  argv = ["-m", "experiments.digits", f"--workdir={workdir}", *flags]
  argv += [f"--config.num_train_steps={steps}", "--config.log_every_steps=1"]
  argv += [f"--watchdog_seconds={WATCHDOG_S}", *extra]
  return start_processes(argv, merge_output=True)


def finish_two(procs, expected):
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [expected] * 2, "\n".join(o[-3000:] for o in outs)
  return outs


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory):
  """An uninterrupted run of the command as two processes."""
  workdir = tmp_path_factory.mktemp("two_processes")
  return workdir, finish_two(start_two(workdir), 0)


# Slow: two processes of the real command. The default run checks each process's rows of every
# global batch (test_input_pipeline.py), a sharded step equal to one device's (8 fake devices,
# test_multi_device.py) and the hosts' stop agreement in process (test_loop.py).
@pytest.mark.slow
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


# The default run checks a signal and exact resume through one process (test_resume.py) and the
# stop agreement of two processes in process (test_loop.py); this is the two-process form of the
# stop, over the full run.
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
  # The idle time it reports is when its check ran: at least the limit (later under load).
  assert "watchdog (process 0, pid" in out and "(limit 2 s)" in out
  idle = int(re.search(r"no progress for (\d+) s", out).group(1))
  assert idle >= 2, out[-3000:]
  assert "the last progress was: jax.distributed.initialize() called" in out
  # Every thread: the watchdog's own and the main thread, stuck in the distributed start.
  assert "Current thread" in out and "in _watch" in out
  assert "in initialize_distributed" in out and "jax/_src/distributed.py" in out


# The runtime's own bound: a process whose peer died learns it at its next collective (a broken
# gloo connection) or from the coordination service's missed heartbeats (100 s by default).
PEER_LOST_S = 200


# The default run checks the watchdog (above) and a one-process kill -9 resume (test_resume.py);
# this is the two-process kill -9, with the restart compared to an uninterrupted run.
@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_of_one_process_stops_the_other_with_a_clear_message_and_a_restart_resumes_exactly(
  tmp_path, two_process_reference, victim
):
  """kill -9 of process 1 (or of process 0, which runs the coordinator): the other exits within
  a bounded time with a message that says a peer is gone (the launcher's, exit 5, or the JAX
  runtime's own, SIGABRT, whichever notices first); the same command on both resumes from the
  last complete checkpoint and ends bit for bit as the uninterrupted two-process run."""
  reference, _ = two_process_reference
  workdir = tmp_path / "run"
  procs = start_two(workdir)
  wait_for_checkpoint(workdir, procs[0], after=4, timeout=300)
  procs[victim].kill()
  killed = time.monotonic()
  survivor = procs[1 - victim]
  out = survivor.communicate(timeout=PEER_LOST_S)[0]
  assert time.monotonic() - killed < PEER_LOST_S
  assert survivor.returncode in (launch.EXIT_PEER_LOST, -signal.SIGABRT), out[-3000:]
  ours = "another process of this run is gone" in out
  assert ours == (survivor.returncode == launch.EXIT_PEER_LOST), out[-3000:]
  assert ours or "This most likely indicates that another task died" in out, out[-3000:]
  procs[victim].communicate()
  outs = finish_two(start_two(workdir), 0)
  assert "resumed at step" in outs[0]
  assert_same_run(workdir, reference)


def run_devices(workdir, devices: int, *extra: str) -> tuple[int, str]:
  """The digits command as one process with ``devices`` fake CPU devices."""
  env = subprocess_env(
    JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  argv = [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", *FLAGS, *extra]
  root = Path(__file__).parent.parent
  p = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  return p.returncode, p.stdout + p.stderr


# The default run checks the parts in short forms: a checkpoint of 8 devices restored on 2 and 1
# (tests/multi_device), a data position resumed on another process count (test_resume.py).
@pytest.mark.slow
def test_a_run_moves_from_2_devices_to_2_processes_to_1_device_and_ends_as_the_uninterrupted_one(
  tmp_path,
):
  """One process with 2 (fake) devices to step 8, two processes to step 16, one process with
  one device to the end: each start resumes the last checkpoint (state restored bit for bit
  into the new shardings, the data position in global batches) and reads the same global
  batches. The result is not bit for bit the uninterrupted one-device run's: the gradient
  all-reduce sums in an order that depends on the device count, and the warm-up amplifies the
  last-bit differences (as in test_two_processes_train_like_one). So: the same records, every
  eval over the same 360 digits, the same exact-count sparsity (each layer's share within
  0.05), and top-1 within 0.05."""
  workdir = tmp_path / "moved"
  code, out = run_devices(workdir, 2, "--config.run.stop_after_step=8")
  assert code == preemption.PREEMPTED_EXIT_CODE and "on 2 cpu device(s)" in out, out[-3000:]
  assert "Stopped as asked (run.stop_after_step) after step 8" in out
  flags = ["-m", "experiments.digits", f"--workdir={workdir}", *FLAGS]
  procs = start_processes([*flags, "--config.run.stop_after_step=16"], merge_output=True)
  outs = finish_two(procs, preemption.PREEMPTED_EXIT_CODE)
  assert "resumed at step 8" in outs[0] and "after step 16" in outs[1]
  run_in_process(workdir)
  reference = tmp_path / "uninterrupted"
  run_in_process(reference)
  (summary, records), (ref_summary, ref_records) = outcome(workdir), outcome(reference)
  assert [(r["split"], r["step"]) for r in records] == [
    (r["split"], r["step"]) for r in ref_records
  ]
  for a, b in zip(records, ref_records, strict=True):
    if a["split"] == "eval":
      assert a["examples"] == b["examples"] == 360
      assert a["sparsity"] == b["sparsity"]
      assert abs(a["top1"] - b["top1"]) <= 0.05
  assert summary["sparsity"] == ref_summary["sparsity"]
  # A global threshold over weights that drifted apart: the layers' shares of the pruned count
  # move a little (the total above does not).
  layers, ref_layers = summary["layer_sparsity"], ref_summary["layer_sparsity"]
  assert layers.keys() == ref_layers.keys()
  assert all(abs(layers[k] - ref_layers[k]) <= 0.05 for k in layers), (layers, ref_layers)


STALL = """
import os, signal, time
from experiments import watchdog
watchdog.start(1.0, name="the test")
os.kill(os.getpid(), signal.SIGUSR1)  # stacks, and the process goes on
for i in range(8):
  watchdog.beat(f"beat {i}")
  time.sleep(0.3)
print("alive after the beats", flush=True)
time.sleep(60)
print("not reached", flush=True)
"""


def test_watchdog_waits_while_beats_come_and_sigusr1_prints_stacks_without_stopping():
  root = Path(__file__).parent.parent
  p = subprocess.run(
    [sys.executable, "-c", STALL], cwd=root, capture_output=True, text=True, timeout=60
  )
  assert p.returncode == watchdog.EXIT_STALLED, p.stdout + p.stderr
  assert "alive after the beats" in p.stdout and "not reached" not in p.stdout
  assert "the last progress was: beat 7" in p.stderr and "watchdog (the test, pid" in p.stderr
  assert p.stderr.count("Current thread") == 2  # SIGUSR1's dump, then the watchdog's
