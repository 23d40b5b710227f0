"""The checkpointer (newest and best kept, a corrupt newest set aside, another model refused),
and the loop's refusals in process: NaN steps, another experiment's workdir, bad config values
and bad input on the command line.

Exact resume after signals is in ``test_resume.py`` (one process) and
``test_two_processes.py``."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, checkpoint_steps, run_cli

import dcil_jax
from experiments import checkpoints, input_pipeline, run_state, train
from experiments.configs import digits


def tiny_tree(width=8):
  from dcil_jax.models import SmallCNN

  model = SmallCNN(widths=(4, width))
  x = jnp.zeros((1, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = optax.chain(
    optax.sgd(0.1, momentum=0.9), dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5))
  )
  state = dcil_jax.TrainState.create(model, variables, tx, method="dcil", example_input=x)
  return run_state.checkpoint_tree(state)


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


def test_a_workdir_written_before_a_field_existed_continues_with_the_old_behaviour():
  """A config field added later (e.g. the step bound) is absent from older workdirs: they resume
  where the new field has its old-behaviour value, and are refused where it changes the run."""
  saved = {"model": "small_cnn", "dcil_preset": "official"}
  for key, old in checkpoints.ADDED_FIELDS.items():
    assert checkpoints.config_diff(saved, {**saved, key: old}) == []
  assert checkpoints.config_diff(saved, {**saved, "max_step_norm": 0.2}) == [
    "max_step_norm: 0.0 (workdir) -> 0.2 (this run)"
  ]


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
    ({"method": "snip"}, "Unknown method 'snip'"),
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
