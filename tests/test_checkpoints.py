"""Never lose a run: exact resume after kill -9 and SIGTERM, corrupt checkpoints, NaN steps,
and bad input, on the offline digits data through the real CLI and loop."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import start_processes, subprocess_env

import dcil_jax
from experiments import checkpoints, input_pipeline, preemption, train
from experiments import state as lib
from experiments.configs import digits

ROOT = Path(__file__).parent.parent
STEPS = 33  # 3 epochs of 11 steps: evals (and checkpoints) at 11, 22, 33
# A short DCIL run through `python -m experiments.digits`, checkpointing every 2 steps.
FLAGS = [
  "--config=experiments/configs/digits.py:local",
  f"--config.num_train_steps={STEPS}",
  "--config.run.checkpoint_every_steps=2",
  "--config.run.progress=false",
]
TIMING = ("train_seconds", "images_per_second")


def cli(workdir, *extra):
  cmd = [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", *FLAGS, *extra]
  return subprocess.Popen(
    cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def run_cli(workdir, *extra, timeout=240):
  p = cli(workdir, *extra)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def run_in_process(workdir):
  """What ``cli(workdir)`` runs, in this process (no signal needed: no subprocess either)."""
  config = digits.get_config("local")
  with config.unlocked():
    config.num_train_steps = STEPS
    config.run.checkpoint_every_steps = 2
    config.run.progress = False
  return train.train_and_evaluate(config, str(workdir))


def checkpoint_steps(workdir) -> list[int]:
  path = Path(workdir) / "checkpoints"
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if path.exists() else []


def wait_for_checkpoint(workdir, process, after: int = 0, timeout: float = 120) -> None:
  start = time.time()
  while not any(s > after for s in checkpoint_steps(workdir)):
    assert process.poll() is None, process.communicate()[0][-3000:]
    assert time.time() - start < timeout, "no checkpoint was written"
    time.sleep(0.02)


def final_state(workdir) -> list[np.ndarray]:
  """The leaves of the last checkpoint's state, read onto this process's first device whatever
  devices wrote it."""
  path = Path(workdir) / "checkpoints" / str(STEPS) / "state"
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
    checkpointer.metadata(path).item_metadata,
  )
  return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


def outcome(workdir):
  summary = json.loads((Path(workdir) / "summary.json").read_text())
  records = [
    json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  ]
  return (
    {k: v for k, v in summary.items() if k not in TIMING},
    [{k: v for k, v in r.items() if k not in TIMING} for r in records],
  )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_in_process(workdir)
  return workdir


def assert_same_run(workdir, reference):
  summary, records = outcome(workdir)
  ref_summary, ref_records = outcome(reference)
  assert summary == ref_summary  # final and best accuracy, flip rates, sparsities: bit for bit
  assert records == ref_records  # every train, refresh and eval record, once, in order
  for a, b in zip(final_state(workdir), final_state(reference), strict=True):
    np.testing.assert_array_equal(a, b)  # params, BN statistics, momentum, masks, rng


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


# --------------------------------------------------------------------------------------------
# Checkpointer unit tests


def tiny_tree(width=8):
  from dcil_jax.models import SmallCNN

  model = SmallCNN(widths=(4, width))
  x = jnp.zeros((1, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = optax.chain(
    optax.sgd(0.1, momentum=0.9), dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5))
  )
  state = dcil_jax.TrainState.create(model, variables, tx, method="dcil", example_input=x)
  return lib.checkpoint_tree(state, None)


def test_checkpointer_keeps_the_newest_and_the_best_and_skips_a_corrupt_newest(tmp_path):
  tree = tiny_tree()
  c = checkpoints.RunCheckpointer(tmp_path, keep=2)
  for step, top1 in [(1, 0.9), (2, 0.5), (3, None), (4, 0.6)]:
    c.save(step, tree, {"data": {"i": step}}, metrics=None if top1 is None else {"top1": top1})
  c.wait()
  assert c.all_steps() == [1, 3, 4]  # the best (step 1) and the newest two
  restored = c.restore_latest(tree)
  assert restored.step == 4 and restored.meta["data"] == {"i": 4}
  assert jax.tree.structure(restored.state) == jax.tree.structure(tree)  # NamedTuples kept
  for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(tree), strict=True):
    np.testing.assert_array_equal(a, b)
  # A half-written file in the newest: reported, moved aside, the previous one restored.
  for f in (tmp_path / "4" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  c.close()
  c = checkpoints.RunCheckpointer(tmp_path, keep=2)
  assert c.restore_latest(tree).step == 3
  assert (tmp_path / "corrupt_4").exists() and c.all_steps() == [1, 3]
  c.close()


def test_a_checkpoint_of_another_model_is_refused_naming_the_leaves(tmp_path):
  c = checkpoints.RunCheckpointer(tmp_path)
  c.save(5, tiny_tree(width=8), {"data": None})
  c.wait()
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"Conv_1.*kernel.*\[3, 3, 4, 8\]"):
    c.restore_latest(tiny_tree(width=16))
  assert c.all_steps() == [5]  # nothing was set aside or lost
  c.close()


def test_config_diff_ignores_run_control_fields_and_names_the_others():
  saved = {"model": "small_cnn", "sparsity": 0.9, "lr_boundaries": (3,), "run": {"prefetch": 2}}
  current = {"model": "resnet8", "sparsity": 0.9, "lr_boundaries": [3], "run": {"prefetch": 4}}
  assert checkpoints.config_diff(saved, current) == [
    "model: 'small_cnn' (workdir) -> 'resnet8' (this run)"
  ]
  with pytest.raises(checkpoints.CheckpointMismatchError, match="model: 'small_cnn'"):
    checkpoints.check_config(saved, current, force=False, what="w")
  checkpoints.check_config(saved, current, force=True, what="w")  # asked to override: no error


# --------------------------------------------------------------------------------------------
# The loop in-process: NaN steps and bad input


def local_config(**overrides):
  config = digits.get_config("local")
  with config.unlocked():
    config.num_train_steps = 22
    config.run.progress = False
    config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture
def nan_at_step_5(monkeypatch):
  """The train input puts a NaN into the 5th batch (and only there)."""
  create = input_pipeline.create_train_iterator

  class Poisoned:
    def __init__(self, it):
      self.it, self.count = it, 0

    def __iter__(self):
      return self

    def __next__(self):
      batch = next(self.it)
      self.count += 1
      if self.count == 5:
        batch = dict(batch, image=batch["image"].copy())
        batch["image"][0, 0, 0, 0] = np.nan
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, state):
      self.it.set_state(state)

    def close(self):
      self.it.close()

  monkeypatch.setattr(
    input_pipeline, "create_train_iterator", lambda *a, **k: Poisoned(create(*a, **k))
  )


def test_a_nan_step_stops_the_run_naming_the_step_and_keeps_only_good_checkpoints(
  tmp_path, nan_at_step_5
):
  with pytest.raises(FloatingPointError, match="Step 5: the loss"):
    train.train_and_evaluate(
      local_config(log_every_steps=1, **{"run.checkpoint_every_steps": 2}), tmp_path
    )
  assert checkpoint_steps(tmp_path) == [2, 4]


def test_a_nan_step_is_skipped_on_request(tmp_path, nan_at_step_5):
  summary = train.train_and_evaluate(local_config(**{"run.on_nonfinite": "skip"}), tmp_path)
  assert summary["nonfinite_steps"] == 1 and summary["steps"] == 22
  assert np.isfinite(summary["final"]["loss"]) and summary["final"]["top1"] > 0.5
  train_records = [
    r
    for r in json.loads("[" + ",".join((tmp_path / "metrics.jsonl").read_text().splitlines()) + "]")
    if r["split"] == "train"
  ]
  assert sum(r["nonfinite_steps"] for r in train_records) == 1


def test_train_step_never_applies_a_non_finite_step(tiny_model, tiny_variables, tiny_batch):
  tx = optax.chain(optax.sgd(0.1), dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5), 1))
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method="dpf", example_input=tiny_batch["image"]
  )
  state, metrics = dcil_jax.train_step(state, tiny_batch)
  assert bool(metrics["finite"])
  before = jax.device_get((state.params, state.model_state, state.opt_state))
  bad = dict(tiny_batch, image=tiny_batch["image"].at[0, 0, 0, 0].set(jnp.inf))
  state, metrics = dcil_jax.train_step(state, bad)
  assert not bool(metrics["finite"]) and not bool(metrics["mask_refreshed"])
  assert int(state.step) == 2
  after = jax.device_get((state.params, state.model_state, state.opt_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished")
  train.train_and_evaluate(
    local_config(num_train_steps=3, **{"run.eval_every_epochs": 100}), workdir
  )
  return workdir


def test_a_workdir_of_another_experiment_is_refused_and_left_untouched(finished_workdir):
  before = {p: p.read_bytes() for p in finished_workdir.rglob("*") if p.is_file()}
  with pytest.raises(
    checkpoints.CheckpointMismatchError, match=r"sparsity: 0\.9 \(workdir\) -> 0\.5"
  ):
    train.train_and_evaluate(local_config(num_train_steps=3, sparsity=0.5), finished_workdir)
  after = {p: p.read_bytes() for p in finished_workdir.rglob("*") if p.is_file()}
  assert after == before


def test_params_or_masks_that_do_not_match_the_model_are_refused(finished_workdir):
  # Forcing the config through still cannot load a checkpoint of another model.
  config = local_config(num_train_steps=3, model="resnet8", **{"run.force_resume": True})
  with pytest.raises(checkpoints.CheckpointMismatchError, match="does not match this model"):
    train.train_and_evaluate(config, finished_workdir)


def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(train.WorkdirError, match="Cannot write to --workdir"):
    train.train_and_evaluate(local_config(), str(blocker / "run"))


@pytest.mark.parametrize(
  "override, message",
  [
    ({"model": "resnet1000"}, "Unknown model 'resnet1000'"),
    ({"method": "rigl"}, "Unknown method 'rigl'"),
    ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
    ({"run.on_nonfinite": "ignore"}, "run.on_nonfinite must be one of"),
  ],
)
def test_bad_config_values_are_refused_before_anything_is_written(tmp_path, override, message):
  with pytest.raises(train.BadConfigError) as error:
    train.train_and_evaluate(local_config(**override), str(tmp_path / "run"))
  assert message in str(error.value)
  assert not (tmp_path / "run").exists()  # nothing written


def test_bad_input_on_the_command_line_gets_one_message_and_exit_code_2(tmp_path):
  code, out = run_cli(tmp_path / "run", "--config.model=resnet1000")
  assert code == 2 and "error: Unknown model 'resnet1000'" in out
  assert "Traceback" not in out
  assert not (tmp_path / "run").exists()  # nothing written


def test_missing_imagenet_and_an_unknown_accelerator_get_clear_messages(tmp_path):
  cmd = [sys.executable, "-m", "experiments.imagenet", f"--workdir={tmp_path / 'run'}"]
  out = subprocess.run(
    [*cmd, f"--config.run.data_dir={tmp_path}", "--accelerator=cpu"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2 and "ILSVRC2012_img_train.tar" in out.stderr
  assert "Traceback" not in out.stderr
  out = subprocess.run([*cmd, "--accelerator=ipu"], cwd=ROOT, capture_output=True, text=True)
  assert (
    out.returncode != 0 and "--accelerator=ipu: value should be one of <tpu|gpu|cpu>" in out.stderr
  )


# --------------------------------------------------------------------------------------------
# Two processes (jax.distributed on CPU, gloo collectives) running the real command


def start_two(workdir):
  # The hosts agree on stopping when they log: every step here.
  argv = ["-m", "experiments.digits", f"--workdir={workdir}", *FLAGS, "--config.log_every_steps=1"]
  return start_processes(argv, merge_output=True)


def finish_two(procs, expected):
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [expected] * 2, "\n".join(o[-3000:] for o in outs)
  return outs


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory):
  """An uninterrupted run of the command as two processes."""
  workdir = tmp_path_factory.mktemp("two_processes")
  return workdir, finish_two(start_two(workdir), 0)


def test_two_processes_train_like_one(tmp_path, two_process_reference):
  """Each process reads its half of every global batch; only process 0 reports and writes; the
  run equals the one-process run (in this process) to float tolerance over its first steps.
  (Later the two drift apart: the gloo all-reduce sums in another order, and the warm-up's
  large steps amplify the last-bit differences, as any change of reduction order would.)"""
  workdir, outs = two_process_reference
  assert "final sparse-path top-1" in outs[0] and "final sparse-path top-1" not in outs[1]
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  config = digits.get_config("local")
  with config.unlocked():
    config.num_train_steps, config.log_every_steps = STEPS, 1
    config.run.checkpoint_every_steps, config.run.progress = 2, False
  train.train_and_evaluate(config, str(tmp_path / "single"))
  read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]
  single, multi = read(tmp_path / "single" / "metrics.jsonl"), read(workdir / "metrics.jsonl")
  assert [(r["split"], r["step"]) for r in multi] == [(r["split"], r["step"]) for r in single]
  for a, b in zip(multi, single, strict=True):
    if a["split"] == "train" and a["step"] <= 4:
      for key in ("loss", "ce_sparse", "ce_dense", "sparsity", "accuracy_sparse"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
  evals = [(a, b) for a, b in zip(multi, single, strict=True) if a["split"] == "eval"]
  for a, b in evals:
    assert a["examples"] == b["examples"] == 360  # every test digit once, on either count
    assert a["sparsity"] == b["sparsity"]  # exact-count masks: the same number pruned
    assert abs(a["top1"] - b["top1"]) <= 0.05  # the drift above, on 360 test digits


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
