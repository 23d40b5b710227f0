"""Quickstart: dense vs DPF vs DCIL on scikit-learn's digits, offline, in about two CPU minutes.

  uv run -m experiments.quickstart                       # or: python -m experiments.quickstart
  uv run -m experiments.quickstart --sparsity=0.98 --workdir=runs/qs98

Nothing here trains by itself: the quickstart is a config of the one training loop
(``experiments/configs/digits.py:quickstart``, the small CNN with the study's recipe), run for the
three methods by the sweep code (``experiments.sweep``) and reported by the report code
(``experiments.report``). So its numbers are the ones ``results/REPORT.md`` has for seed 0 (same
config, same loop, same metrics): final sparse-path test top-1, sparsity, mask flip rate after
the sparsity ramp (refreshes after the ramp's last step), all read from each run's
``summary.json``.

Writes, under ``--workdir`` (default ``runs/quickstart``): one run directory per method (metrics,
checkpoints, ``summary.json``; running the command again skips finished runs and continues an
interrupted one), ``results.json`` (the table's numbers and the curves), ``curves.png`` (test
accuracy during training) and ``REPORT.md`` with its figures (flip rates among them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from experiments import launch, report, sweep
from experiments.metric_writers import read_jsonl

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "digits.py") + ":quickstart"
METHODS = ("dense", "dpf", "dcil")
COLUMNS = (
  ("method", None),
  ("sparse top-1", ".4f"),
  ("dense-path top-1", ".4f"),
  ("sparsity", ".4f"),
  ("flip rate", ".5f"),
  ("flip rate after ramp", ".5f"),
  ("train s", ".1f"),
)


def results(workdir: str, runs: Sequence[sweep.Run]) -> dict[str, Any]:
  """The finished runs' summaries and curves, per method: the content of ``results.json``."""
  out: dict[str, Any] = {"methods": {}}
  for run in runs:
    rundir = os.path.join(workdir, run.name)
    with open(os.path.join(rundir, sweep.SUMMARY)) as f:
      summary = json.load(f)
    with open(os.path.join(rundir, "config.json")) as f:
      out["config"] = json.load(f)
    records = read_jsonl(os.path.join(rundir, "metrics.jsonl"))
    pick = lambda split, keys, records=records: [
      {k: r[k] for k in keys if k in r} for r in records if r["split"] == split
    ]
    out["methods"][run.method] = {
      "run": run.name,
      "summary": summary,
      "curves": {
        "eval": pick("eval", ("step", "epoch", "top1", "dense_top1", "loss", "sparsity")),
        "refresh": pick("refresh", ("step", "flip_rate", "revived", "ever_revived")),
        "train": pick("train", ("step", "loss", "accuracy_sparse", "learning_rate")),
      },
    }
  return out


def table_rows(result: dict[str, Any]) -> list[tuple[Any, ...]]:
  """One row per method, every value from the run's ``summary.json`` (None where it has none)."""
  rows = []
  for method, r in result["methods"].items():
    s = r["summary"]
    flips = s.get("flip_rate") or {}
    rows.append(
      (
        method,
        s["final"]["top1"],
        s["final"].get("dense_top1"),
        s.get("sparsity", 0.0),
        flips.get("mean"),
        flips.get("mean_after_ramp"),
        s.get("train_seconds"),
      )
    )
  return rows


def format_table(result: dict[str, Any]) -> str:
  """The printed table (docs/results.md shows one)."""
  cells = [[name for name, _ in COLUMNS]]
  for row in table_rows(result):
    cells.append(
      [
        str(v) if spec is None else ("-" if v is None else format(v, spec))
        for v, (_, spec) in zip(row, COLUMNS, strict=True)
      ]
    )
  widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
  lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def run(
  config: ConfigDict,
  workdir: str,
  *,
  methods: Sequence[str] = METHODS,
  sparsity: float = 0.9,
  seed: int = 0,
  progress: bool = True,
) -> dict[str, Any]:
  """Trains ``methods`` at ``sparsity`` (dense once) with ``config``, through the sweep; prints
  the table; writes ``results.json``, ``curves.png`` and ``REPORT.md`` into ``workdir``.

  Returns the content of ``results.json``.
  """
  runs = sweep.make_grid(methods, [sparsity], [seed])
  sweep.run_or_exit(config, workdir, runs, progress=progress)
  result = results(workdir, runs)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  data = report.load_sweep(workdir, "quickstart")
  report.training_curves_figure(data, os.path.join(workdir, "curves.png"))
  report.build_report([workdir], workdir)
  print(format_table(result))
  print(f"wrote {workdir}/results.json, {workdir}/curves.png and {workdir}/REPORT.md")
  return result


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/quickstart", "Where the runs and the results go.")
  config_flags.DEFINE_config_file(
    "config", CONFIG, "Base config (path[:arg]); override with --config.x=..."
  )
  flags.DEFINE_list("methods", list(METHODS), "Methods to compare.")
  flags.DEFINE_float("sparsity", 0.9, "Target sparsity of DPF and DCIL.")
  flags.DEFINE_integer("seed", 0, "Seed (model init, data order and augmentation).")
  flags.DEFINE_bool("progress", True, "Show the progress bar.")
  launch.define_platform_flags()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    sweep.make_grid(f.methods, [f.sparsity], [f.seed])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  launch.start(f.accelerator, f.distributed, f.watchdog_seconds)
  run(
    f.config,
    f.workdir,
    methods=f.methods,
    sparsity=f.sparsity,
    seed=f.seed,
    progress=f.progress,
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
