"""The sweep report on a hand-made sweep directory (no model is run)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from experiments import report
from experiments import statistics as seed_stats

SPARSITIES = (0.5, 0.9)
SEEDS = (0, 1, 2)
# Final sparse-path top-1 per (method, sparsity), by seed. At 0.9 DCIL is clearly higher; at 0.5
# the means are equal. dpf_s0.5_seed2 is left unfinished (its value is never read).
FINAL = {
  ("dense", 0.0): [0.99, 0.985, 0.995],
  ("dpf", 0.5): [0.95, 0.96, None],
  ("dcil", 0.5): [0.95, 0.96, 0.955],
  ("dpf", 0.9): [0.90, 0.905, 0.895],
  ("dcil", 0.9): [0.975, 0.97, 0.98],
}
FLIP_AFTER_RAMP = {"dpf": 5e-3, "dcil": 1e-3}
STEP_STD = {"dense": 0.002, "dpf": 0.004, "dcil": 0.001}
# The eval curve's change at epoch 3: DPF dips by 20 pp there (its largest drop), the rest rise.
DIP = {"dense": 0.04, "dpf": -0.2, "dcil": 0.04}
STEPS_PER_EPOCH, EPOCHS = 10, 4
NOTES = "DCIL wins at **0.9**; see the curves.\n\n- hand-written point\n"


def _name(method: str, sparsity: float, seed: int) -> str:
  return f"dense_seed{seed}" if method == "dense" else f"{method}_s{sparsity:g}_seed{seed}"


def _write_run(
  root: Path,
  method: str,
  sparsity: float,
  seed: int,
  top1: float | None,
  granularity: str | None = None,
  deploy: dict[str, int] | None = None,
) -> None:
  rundir = root / _name(method, sparsity, seed)
  rundir.mkdir()
  config = {
    "model": "small_cnn",
    "dataset": "digits",
    "method": method,
    "sparsity": sparsity,
    "seed": seed,
    "num_epochs": EPOCHS,
    "ramp_end_epoch": 2.0,
    "kd_start_epoch": 1.0,
    "update_every": 5,
    "steps_per_epoch": None,
  }
  if granularity is not None:
    config["granularity"] = granularity
  (rundir / "config.json").write_text(json.dumps(config))
  if top1 is None:  # started, never finished
    return
  records: list[dict[str, Any]] = []
  curve = [top1 - 0.1, top1 - 0.05, top1 - 0.05 + DIP.get(method, 0.04), top1]
  for epoch, acc in enumerate(curve, start=1):
    step = epoch * STEPS_PER_EPOCH
    records.append({"step": step, "split": "train", "loss": 0.5, "accuracy_sparse": acc})
    records.append({"step": step, "split": "eval", "top1": acc, "top5": 1.0, "epoch": epoch})
    if method != "dense":
      flip = 0.1 if epoch <= 2 else FLIP_AFTER_RAMP.get(method, 2e-3)
      records.append({"step": step - 5, "split": "refresh", "flip_rate": flip, "revived": 0.0})
  (rundir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  steps = EPOCHS * STEPS_PER_EPOCH
  summary: dict[str, Any] = {
    "model": "small_cnn",
    "dataset": "digits",
    "method": method,
    "target_sparsity": sparsity,
    "num_params": 1234,
    "steps": steps,
    "final": {"top1": top1, "top5": 1.0, "loss": 0.1, "step": steps, "epoch": EPOCHS},
    "best": {"top1": top1 + 0.005, "top5": 1.0, "step": 30, "epoch": 3},
    "top1_variability": {
      "step_std": STEP_STD.get(method, 0.003),
      "std": 0.01,
      "min": top1,
      "evals": 2,
    },
  }
  if deploy is not None:
    summary["deploy"] = deploy
  if method != "dense":
    summary |= {
      "sparsity": sparsity,
      "layer_sparsity": {"['Conv_0']['kernel']": sparsity - 0.2, "['Conv_1']['kernel']": sparsity},
      "flip_rate": {
        "mean": 0.05,
        "mean_after_ramp": FLIP_AFTER_RAMP.get(method, 2e-3),
        "refreshes": 4,
      },
      "layer_flip_rate_after_ramp": {"Conv_0/kernel": 0.01, "Conv_1/kernel": 0.001},
      "ever_revived": 0.02 if method == "dpf" else 0.01,
    }
  (rundir / "summary.json").write_text(json.dumps(summary))


def _fake_sweep(
  root: Path,
  final: dict[tuple[str, float], list[float | None]] = FINAL,
  name: str = "fake_sweep",
  granularity: str | None = None,
  deploy: Callable[[str, float, int], dict[str, int] | None] = lambda *_: None,
) -> Path:
  sweep = root / name
  sweep.mkdir()
  runs = []
  for (method, sparsity), values in final.items():
    for seed, top1 in zip(SEEDS, values):
      cell = deploy(method, sparsity, seed)
      _write_run(sweep, method, sparsity, seed, top1, granularity, cell)
      runs.append(
        {
          "method": method,
          "sparsity": sparsity,
          "seed": seed,
          "name": _name(method, sparsity, seed),
        }
      )
  grid = {"config": {"model": "small_cnn", "dataset": "digits", "num_epochs": None}, "runs": runs}
  (sweep / "sweep.json").write_text(json.dumps(grid))
  return sweep


def _section(text: str, start: str, end: str) -> str:
  return text[text.index(start) : text.index(end, text.index(start))]


def _row(text: str, first_cell: str) -> str:
  (line,) = [x for x in text.splitlines() if x.startswith(f"| {first_cell} |")]
  return line


def _mean_sd(values: list[float | None]) -> str:
  kept = [v for v in values if v is not None]
  return f"{100 * statistics.mean(kept):.2f} ± {100 * statistics.stdev(kept):.2f} (n={len(kept)})"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("report")
  sweep = _fake_sweep(root)
  notes = root / "notes.md"
  notes.write_text(NOTES)
  out = root / "out"
  path = report.build_report([str(sweep)], str(out), notes=str(notes))
  return Path(path), sweep, out, notes


def test_main_table_has_seed_mean_and_sd(built):
  path, *_ = built
  assert path.name == "REPORT.md" and path.exists()
  text = path.read_text()
  table = _section(text, "### Final test top-1", "Secondary")
  assert "| Method | dense (s = 0) | s = 0.5 | s = 0.9 |" in table
  dcil = _row(table, "DCIL")
  assert "97.50 ± 0.50 (n=3)" in dcil  # written by hand above
  assert _mean_sd(FINAL[("dcil", 0.9)]) in dcil and _mean_sd(FINAL[("dcil", 0.5)]) in dcil
  dpf = _row(table, "DPF")
  assert _mean_sd(FINAL[("dpf", 0.5)]) in dpf and "(n=2)" in dpf  # the unfinished seed is out
  assert _mean_sd(FINAL[("dpf", 0.9)]) in dpf
  assert _mean_sd(FINAL[("dense", 0.0)]) in _row(table, "Dense")
  best = _section(text, "Secondary", "### DCIL vs each baseline")
  assert "chosen on the test set" in best
  assert _mean_sd([v + 0.005 for v in FINAL[("dcil", 0.9)]]) in _row(best, "DCIL")


def test_header_lists_missing_run_and_seeds(built):
  path, sweep, *_ = built
  text = path.read_text()
  (missing,) = [x for x in text.splitlines() if x.startswith("- Missing runs")]
  assert "dpf_s0.5_seed2" in missing and "dcil_s0.5_seed2" not in missing
  assert "- Seeds found: 0, 1, 2" in text
  assert "Finished runs: 14 of 15" in text
  assert "parameters: 1,234" in text and "4 epochs, 40 steps (10 per epoch)" in text
  assert f"`{sweep}`" in text
  assert "- Pruning granularity: weight (sparsity = fraction of the prunable weights" in text
  assert text.startswith("# DCIL vs DPF vs dense training: results")
  # Runs written before summaries had the deployment counts:
  assert "Not recorded" in _section(text, "### Deployable model", "### Figures")


def test_dcil_vs_dpf_verdicts(built):
  path, *_ = built
  section = _section(path.read_text(), "### DCIL vs each baseline", "### Stability")
  assert "p < 0.05" in section  # the rule is stated
  assert "#### DCIL vs DPF" in section and "Verdicts at a glance" not in section  # one baseline
  high = _row(section, "0.9")
  assert "DCIL higher" in high and "+7.50" in high
  assert stats.ttest_ind(FINAL[("dcil", 0.9)], FINAL[("dpf", 0.9)], equal_var=False).pvalue < 0.05
  equal = _row(section, "0.5")
  assert "no clear difference" in equal and "DCIL higher" not in equal and "+0.00" in equal
  p = stats.ttest_ind([0.95, 0.96, 0.955], [0.95, 0.96], equal_var=False).pvalue
  assert f"| {p:.3f} |" in equal


def test_stability_table_and_verdict(built):
  path, *_ = built
  section = _section(path.read_text(), "### Stability", "### Figures")
  dcil = [x for x in section.splitlines() if x.startswith("| 0.9 | DCIL |")][0]
  assert "1.00e-03" in dcil and "| 0.10 |" in dcil and "| 0.0100 |" in dcil
  dpf = [x for x in section.splitlines() if x.startswith("| 0.9 | DPF |")][0]
  assert "5.00e-03" in dpf and "| 0.40 |" in dpf and "| 20.00 |" in dpf  # the largest drop
  assert "- s = 0.9, DCIL vs DPF: **yes**" in section
  assert "- s = 0.5, DCIL vs DPF: **yes**" in section


def test_figures_are_pngs_linked_from_the_report(built):
  path, _, out, _ = built
  text = path.read_text()
  kinds = ("accuracy_vs_sparsity", "training_curves", "flip_rate", "layer_sparsity")
  for kind in kinds:
    png = out / "figures" / f"fake_sweep_{kind}.png"
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n"), png
    assert f"(figures/{png.name})" in text


def test_notes_command_and_determinism(built):
  path, sweep, out, notes = built
  text = path.read_text()
  assert text.rstrip().endswith(NOTES.rstrip())
  assert text.index("## Discussion") < text.index(NOTES.splitlines()[0])
  assert f"python -m experiments.report {sweep} --out={out} --notes={notes}" in text
  figure = (out / "figures" / "fake_sweep_flip_rate.png").read_bytes()
  report.build_report([str(sweep)], str(out), notes=str(notes))
  assert path.read_text() == text
  assert (out / "figures" / "fake_sweep_flip_rate.png").read_bytes() == figure


def test_unfinished_sweep_does_not_fail(tmp_path):
  sweep = tmp_path / "empty"
  sweep.mkdir()
  runs = [{"method": "dcil", "sparsity": 0.9, "seed": 0, "name": "dcil_s0.9_seed0"}]
  (sweep / "sweep.json").write_text(json.dumps({"config": {}, "runs": runs}))
  text = Path(report.build_report([str(sweep)], str(tmp_path / "out"))).read_text()
  assert "not started: `dcil_s0.9_seed0`" in text and "No finished runs yet." in text
  assert "## Discussion" not in text


def test_compare_verdicts():
  assert seed_stats.compare([0.80, 0.81, 0.79], [0.90, 0.91, 0.89])["verdict"] == "DCIL lower"
  one_seed = seed_stats.compare([0.95], [0.80])
  assert one_seed["p"] is None and one_seed["verdict"].startswith("no clear difference")
  # Large p-value: a big difference is not clear when the seeds spread as much.
  noisy = seed_stats.compare([0.90, 0.70, 0.95], [0.80, 0.60, 0.85])
  assert noisy["p"] > 0.05 and noisy["verdict"] == "no clear difference"


# A grid of every method: at 0.9 DCIL is clearly above GMP, clearly below RigL and level with
# DPF; at 0.5 all are equal.
FINAL5 = {
  ("dense", 0.0): [0.99, 0.985, 0.995],
  ("gmp", 0.5): [0.95, 0.96, 0.955],
  ("rigl", 0.5): [0.95, 0.96, 0.955],
  ("dpf", 0.5): [0.95, 0.96, 0.955],
  ("dcil", 0.5): [0.95, 0.96, 0.955],
  ("gmp", 0.9): [0.92, 0.925, 0.915],
  ("rigl", 0.9): [0.99, 0.995, 0.985],
  ("dpf", 0.9): [0.975, 0.97, 0.98],
  ("dcil", 0.9): [0.975, 0.97, 0.98],
}
PARAMS, PRUNABLE, MACS = 1000, 800, 10_000


def _deploy(method: str, sparsity: float, seed: int) -> dict[str, int] | None:
  """Counts as ``experiments.run_state.deploy_report`` writes them; RigL at 0.5 predates them."""
  if method == "rigl" and sparsity == 0.5:
    return None
  kept = round(PRUNABLE * (1 - sparsity))
  return {
    "params": PARAMS,
    "kept_params": PARAMS - PRUNABLE + kept,
    "macs": MACS,
    "kept_macs": 2000 + 10 * kept,
    "dense_bytes": 4 * PARAMS,
    "compressed_bytes": 4 * (PARAMS - PRUNABLE + kept) + PRUNABLE // 8,
  }


@pytest.fixture(scope="module")
def five_methods(tmp_path_factory):
  root = tmp_path_factory.mktemp("report5")
  sweep = _fake_sweep(root, FINAL5, "five", deploy=_deploy)
  out = root / "out"
  return Path(report.build_report([str(sweep)], str(out))).read_text(), out


def test_every_method_is_labelled_in_order(five_methods):
  text, _ = five_methods
  assert text.startswith("# DCIL vs GMP vs RigL vs DPF vs dense training: results")
  assert "- Methods: Dense, GMP, RigL, DPF, DCIL;" in text
  table = _section(text, "### Final test top-1", "Secondary")
  rows = [x.split(" | ")[0].lstrip("| ") for x in table.splitlines() if x.startswith("| ")]
  rows = rows[1:]  # the header
  assert rows == ["Dense", "GMP", "RigL", "DPF", "DCIL"]
  assert _mean_sd(FINAL5[("rigl", 0.9)]) in _row(table, "RigL")
  assert len({report._color(m) for m in report.METHOD_ORDER}) == 5


def test_dcil_is_compared_with_each_baseline(five_methods):
  text, _ = five_methods
  section = _section(text, "### DCIL vs each baseline", "### Stability")
  assert "Baselines: GMP, RigL, DPF." in section and "p < 0.05" in section
  tables = [x for x in section.splitlines() if x.startswith("#### ")]
  assert tables == ["#### DCIL vs GMP", "#### DCIL vs RigL", "#### DCIL vs DPF"]
  gmp = _section(section, "#### DCIL vs GMP", "#### DCIL vs RigL")
  rigl = _section(section, "#### DCIL vs RigL", "#### DCIL vs DPF")
  dpf = section[section.index("#### DCIL vs DPF") :]
  assert "| Sparsity | GMP (%) | DCIL (%) |" in gmp and "| Sparsity | RigL (%) |" in rigl
  assert "DCIL higher" in _row(gmp, "0.9") and "+5.50" in _row(gmp, "0.9")
  assert "DCIL lower" in _row(rigl, "0.9") and "-1.50" in _row(rigl, "0.9")
  p = stats.ttest_ind(FINAL5[("dcil", 0.9)], FINAL5[("rigl", 0.9)], equal_var=False).pvalue
  assert p < 0.05 and f"| {p:.3f} |" in _row(rigl, "0.9")
  assert "no clear difference" in _row(dpf, "0.9") and "+0.00" in _row(dpf, "0.9")
  for table in (gmp, rigl, dpf):
    assert "no clear difference" in _row(table, "0.5")
  glance = _section(section, "Verdicts at a glance", "#### DCIL vs GMP")
  assert "| Sparsity | DCIL vs GMP | DCIL vs RigL | DCIL vs DPF |" in glance
  assert _row(glance, "0.9") == (
    "| 0.9 | DCIL higher (+5.50 pp) | DCIL lower (-1.50 pp) | no clear difference (+0.00 pp) |"
  )


def test_stability_rows_and_verdicts_for_every_baseline(five_methods):
  text, _ = five_methods
  section = _section(text, "### Stability", "### Deployable model")
  for method in ("GMP", "RigL", "DPF", "DCIL"):
    assert sum(x.startswith(f"| 0.9 | {method} |") for x in section.splitlines()) == 1
  verdicts = [x for x in section.splitlines() if x.startswith("- s = ")]
  assert [x.split(":")[0] for x in verdicts] == [
    f"- s = {s}, DCIL vs {b}" for s in ("0.5", "0.9") for b in ("GMP", "RigL", "DPF")
  ]
  assert "GMP / RigL / DPF" in section and "by design" in section


def test_deployable_model_table_has_seed_means_and_na(five_methods):
  text, _ = five_methods
  section = _section(text, "### Deployable model", "### Figures")
  dcil = [x for x in section.splitlines() if x.startswith("| 0.9 | DCIL |")][0]
  # 200 non-prunable + 80 kept of 800; MACs 2000 + 800; 4 x 280 + 100 = 1220 bytes of 4000.
  assert dcil == "| 0.9 | DCIL | 3 | 280 | 28.0 % | 2.8 k | 28.0 % | 1.2 KiB | 30.5 % | 3.9 KiB |"
  dense = [x for x in section.splitlines() if x.startswith("| 0 | Dense |")][0]
  assert "| 1,000 | 100.0 % | 10 k | 100.0 % |" in dense
  rigl = [x for x in section.splitlines() if x.startswith("| 0.5 | RigL |")][0]
  assert rigl == "| 0.5 | RigL | 3 | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"


def test_five_method_figures(five_methods):
  text, out = five_methods
  for kind in ("accuracy_vs_sparsity", "training_curves", "flip_rate", "layer_sparsity"):
    png = out / "figures" / f"five_{kind}.png"
    assert png.read_bytes().startswith(b"\x89PNG"), png
    assert f"(figures/{png.name})" in text
  assert "DCIL vs GMP, RigL, DPF" in text  # the captions name the baselines


def test_filter_granularity_is_stated_in_the_header(tmp_path):
  final = {("dpf", 0.3): [0.9, 0.91, 0.92], ("dcil", 0.3): [0.9, 0.91, 0.93]}
  sweep = _fake_sweep(tmp_path, final, "filters", granularity="filter")
  text = Path(report.build_report([str(sweep)], str(tmp_path / "out"))).read_text()
  (line,) = [x for x in text.splitlines() if x.startswith("- Pruning granularity")]
  assert "**filter**" in line and "fraction of *filters*" in line
  assert report._unit(report.load_sweep(str(sweep), "filters")) == "filters"


def test_an_unknown_method_is_named_and_coloured(tmp_path):
  final = {("dpf", 0.9): [0.9, 0.91, 0.92], ("snip", 0.9): [0.8, 0.81, 0.8]}
  final[("dcil", 0.9)] = [0.9, 0.91, 0.93]
  sweep = _fake_sweep(tmp_path, final, "unknown")
  out = tmp_path / "out"
  text = Path(report.build_report([str(sweep)], str(out))).read_text()
  assert "- Methods: DPF, DCIL, snip;" in text and text.startswith("# DCIL vs DPF vs snip vs")
  assert "| snip |" in _section(text, "### Final test top-1", "Secondary")
  assert "#### DCIL vs snip" in text and "- s = 0.9, DCIL vs snip: " in text
  assert report._color("snip") in report.OTHER_COLORS
  assert report._color("snip") == report._color("snip")  # no per-process hash
  assert (out / "figures" / "unknown_training_curves.png").exists()


def test_paired_comparison_cancels_the_seeds_own_luck():
  # Seeds differ a lot (shared luck), DCIL is 2 pp higher on every seed: Welch cannot see it,
  # the same-seed comparison can.
  base = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.55}
  dcil = {k: v + 0.02 + 0.001 * k for k, v in base.items()}
  welch = seed_stats.compare(list(dcil.values()), list(base.values()))
  assert welch["verdict"] == "no clear difference"
  q = seed_stats.paired(dcil, base)
  assert q["n"] == 4 and q["wins"] == 4
  assert q["mean"] == pytest.approx(2.15) and q["p"] < 0.001
  assert seed_stats.paired({0: 0.5}, {0: 0.4}) is None  # one shared seed: no test
  assert seed_stats.paired({0: 0.5, 1: 0.6}, {2: 0.4, 3: 0.5}) is None  # no shared seeds
