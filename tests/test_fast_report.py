"""The tuned study's report: lr chosen on validation, test at that lr, the stability map."""

import json
import os

from experiments import fast_report, fast_sweep


def run(lr, seed, val, test, diverged=None):
  return {
    "lr": lr,
    "seed": seed,
    "val_top1": val,
    "test_top1": test,
    "diverged_step": diverged,
    "collapsed": test < 0.2,
  }


def cell(variant, sparsity, runs):
  config = {
    "model": "mnist1d_cnn",
    "num_epochs": 30,
    "batch_size": 128,
    "warmup_epochs": 1.0,
    "lr_decay": 0.1,
    "lr_boundaries": [15, 22],
    "ramp_end_epoch": 22.0,
    "kd_start_epoch": 7.0,
    "update_every": 16,
  }
  name = fast_sweep.Cell(variant, sparsity).name
  return {
    "cell": name,
    "variant": variant,
    "sparsity": sparsity,
    "config": config,
    "steps_per_epoch": 27,
    "wall_s": 60.0,
    "cpu_s": 30.0,
    "runs": runs,
  }


def write_grid(path, cells):
  os.makedirs(path, exist_ok=True)
  grid = {"cells": [c["cell"] for c in cells] + ["dpf_s0.9"], "seeds": [0, 1], "lrs": [0.1, 0.2]}
  with open(os.path.join(path, "grid.json"), "w") as f:
    json.dump(grid, f)
  for c in cells:
    with open(os.path.join(path, c["cell"] + ".json"), "w") as f:
      json.dump(c, f)


def test_lr_is_chosen_on_validation_and_failures_are_mapped(tmp_path):
  dense = cell("dense", 0.0, [run(0.1, 0, 0.90, 0.95), run(0.1, 1, 0.91, 0.95),
                              run(0.2, 0, 0.95, 0.90), run(0.2, 1, 0.96, 0.90)])  # fmt: skip
  # lr 0.2: one seed diverges (counts as chance for choosing) despite a high recorded val
  nan = run(0.2, 0, 0.99, 0.99, diverged=40)
  dcil = cell("dcil", 0.9, [run(0.1, 0, 0.80, 0.81), run(0.1, 1, 0.82, 0.83),
                            nan, run(0.2, 1, 0.70, 0.10)])  # fmt: skip
  gmp = cell("gmp", 0.9, [run(0.1, 0, 0.70, 0.71), run(0.1, 1, 0.72, 0.75),
                          run(0.2, 0, 0.60, 0.61), run(0.2, 1, 0.62, 0.60)])  # fmt: skip
  assert fast_report.choose_lr(dense) == 0.2  # best on validation, though worse on test
  assert fast_report.choose_lr(dcil) == 0.1
  grid = str(tmp_path / "grid")
  write_grid(grid, [dense, dcil, gmp])
  text = "\n".join(fast_report.sections([grid], str(tmp_path)))
  assert "| Dense | 90.00 ± 0.00 (lr 0.2) |" in text  # test at the chosen lr
  assert "**below** the published" in text
  assert "missing**: dpf_s0.9" in text
  # DCIL vs GMP, same seed: +10 and +8 pp
  assert "| GMP | 0.9 | 73.00 ± 2.83 | 82.00 ± 1.41 | +9.00 ± 1.41 (2/2) |" in text
  # stability map: DCIL at lr 0.2 lost both seeds (one NaN at step 40, one collapse)
  assert "| DCIL-official @ 0.9 | 0/2 | **2/2 (1 NaN, step 40)** |" in text
  assert os.path.exists(tmp_path / "figures" / "stability_map_mnist1d_cnn_30ep.png")


def test_a_grid_with_a_step_bound_names_its_dcil_robust_and_its_own_map(tmp_path):
  """Under a recipe that bounds every method's step, ``dcil`` (the official loss) plus the bound
  is ``DCIL.robust``: the report must not call it official."""
  runs = [run(0.1, 0, 0.80, 0.81), run(0.1, 1, 0.82, 0.83)]
  dcil, gmp = cell("dcil", 0.9, runs), cell("gmp", 0.9, runs)
  for c in (dcil, gmp):
    c["config"]["max_step_norm"] = 0.2
  grid = str(tmp_path / "bounded")
  write_grid(grid, [dcil, gmp])
  text = "\n".join(fast_report.sections([grid], str(tmp_path)))
  assert "lr·‖g‖ ≤ 0.2" in text and "DCIL-official" not in text
  assert "| DCIL-robust @ 0.9 |" in text
  assert os.path.exists(tmp_path / "figures" / "stability_map_mnist1d_cnn_30ep_bounded.png")


def test_a_grid_that_has_not_started_is_reported_as_such(tmp_path):
  assert fast_sweep.load_cells(str(tmp_path / "not_yet")) == []
  text = "\n".join(fast_report.sections([str(tmp_path / "not_yet")], str(tmp_path)))
  assert "No finished cell yet." in text


def test_only_the_cnn_is_compared_with_the_published_accuracy(tmp_path):
  """The published ~94 % is the paper's CNN's: a 1-D ResNet's dense run is not measured by it."""
  dense = cell("dense", 0.0, [run(0.1, 0, 0.98, 0.98), run(0.1, 1, 0.98, 0.99)])
  dense["config"]["model"] = "resnet1d"
  grid = str(tmp_path / "resnet")
  write_grid(grid, [dense])
  text = "\n".join(fast_report.sections([grid], str(tmp_path)))
  assert "Dense reaches 98.50 % test" in text
  assert "the published ~94 %" not in text
  assert "(no published accuracy for this model)" in text
