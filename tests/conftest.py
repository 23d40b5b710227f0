"""Shared tiny model and data: small shapes keep compiles to a few seconds on 2 CPU cores.

The tests compile many small programs and run each for a few steps, so XLA's optimisations
cost more than they save (as in Flax's ``train_test.py``): they are turned off for every test
the whole session (``JAX_DISABLE_MOST_OPTIMIZATIONS=1``, which the processes the tests start
inherit; a test that measures the optimised program turns them back on). Every comparison a
test makes is between programs compiled under the same setting. The same
programs (the tiny models' steps) are compiled by many tests and processes: a persistent
compilation cache, private to this test session, compiles each once (the xdist workers
inherit the session's cache directory from the process that starts them, so they share it).

``pyproject.toml`` runs the files on two xdist workers (``-n 2 --dist loadfile``): a file runs
whole on one worker, so its module-scoped fixtures (a reference run, a compiled step) are built
once. ``FILE_SECONDS`` hands the longest files out first so that none starts last.

Helpers that more than one test file uses live here (no test module imports another): the tiny
model and data, tree comparisons, local multi-process starts, the short digits run of the resume
tests, and the random variables of the compaction tests.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="dcil-jax-test-cache.")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Two workers and the processes the tests start share one accelerator where there is one.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dcil_jax.models import SmallCNN  # noqa: E402

ROOT = Path(__file__).parent.parent  # the repository

# About how many seconds each file takes on one of the two workers (from `--durations=0`, summed
# per file; docs/development.md). Only the order matters: the files are handed out longest first
# (a file not listed counts as long), so the two workers end close together.
FILE_SECONDS = {
  "test_sequential": 54,
  "test_readme": 50,
  "test_composition": 43,
  "test_multi_device": 38,
  "test_resume": 32,
  "test_compact": 27,
  "test_nnx": 27,
  "test_checkpoints": 22,
  "test_allocation": 21,
  "test_experiments": 19,
  "test_nothing_silent": 18,
  "test_quickstart": 18,
  "test_train": 17,
  "test_models": 17,
  "test_transform": 16,
  "test_pool_gradient": 16,
  "test_deploy": 16,
  "test_robust_dcil": 14,
  "test_losses": 13,
  "test_sweep": 13,
  "test_fast_sweep": 12,
  "test_granularity": 10,
  "test_input_pipeline": 8,
  "test_loop": 8,
  "test_two_processes": 8,
  "test_baselines": 6,
  "test_masks": 6,
  "test_report": 5,
  "test_stability": 1,
  "test_fast_report": 1,
  "test_instability": 1,
  "test_schedules": 1,
  "test_benchmarks": 1,
  "test_export_cli": 1,
  "test_docs": 1,
}


def pytest_collection_modifyitems(items):
  # A stable sort: the tests of a file keep their order.
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.stem, 60))


def subprocess_env(**extra: str) -> dict[str, str]:
  """The environment of a process a test starts: this one's (compiled fast), plus ``extra``."""
  return dict(os.environ, **extra)


NUM_CLASSES = 5

# Needs 8 fake devices from process start: tests/test_multi_device.py runs it in a subprocess.
if os.environ.get("DCIL_MULTI_DEVICE") != "1":
  collect_ignore = ["multi_device"]


@pytest.fixture(scope="session")
def tiny_model():
  return SmallCNN(num_classes=NUM_CLASSES, widths=(4, 8))


@pytest.fixture(scope="session")
def tiny_batch():
  kx, ky = jax.random.split(jax.random.PRNGKey(42))
  return {
    "image": jax.random.normal(kx, (8, 8, 8, 1)),
    "label": jax.random.randint(ky, (8,), 0, NUM_CLASSES),
  }


@pytest.fixture(scope="session")
def tiny_variables(tiny_model, tiny_batch):
  return tiny_model.init(jax.random.PRNGKey(0), tiny_batch["image"])


def distillation_on(metrics) -> bool:
  """Whether a DCIL step's loss holds the distillation terms: ``loss - ce_s - ce_d`` is nearer
  ``kl_s + kl_d`` than 0 (a fixed threshold would read float32 rounding of the sum as "on")."""
  rest = float(metrics["loss"]) - float(metrics["ce_sparse"]) - float(metrics["ce_dense"])
  return abs(rest - float(metrics["kl_sparse"]) - float(metrics["kl_dense"])) < abs(rest)


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
  """Asserts two pytrees have the same structure and close leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert jnp.shape(x) == jnp.shape(y)
    assert jnp.allclose(x, y, rtol=rtol, atol=atol), float(jnp.max(jnp.abs(x - y)))


def start_processes(argv, *, count: int = 2, merge_output: bool = False) -> list[subprocess.Popen]:
  """``python argv...`` as ``count`` local JAX processes (``jax.distributed`` on CPU with gloo
  collectives, a coordinator port held for them: ``experiments.launch.start_local_processes``),
  run from the repository root with this process's environment."""
  from experiments import launch

  return launch.start_local_processes(argv, count=count, cwd=ROOT, merge_output=merge_output)


def lifted(model, variables, x, sparsity=0.6, **lift_kwargs):
  """Lifted params, their masks at ``sparsity`` and the lifted model state (or None)."""
  import dcil_jax
  from dcil_jax import paths, rules

  rule = rules.conv_kernels(model, x)
  params = paths.split_params(variables["params"], rule, **lift_kwargs)
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params), sparsity)
  names = lift_kwargs.get("path_names", paths.PATH_NAMES)
  rest = {k: v for k, v in variables.items() if k != "params"}
  return params, masks, paths.split_collections(rest, names)


def assert_same(got, want):
  """Two ``((loss, aux), grads)`` of DCIL losses agree: value, gradients, model state, terms."""
  (loss, aux), grads = got
  (ref_loss, ref_aux), ref_grads = want
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-6)
  tree_allclose(aux["model_state"], ref_aux["model_state"])
  for key in ("ce", "kl", "accuracy", "logits"):
    tree_allclose(aux[key], ref_aux[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# A short DCIL run of the digits command (test_resume, test_checkpoints, test_two_processes).

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


def run_in_process(workdir, stop_after_step=None):
  """What ``cli(workdir)`` runs, in this process (no signal needed: no subprocess either)."""
  from experiments import train
  from experiments.configs import digits

  config = digits.get_config("local")
  with config.unlocked():
    config.num_train_steps = STEPS
    config.run.checkpoint_every_steps = 2
    config.run.progress = False
    config.run.stop_after_step = stop_after_step
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
  import orbax.checkpoint as ocp

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


def assert_same_run(workdir, reference):
  summary, records = outcome(workdir)
  ref_summary, ref_records = outcome(reference)
  assert summary == ref_summary  # final and best accuracy, flip rates, sparsities: bit for bit
  assert records == ref_records  # every train, refresh and eval record, once, in order
  for a, b in zip(final_state(workdir), final_state(reference), strict=True):
    np.testing.assert_array_equal(a, b)  # params, BN statistics, momentum, masks, rng


# --------------------------------------------------------------------------------------------
# Compaction and allocation (test_compact, test_allocation).


def conv_kernels(path, leaf):
  """Convolution kernels (3-D for 1-D convs, 4-D for 2-D ones; Dense heads are 2-D)."""
  return path[-1].key == "kernel" and leaf.ndim >= 3


def random_variables(model, x, seed=0):
  """Random variables from the shapes alone (no jitted init: slow for the larger zoo models).

  Kernels are Kaiming-normal (fan-out); BN statistics, shifts and head biases are non-trivial, so
  the constants that compaction folds are not zero.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    shape = leaf.shape
    if name == "['kernel']":
      fan_out = int(np.prod(shape[:-2])) * shape[-1] if len(shape) > 2 else shape[0]
      return rng.normal(size=shape, scale=np.sqrt(2.0 / fan_out)).astype(np.float32)
    if name in ("['var']", "['scale']"):
      return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    return rng.normal(size=shape, scale=0.5).astype(np.float32)  # mean, bias

  return jax.tree_util.tree_map_with_path(make, shapes)
