"""The quickstart on the real digits data: the one loop, through the sweep and report code, made
short (2 epochs) but otherwise what a newcomer runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import quickstart
from experiments.configs import digits

SPARSITY = 0.9
STEPS = 22  # 2 epochs of 11 steps


@pytest.fixture(scope="module")
def run_output(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quickstart")
  config = digits.get_config("quickstart")
  with config.unlocked():
    # The study's recipe at 2 epochs: the milestones scaled with num_epochs, the ramp shortened
    # to one epoch so that the masks reach their target.
    config.num_epochs = 2
    config.ramp_end_epoch = 1.0
    config.update_every = 4
  result = quickstart.run(config, str(workdir), sparsity=SPARSITY, progress=False)
  return result, workdir


def test_the_three_methods_run_and_are_printed_in_one_table(run_output, capsys):
  result, _ = run_output
  assert list(result["methods"]) == ["dense", "dpf", "dcil"]
  table = quickstart.format_table(result)
  assert table.splitlines()[0].split(" | ")[0].strip() == "method"
  assert [line.split(" | ")[0].strip() for line in table.splitlines()[2:]] == list(
    result["methods"]
  )
  for method, r in result["methods"].items():
    assert r["summary"]["steps"] == STEPS, method
    assert r["summary"]["dataset"] == "digits" and r["summary"]["model"] == "small_cnn"


def test_final_sparsity_matches_target_in_the_exported_model(run_output):
  result, _ = run_output
  for method in ("dpf", "dcil"):
    summary = result["methods"][method]["summary"]
    assert summary["sparsity"] == pytest.approx(SPARSITY, abs=1e-3), method
    # The exported (deployable) sparse network really has that many zeros.
    assert summary["exported_zero_fraction"] == pytest.approx(SPARSITY, abs=1e-3), method
  assert "sparsity" not in result["methods"]["dense"]["summary"]
  assert quickstart.table_rows(result)[0][3] == 0.0  # dense: nothing pruned


def test_masks_refresh_every_update_every_steps_and_flips_after_the_ramp_are_one_number(
  run_output,
):
  result, _ = run_output
  for method in ("dpf", "dcil"):
    refreshes = result["methods"][method]["curves"]["refresh"]
    # Every 4 steps, recorded at the step that first trains with the new masks (1-based 5, 9,
    # ...; the first step's masks come from init).
    assert [r["step"] for r in refreshes] == list(range(5, STEPS + 1, 4)), method
    flips = np.asarray([r["flip_rate"] for r in refreshes])
    assert np.all((flips >= 0) & (flips <= 1))
    assert flips.max() > 0.5  # the per-epoch ramp prunes 90 % at the refresh after epoch 1
    # The table's "flip rate after ramp" is the summary's: refreshes after the ramp's last step.
    after = [r["flip_rate"] for r in refreshes if r["step"] > 11]
    row = next(row for row in quickstart.table_rows(result) if row[0] == method)
    assert dict(zip([c for c, _ in quickstart.COLUMNS], row))["flip rate after ramp"] == (
      pytest.approx(np.mean(after))
    )
    summary = result["methods"][method]["summary"]["flip_rate"]
    assert summary["mean_after_ramp"] == pytest.approx(np.mean(after))
  assert result["methods"]["dense"]["curves"]["refresh"] == []


def test_dcil_learns_on_both_paths(run_output):
  result, _ = run_output
  final = result["methods"]["dcil"]["summary"]["final"]
  # Chance is 0.1; after these 22 steps at 90 % sparsity both paths are near 0.5, where the
  # exact value depends on the CPU's float rounding (0.49 on one machine, 0.5+ on another).
  assert final["top1"] > 0.3 and final["dense_top1"] > 0.3
  train = result["methods"]["dcil"]["curves"]["train"]
  assert train[-1]["loss"] < train[0]["loss"]


def test_results_figure_and_report_are_written(run_output):
  result, workdir = run_output
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["methods"]["dcil"]["summary"] == result["methods"]["dcil"]["summary"]
  assert saved["config"]["num_epochs"] == 2 and saved["config"]["lr_boundaries"] == [1, 1.5]
  assert [r["step"] for r in saved["methods"]["dpf"]["curves"]["eval"]] == [11, 22]
  png = (workdir / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  report = (workdir / "REPORT.md").read_text()
  assert "DPF" in report and "DCIL" in report
