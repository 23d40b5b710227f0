"""End-to-end test of the quickstart on the real digits data: short, but the behaviour is real."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcil_jax
from dcil_jax.models import SmallCNN
from experiments import quickstart

STEPS = 160
EVAL_EVERY = 40
SPARSITY = 0.9


@pytest.fixture(scope="module")
def run_output(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  results = quickstart.run(
    steps=STEPS, eval_every=EVAL_EVERY, sparsity=SPARSITY, workdir=workdir, progress=False
  )
  return results, workdir


def test_digits_split_is_fixed_stratified_and_normalised():
  data = quickstart.load_digits_data(0)
  assert data.x_train.shape == (1437, 8, 8, 1) and data.x_test.shape == (360, 8, 8, 1)
  assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
  np.testing.assert_allclose(data.x_train.mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(data.x_train.std(), 1.0, atol=1e-4)
  # Stratified: every class holds about a tenth of the test set.
  counts = np.bincount(data.y_test, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37
  # Pixels were scaled to [0, 1] before standardising.
  raw = data.x_train * data.std + data.mean
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  again = quickstart.load_digits_data(0)
  np.testing.assert_array_equal(data.y_test, again.y_test)
  np.testing.assert_array_equal(data.x_test, again.x_test)


def test_batches_are_seeded_and_cover_each_epoch():
  a = quickstart.batch_indices(1437, 128, np.random.default_rng(3))
  b = quickstart.batch_indices(1437, 128, np.random.default_rng(3))
  epoch = [next(a) for _ in range(1437 // 128)]
  np.testing.assert_array_equal(np.concatenate(epoch), np.concatenate([next(b) for _ in epoch]))
  flat = np.concatenate(epoch)
  assert len(np.unique(flat)) == len(flat) == 11 * 128


def test_train_loss_falls(run_output):
  results, _ = run_output
  for method, r in results["methods"].items():
    loss = np.asarray(r["curves"]["train_loss"])
    assert len(loss) == STEPS
    assert loss[-20:].mean() < 0.5 * loss[:10].mean(), method


def test_final_sparsity_matches_target(run_output):
  results, _ = run_output
  x = jnp.zeros((1, 8, 8, 1))
  params = SmallCNN().init(jax.random.PRNGKey(0), x, train=False)["params"]
  rule = dcil_jax.rules.conv_kernels(SmallCNN(), x)
  n = sum(m.size for m in jax.tree.leaves(dcil_jax.masks_like(params, rule)))
  assert results["model"]["num_prunable"] == n
  for method in ("dpf", "dcil"):
    final = results["methods"][method]["final"]
    assert abs(final["sparsity"] - SPARSITY) <= 1.0 / n, method
    # The exported (deployable) sparse network really has that many zeros.
    assert abs(final["exported_zero_fraction"] - SPARSITY) <= 1.0 / n, method
  assert results["methods"]["dense"]["final"]["sparsity"] == 0.0


def test_masks_refresh_every_update_every_steps(run_output):
  results, _ = run_output
  for method in ("dpf", "dcil"):
    c = results["methods"][method]["curves"]
    # After every 16 steps; a refresh after the last step would train nothing and is not made.
    assert c["refresh_step"] == list(range(16, STEPS, 16)), method
    flips = np.asarray(c["flip_rate"])
    assert np.all((flips >= 0) & (flips <= 1))
    assert flips[0] > 0.0  # the first refresh of the ramp prunes weights
  assert results["methods"]["dense"]["curves"]["refresh_step"] == []


def test_dcil_learns(run_output):
  results, _ = run_output
  final = results["methods"]["dcil"]["final"]
  assert final["test_acc_sparse"] > 0.5
  assert final["test_acc_dense"] > 0.5
  assert results["methods"]["dcil"]["curves"]["test_acc_sparse"][0] < 0.3  # untrained: chance


def test_results_and_plot_written(run_output):
  results, workdir = run_output
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["config"]["steps"] == STEPS
  assert set(saved["methods"]) == {"dense", "dpf", "dcil"}
  assert saved["methods"]["dcil"]["final"] == pytest.approx(results["methods"]["dcil"]["final"])
  assert saved["methods"]["dpf"]["curves"]["eval_step"] == [0, 40, 80, 120, 160]
  png = os.path.join(workdir, "curves.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 10_000
