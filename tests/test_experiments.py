"""The experiments: recipes and configs, and one real train + eval run of each entry point
through the real TFDS code path under ``tfds.testing.mock_data``."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import start_processes

from experiments import recipes, resolve, run_state, train
from experiments.configs import cifar, imagenet
from experiments.metric_writers import read_jsonl

ROOT = Path(__file__).parent.parent


def resolved(config_module, arg=None, **overrides):
  return resolve.resolve_config(_with(config_module.get_config(arg), **overrides))


def lr_at_epochs(config, epochs, steps_per_epoch=100):
  schedule = run_state.learning_rate_schedule(config, steps_per_epoch)
  return [float(schedule(round(e * steps_per_epoch))) for e in epochs]


def test_cifar_resnet_recipe_is_the_official_one():
  config = resolved(cifar)
  assert config.model == "resnet32" and config.num_epochs == 300 and config.batch_size == 128
  assert (config.weight_decay, config.ramp_end_epoch, config.kd_start_epoch) == (1e-4, 225, 70)
  # 0.1 -> 0.2 over 5 epochs, x0.1 at 150 and 225.
  lrs = lr_at_epochs(config, [0, 2.5, 5, 149.99, 150, 224.99, 225, 299])
  np.testing.assert_allclose(lrs, [0.1, 0.15, 0.2, 0.2, 0.02, 0.02, 0.002, 0.002], rtol=1e-5)


def test_model_picks_its_recipe_and_fields_override_it():
  config = resolved(cifar, model="wrn28_2")
  assert (config.num_epochs, config.weight_decay, config.ramp_end_epoch) == (195, 5e-4, 120)
  lrs = lr_at_epochs(config, [0, 59.99, 60, 120, 160, 194])
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.02, 0.004, 0.0008, 0.0008], rtol=1e-5)
  config = resolved(cifar, model="wrn28_2", learning_rate=0.05, lr_boundaries=(100,))
  assert config.learning_rate == 0.05 and config.lr_boundaries == (100,)
  assert config.weight_decay == 5e-4  # the rest still from the recipe


def test_imagenet_recipe_scales_lr_with_batch_and_decays_by_cosine():
  config = resolved(imagenet)
  assert (config.model, config.batch_size, config.num_epochs) == ("resnet50", 1024, 100)
  assert (config.ramp_end_epoch, config.kd_start_epoch) == (75, 25)
  lrs = lr_at_epochs(config, [0, 5, 52.5, 100])
  np.testing.assert_allclose(lrs, [0.0, 0.4, 0.2, 0.0], atol=1e-6)  # 0.1 x 1024/256 = 0.4
  half = resolved(imagenet, batch_size=512)
  assert lr_at_epochs(half, [5])[0] == pytest.approx(0.2)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(model="resnet1000"), "Unknown model"),
    (dict(dataset="mnist"), "Unknown dataset"),
    (dict(method="snip"), "Unknown method"),
    (dict(recipe="fast"), "Unknown recipe"),
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(ramp_end_epoch=400.0), "ramp_end_epoch"),
    (dict(lr_boundaries=(225, 150)), "lr_boundaries"),
    (dict(method="dpf", path_parallel=True), "path_parallel"),
    (dict(dtype="int8"), "dtype"),
    (dict(filter_allocation="best"), "filter_allocation must be one of"),
    (dict(filter_allocation="groups"), "needs granularity='filter'"),
  ],
)
def test_bad_configs_fail_at_start_with_a_clear_message(overrides, message):
  with pytest.raises(ValueError, match=message):
    resolved(cifar, **overrides)


def test_optimizer_has_masked_update_except_for_dense():
  import jax
  import jax.numpy as jnp

  import dcil_jax

  params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))}}
  for method in ("dcil", "dpf", "dense"):
    config = resolved(cifar, method=method, sparsity=0.0 if method == "dense" else 0.9)
    tx = run_state.make_optimizer(config, steps_per_epoch=10)
    lifted = dcil_jax.paths.split_params(params, dcil_jax.rules.all_kernels)
    state = tx.init(lifted)
    if method == "dense":
      with pytest.raises(ValueError):
        dcil_jax.get_masks(state, lifted)
    else:
      assert isinstance(state[-1], dcil_jax.MaskedUpdateState)
      assert jax.tree.leaves(dcil_jax.get_masks(state, lifted))[0].dtype == jnp.bool_


# The real command line inside tfds.testing.mock_data, for the tests that need processes.
CLI = textwrap.dedent(
  """
  import runpy, sys
  import tensorflow_datasets as tfds
  module, argv = sys.argv[1], sys.argv[2:]
  sys.argv = [module] + argv
  with tfds.testing.mock_data(num_examples=24):
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  """
)

# A run of 4 steps, 2 per epoch, on the mock data.
SMOKE = {
  "batch_size": 8,
  "steps_per_epoch": 2,
  "num_train_steps": 4,
  "ramp_end_epoch": 1.0,
  "kd_start_epoch": 1.0,
  "warmup_epochs": 0.5,
  "log_every_steps": 1,
  "update_every": 2,
  "run.progress": False,
  "run.worker_count": 0,
}


def as_flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def run_mocked(config_module, workdir, **overrides):
  """``train_and_evaluate`` in this process on TFDS's mock data (the real reading code)."""
  import tensorflow_datasets as tfds

  config = _with(config_module.get_config(), **SMOKE, **overrides)
  with tfds.testing.mock_data(num_examples=24):
    return train.train_and_evaluate(config, str(workdir))


def check_run(workdir, method, steps=4, evals=2):
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["method"] == method and summary["steps"] == steps
  for key in ("top1", "top5"):
    assert 0.0 <= summary["final"][key] <= 1.0
  assert summary["final"]["top5"] >= summary["final"]["top1"]
  records = read_jsonl(workdir / "metrics.jsonl")
  train_records = [r for r in records if r["split"] == "train"]
  eval_records = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train_records] == list(range(1, steps + 1))
  assert [r["step"] for r in eval_records] == [2 * (i + 1) for i in range(evals)]
  assert all(np.isfinite(r["loss"]) for r in train_records)
  assert eval_records[-1]["examples"] == 24  # the whole mock eval split, each example once
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((workdir / "config.json").read_text())["method"] == method
  return summary, eval_records


def test_cifar_run_trains_and_evaluates_both_paths(tmp_path, capsys):
  run_mocked(cifar, tmp_path, model="resnet8", method="dcil", sparsity=0.9)
  summary, evals = check_run(tmp_path, "dcil")
  assert "dense_top1" in evals[-1]  # DCIL's dense path is monitored too
  assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)  # ramp over after one epoch
  assert len(summary["layer_sparsity"]) == 9  # the first conv, 6 in blocks, 2 shortcuts
  # One refresh before the 3rd step; the 4-step run never trains with one before a 5th.
  assert summary["flip_rate"]["refreshes"] == 1
  out = capsys.readouterr().out
  assert "layer sparsity" in out and "final sparse-path top-1" in out
  assert "deployable model: " in out and " params, MACs per example " in out
  # The resolved milestones, printed at start (the run is cut at 4 of the recipe's 600 steps).
  assert "schedule: 300 epochs of 2 steps" in out and "ends at epoch 1 (step 2)" in out
  # The DCIL setting is named: the experiments' default preset and its step bound.
  assert "method=dcil (preset robust, step bound lr·|g| <= 0.2)" in out


def test_imagenet_run_on_cpu_with_a_tiny_model(tmp_path):
  run_mocked(imagenet, tmp_path, model="resnet_tiny", image_size=32, method="dpf", sparsity=0.5)
  summary, evals = check_run(tmp_path, "dpf")
  assert "dense_top1" not in evals[-1]
  deploy = summary["deploy"]  # counted at the 32x32 input of this run
  assert deploy["params"] == summary["num_params"] and deploy["kept_macs"] < deploy["macs"]
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["dtype"] == "float32" and config["lr_schedule"] == "cosine"


def test_recipe_table_covers_every_registered_model():
  from dcil_jax.models import MODELS

  assert set(recipes.MODEL_RECIPES) == set(MODELS)


def test_a_step_that_does_not_fit_fails_with_a_clear_message(monkeypatch):
  from types import SimpleNamespace

  import jax

  device = SimpleNamespace(memory_stats=lambda: {"bytes_limit": 2**30}, device_kind="Fake GPU")
  monkeypatch.setattr(jax, "local_devices", lambda: [device])
  analysis = SimpleNamespace(
    argument_size_in_bytes=2**29,
    output_size_in_bytes=2**29,
    alias_size_in_bytes=2**29,
    temp_size_in_bytes=2**30,
  )
  compiled = SimpleNamespace(memory_analysis=lambda: analysis)
  with pytest.raises(MemoryError, match=r"1\.5 GiB per device.*Fake GPU has 1\.0 GiB"):
    train.check_memory(compiled, per_device_batch=256)
  analysis.temp_size_in_bytes = 2**28
  train.check_memory(compiled, per_device_batch=256)  # fits: no error


@pytest.mark.parametrize("config_module", [cifar, imagenet])
def test_local_configs_are_short_and_resolve(config_module):
  full, local = resolved(config_module), resolved(config_module, "local")
  local_steps = local.num_epochs * local.steps_per_epoch
  assert local_steps <= 200 and local.batch_size <= 32
  assert local.ramp_end_epoch <= local.num_epochs and local.model != full.model
  with pytest.raises(ValueError, match="Unknown"):
    config_module.get_config("huge")


def test_default_worker_count_leaves_cores_for_the_step():
  assert [resolve.default_worker_count(n) for n in (1, 2, 4, 8, 96, 240)] == [0, 0, 0, 4, 64, 64]
  assert resolved(cifar).run.worker_count == resolve.default_worker_count()
  assert resolved(cifar, **{"run.worker_count": 3}).run.worker_count == 3


TWO_PROCESS_RUN = {"model": "small_cnn", "method": "dcil", "sparsity": 0.9}


def start_two(workdir):
  argv = ["-c", CLI, "experiments.cifar", f"--workdir={workdir}"]
  return start_processes([*argv, *as_flags(SMOKE | TWO_PROCESS_RUN)])


def finish(procs):
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out[-2000:] + err[-4000:]
  return outputs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The CIFAR command as two local processes (jax.distributed on CPU, gloo collectives)."""
  workdir = tmp_path_factory.mktemp("two_processes")
  return workdir, finish(start_two(workdir))


@pytest.mark.slow  # the default run checks two processes on digits (test_two_processes.py)
def test_two_processes_train_like_one_on_mock_cifar(tmp_path, two_process_run):
  """Each process reads its half of every global batch, and the run equals the one-process
  run (in this process)."""
  workdir, outputs = two_process_run
  run_mocked(cifar, tmp_path / "single", **TWO_PROCESS_RUN)
  single = read_jsonl(tmp_path / "single" / "metrics.jsonl")
  assert "process 0 of 2" in outputs[0][1] and "process 1 of 2" in outputs[1][1]
  assert "final sparse-path top-1" in outputs[0][0]
  assert "final sparse-path top-1" not in outputs[1][0]  # only process 0 reports and writes

  multi = read_jsonl(workdir / "metrics.jsonl")
  assert [(r["split"], r["step"]) for r in multi] == [(r["split"], r["step"]) for r in single]
  for a, b in zip(multi, single, strict=True):
    for key in ("loss", "sparsity", "top1", "top5", "dense_top1", "examples"):
      if key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow  # two processes resuming is tested, with SIGTERM, in test_two_processes.py
def test_two_processes_rerun_on_a_finished_workdir_rewrite_the_same_summary(two_process_run):
  """Both processes restore the final checkpoint (saved by both) and write the same summary."""
  workdir, _ = two_process_run
  summary = (workdir / "summary.json").read_text()
  outputs = finish(start_two(workdir))
  assert "resumed at step" in outputs[0][0]
  timing = ("train_seconds", "images_per_second")
  strip = lambda text: {k: v for k, v in json.loads(text).items() if k not in timing}
  assert strip((workdir / "summary.json").read_text()) == strip(summary)


def test_per_device_batch_sets_the_global_batch_and_the_scaled_lr():
  config = resolve.resolve_config(_with(imagenet.get_config(), per_device_batch_size=128), 8)
  assert config.batch_size == 1024
  assert lr_at_epochs(config, [5])[0] == pytest.approx(0.4)
  with pytest.raises(ValueError, match="not both"):
    resolve.resolve_config(_with(cifar.get_config(), per_device_batch_size=16, batch_size=64), 2)


def _with(config, **overrides):
  """``config`` with ``overrides`` (``"run.x"`` for the run group)."""
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  return config


def test_an_accelerator_that_is_not_there_is_named_in_the_error():
  import jax

  from experiments import launch

  if jax.default_backend() != "cpu":
    pytest.skip("needs a machine without an accelerator, as CI")
  with pytest.raises(RuntimeError, match="--accelerator=gpu but JAX found no gpu"):
    launch.started_platform("gpu")
  assert launch.started_platform("cpu") == "cpu"
