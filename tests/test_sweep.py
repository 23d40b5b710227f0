"""The sweep runner: its grid, and a real tiny sweep on digits that resumes and reports."""

import json

import pytest

from experiments import report, sweep
from experiments.configs import digits


def test_grid_runs_dense_once_per_seed_and_goes_seed_by_seed():
  runs = sweep.make_grid(["dense", "dpf", "dcil"], [0.5, 0.9], [0, 1])
  assert len(runs) == 2 * (1 + 2 * 2)
  assert [r.name for r in runs[:5]] == [
    "dense_seed0",
    "dpf_s0.5_seed0",
    "dcil_s0.5_seed0",
    "dpf_s0.9_seed0",
    "dcil_s0.9_seed0",
  ]
  assert {r.seed for r in runs[5:]} == {1}


@pytest.mark.parametrize(
  "methods, sparsities, seeds, message",
  [
    (["snip"], [0.9], [0], "methods"),
    (["dpf"], [1.0], [0], "sparsities"),
    (["dpf"], [0.9], [0, 0], "seeds"),
  ],
)
def test_bad_grids_are_refused(methods, sparsities, seeds, message):
  with pytest.raises(ValueError, match=message):
    sweep.make_grid(methods, sparsities, seeds)


def test_shard_parsing():
  assert sweep.parse_shard("1/4") == (1, 4)
  for bad in ("4/4", "x", "1/0", "-1/2"):
    with pytest.raises(ValueError, match="--shard"):
      sweep.parse_shard(bad)


def test_a_tiny_sweep_runs_resumes_uses_its_seeds_and_reports(tmp_path):
  base = digits.get_config("local")
  with base.unlocked():
    base.num_train_steps = 12
  runs = sweep.make_grid(["dense", "dpf"], [0.9], [0, 1])
  done = sweep.run_sweep(base, str(tmp_path), runs, progress=False)
  assert [s["method"] for s in done] == ["dense", "dpf", "dense", "dpf"]
  for run in runs:
    summary = json.loads((tmp_path / run.name / "summary.json").read_text())
    config = json.loads((tmp_path / run.name / "config.json").read_text())
    assert (config["method"], config["sparsity"], config["seed"]) == run[:3]
    assert summary["steps"] == 12
  # The seeds are really used: the same method with another seed learns something else.
  a, b = (json.loads((tmp_path / f"dpf_s0.9_seed{s}" / "summary.json").read_text()) for s in (0, 1))
  assert a["final"]["loss"] != b["final"]["loss"]
  # Run again: everything is finished, nothing trains.
  assert sweep.run_sweep(base, str(tmp_path), runs, progress=False) == []
  path = report.build_report([str(tmp_path)], str(tmp_path / "report"))
  text = open(path).read()
  assert "(n=2)" in text and "DPF" in text
