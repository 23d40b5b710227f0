"""Never lose a run: exact resume after kill -9, SIGTERM, a second signal and a truncated
checkpoint, on the offline digits data through the real CLI and loop.

The interrupted runs are real processes (a signal needs one); each resumed run and the
uninterrupted reference run in this process. ``test_two_processes.py`` does the same for two
processes, ``test_checkpoints.py`` tests the checkpointer and the loop's refusals in process.
"""

import random
import signal
import time

import numpy as np
import pytest
from conftest import (
  STEPS,
  assert_same_run,
  checkpoint_steps,
  cli,
  run_in_process,
  wait_for_checkpoint,
)

from experiments import preemption


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_in_process(workdir)
  return workdir


# The default run checks a signal and exact resume through a real process below (SIGTERM then
# SIGINT), and a corrupt newest checkpoint in process (test_checkpoints.py); this is the long form:
# SIGTERM, up to three kill -9 at random moments and a truncated checkpoint, in one run.
@pytest.mark.slow
def test_kill_9_sigterm_and_a_truncated_checkpoint_then_resume_equals_an_uninterrupted_run(
  tmp_path, uninterrupted, caplog
):
  seed = random.randrange(10**6)
  rng = random.Random(seed)
  workdir = tmp_path / "run"
  # SIGTERM: the step finishes, a checkpoint of that step is written, exit code 75.
  p = cli(workdir)
  wait_for_checkpoint(workdir, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == preemption.PREEMPTED_EXIT_CODE, out[-3000:]
  stopped = checkpoint_steps(workdir)[-1]
  assert f"after step {stopped}" in out
  # kill -9 at random moments, each after the run has gone past its last checkpoint.
  kills = []
  for _ in range(3):
    last = checkpoint_steps(workdir)[-1]
    if last >= STEPS - 4:
      break
    p = cli(workdir)
    wait_for_checkpoint(workdir, p, after=last)
    time.sleep(rng.uniform(0.0, 1.5))
    p.kill()
    p.communicate()
    kills.append(checkpoint_steps(workdir)[-1])
  assert kills, "the run finished before it could be killed"
  # The newest checkpoint is truncated (a disk error): it is set aside, the previous one used.
  newest = checkpoint_steps(workdir)[-1]
  for f in (workdir / "checkpoints" / str(newest) / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 64:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  run_in_process(workdir)  # the same run, resumed in this process
  assert "cannot be read" in caplog.text
  assert (workdir / "checkpoints" / f"corrupt_{newest}").exists()
  print(f"random seed {seed}: SIGTERM at {stopped}, kill -9 after {kills}, truncated {newest}")
  assert_same_run(workdir, uninterrupted)


def test_a_second_signal_exits_at_once_and_the_run_still_resumes_exactly(tmp_path, uninterrupted):
  workdir = tmp_path / "run"
  p = cli(workdir)
  wait_for_checkpoint(workdir, p, after=4)
  p.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  p.send_signal(signal.SIGINT)
  out, _ = p.communicate(timeout=60)
  # At once with 128 + the signal handled second (Python runs pending handlers in signal-number
  # order when the step returns), unless the graceful stop was already complete.
  at_once = (128 + signal.SIGINT, 128 + signal.SIGTERM)
  assert p.returncode in (*at_once, preemption.PREEMPTED_EXIT_CODE), out[-3000:]
  if p.returncode in at_once:
    assert "exiting now, without a checkpoint" in out
  run_in_process(workdir)
  assert_same_run(workdir, uninterrupted)


def test_a_finished_run_run_again_only_writes_the_same_summary(tmp_path, uninterrupted, capsys):
  # The same command on a finished workdir restores the last checkpoint and trains nothing.
  workdir = tmp_path / "copy"
  import shutil

  shutil.copytree(uninterrupted, workdir)
  run_in_process(workdir)
  assert f"resumed at step {STEPS}" in capsys.readouterr().out
  assert_same_run(workdir, uninterrupted)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2), (2, 4)])
def test_a_data_position_resumes_the_same_global_batches_on_another_process_count(
  saved_on, resumed_on
):
  """The checkpointed data position (process 0's iterator state) counts global batches, and
  global batch t is a function of (seed, t) only: the processes of a resumed run, however many,
  read together exactly the batches the uninterrupted run would have read."""
  from experiments import input_pipeline

  def iterators(count):
    return [
      input_pipeline.create_train_iterator(
        "digits", global_batch_size=32, seed=3, process_index=p, process_count=count
      )
      for p in range(count)
    ]

  uninterrupted = iterators(1)[0]
  reference = [next(uninterrupted) for _ in range(13)]  # past an epoch's end (11 batches)
  saved = iterators(saved_on)
  for _ in range(4):
    for it in saved:
      next(it)
  position = saved[0].get_state()
  assert all(it.get_state() == position for it in saved)  # any process's state would do
  resumed = iterators(resumed_on)
  for it in resumed:
    it.set_state(position)
  for want in reference[4:]:
    parts = [next(it) for it in resumed]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])


def test_stop_after_step_stops_with_a_checkpoint_there_and_the_run_resumes_exactly(
  tmp_path, uninterrupted
):
  """``run.stop_after_step`` (a run group field: the same experiment) stops like a SIGTERM, at a
  chosen step: what moves a run to another process or device count at a known point."""
  workdir = tmp_path / "run"
  with pytest.raises(preemption.Preempted, match="as asked") as stopped:
    run_in_process(workdir, stop_after_step=7)  # not a checkpoint step of its own
  assert stopped.value.step == 7 and stopped.value.signum is None
  assert checkpoint_steps(workdir)[-1] == 7
  run_in_process(workdir)
  assert_same_run(workdir, uninterrupted)
