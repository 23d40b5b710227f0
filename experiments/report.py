"""Turns finished sweeps into ``REPORT.md`` and figures, to commit next to the results.

  python -m experiments.report results/digits_small_cnn --out=results/digits_small_cnn/report
  python -m experiments.report runs/c10_resnet20 runs/c100_resnet56 --out=report \
      --notes=report/notes.md

Each ``SWEEP_DIR`` is one model/dataset grid written by ``experiments.sweep``; it becomes one
section: which runs are there (and the pruning granularity), final sparse-path test top-1 per
method and sparsity (the headline; best-epoch accuracy is picked on the test set, so it is only
shown as secondary), DCIL vs each baseline present (GMP, RigL, DPF, ...) with a Welch t-test
and a stated rule for the verdict, stability measures (mask flip rate, revived weights, accuracy
jumps), the deployable model (kept parameters, MACs, bytes on disk) and figures. Unfinished
runs (no ``summary.json``) are listed as missing, so a report of a sweep in progress works.
``--notes`` is hand-written markdown appended under "Discussion", so the analysis survives
regenerating the report. The output depends only on the inputs (no timestamps), so it can be
committed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from experiments import statistics
from experiments.metric_writers import read_jsonl

REPORT = "REPORT.md"
FIGURES = "figures"
METHOD_ORDER = ("dense", "gmp", "rigl", "dpf", "dcil")
LABELS = {"dense": "Dense", "gmp": "GMP", "rigl": "RigL", "dpf": "DPF", "dcil": "DCIL"}
COLORS = {
  "dense": "0.35",
  "gmp": "tab:purple",
  "rigl": "tab:red",
  "dpf": "tab:orange",
  "dcil": "tab:blue",
}
# Colours of methods not in COLORS, picked by a stable hash of the name (the same in every run).
OTHER_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
# The method compared with every other pruning method present (its baselines).
MAIN_METHOD = "dcil"
# A difference to a baseline is "clear" when both hold; stated in the report.
# Layer-sparsity bars are drawn at the highest sparsity and at this one (if in the grid).
LAYER_SPARSITY_ALSO = 0.9
NA = "n/a"


@dataclasses.dataclass(frozen=True)
class RunData:
  """One finished run: its grid cell and what it wrote."""

  name: str
  method: str
  sparsity: float
  seed: int
  summary: dict[str, Any]
  config: dict[str, Any]
  records: list[dict[str, Any]]

  def evals(self) -> list[dict[str, Any]]:
    return [r for r in self.records if r.get("split") == "eval"]

  def steps_per_epoch(self) -> float | None:
    """From the eval records (step / epoch), else the config, else steps / num_epochs."""
    for r in self.evals():
      if _num(r.get("epoch")) and r["step"]:
        return r["step"] / _num(r["epoch"])
    if self.config.get("steps_per_epoch"):
      return float(self.config["steps_per_epoch"])
    if self.config.get("num_epochs") and self.summary.get("steps"):
      return self.summary["steps"] / float(self.config["num_epochs"])
    return None


@dataclasses.dataclass
class Sweep:
  """A sweep directory: its finished runs and the names of the grid's unfinished ones."""

  path: str
  slug: str  # prefix of its figure files
  base_config: dict[str, Any]
  runs: list[RunData]
  started: list[str]  # run directory exists, no summary.json
  not_started: list[str]
  methods: list[str]  # in METHOD_ORDER
  sparsities: list[float]  # of the pruning methods, ascending

  def cell(self, method: str, sparsity: float = 0.0) -> list[RunData]:
    """Finished runs of one method (and sparsity, ignored for dense), by seed."""
    return [
      r
      for r in self.runs
      if r.method == method and (method == "dense" or _same(r.sparsity, sparsity))
    ]

  def first(self, key: str, default: Any = None) -> Any:
    """A value from the first summary that has it, else the resolved or base config."""
    for r in self.runs:
      if r.summary.get(key) is not None:
        return r.summary[key]
    for r in self.runs:
      if r.config.get(key) is not None:
        return r.config[key]
    value = self.base_config.get(key)
    return default if value is None else value


def _same(a: float, b: float) -> bool:
  return abs(a - b) < 1e-9


def _num(value: Any) -> float | None:
  """A JSON number (or "nan"/"inf", as metric_writers writes non-finite values) as a float."""
  if value is None:
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _nan(value: Any) -> float:
  """:func:`_num`, with NaN for a missing value (for arrays)."""
  x = _num(value)
  return np.nan if x is None else x


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _records(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl without duplicates: a resumed run may write a step twice; the last wins."""
  if not os.path.exists(path):
    return []
  latest: dict[tuple[str, int], dict[str, Any]] = {}
  for r in read_jsonl(path):
    latest[(r.get("split", ""), int(r.get("step", 0)))] = r
  return sorted(latest.values(), key=lambda r: (r["step"], r.get("split", "")))


def _grid(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The base config and runs of ``sweep.json``; without one, the run directories found."""
  sweep_file = os.path.join(path, "sweep.json")
  if os.path.exists(sweep_file):
    grid = _read_json(sweep_file)
    return grid.get("config", {}), list(grid.get("runs", []))
  runs = []
  for name in sorted(os.listdir(path)):
    config_file = os.path.join(path, name, "config.json")
    if name.endswith(".interrupted") or not os.path.exists(config_file):
      continue
    config = _read_json(config_file)
    sparsity = 0.0 if config["method"] == "dense" else float(config["sparsity"])
    runs.append(
      {"method": config["method"], "sparsity": sparsity, "seed": config["seed"], "name": name}
    )
  return {}, runs


def load_sweep(path: str, slug: str) -> Sweep:
  """Reads a sweep directory; runs without ``summary.json`` are only named as missing."""
  base_config, grid = _grid(path)
  runs, started, not_started = [], [], []
  for entry in grid:
    rundir = os.path.join(path, entry["name"])
    summary_file = os.path.join(rundir, "summary.json")
    if not os.path.exists(summary_file):
      (started if os.path.isdir(rundir) else not_started).append(entry["name"])
      continue
    config_file = os.path.join(rundir, "config.json")
    runs.append(
      RunData(
        name=entry["name"],
        method=entry["method"],
        sparsity=float(entry["sparsity"]),
        seed=int(entry["seed"]),
        summary=_read_json(summary_file),
        config=_read_json(config_file) if os.path.exists(config_file) else {},
        records=_records(os.path.join(rundir, "metrics.jsonl")),
      )
    )
  runs.sort(key=lambda r: (r.method, r.sparsity, r.seed))
  methods = {e["method"] for e in grid}
  sparsities = sorted({round(float(e["sparsity"]), 9) for e in grid if e["method"] != "dense"})
  return Sweep(
    path=path,
    slug=slug,
    base_config=base_config,
    runs=runs,
    started=started,
    not_started=not_started,
    methods=[m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER)),
    sparsities=sparsities,
  )


# Formatting: accuracies in % (differences and spreads in percentage points) with 2 decimals,
# rates in scientific notation, fractions of weights with 4 decimals.


def _pct(x: float | None) -> str:
  return NA if x is None else f"{100 * x:.2f}"


def _sci(x: float | None) -> str:
  return NA if x is None else f"{x:.2e}"


def _frac(x: float | None) -> str:
  return NA if x is None else f"{x:.4f}"


def _p(p: float | None) -> str:
  if p is None:
    return NA
  return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _g(x: Any) -> str:
  """A config number as short text (``45.0`` -> ``45``)."""
  value = _num(x)
  return NA if value is None else f"{value:g}"


def _sp(s: float) -> str:
  return f"{s:g}"


def _label(method: str) -> str:
  return LABELS.get(method, method)


def _color(method: str) -> str:
  if method in COLORS:
    return COLORS[method]
  return OTHER_COLORS[zlib.crc32(method.encode()) % len(OTHER_COLORS)]


def _pruning_methods(sweep: Sweep) -> list[str]:
  return [m for m in sweep.methods if m != "dense"]


def _baselines(sweep: Sweep) -> list[str]:
  """The pruning methods DCIL is compared with, in METHOD_ORDER."""
  return [m for m in _pruning_methods(sweep) if m != MAIN_METHOD]


def _granularities(sweep: Sweep) -> list[str]:
  """The pruning granularities of the sweep's runs (``"weight"`` where the config names none)."""
  configs = [r.config for r in sweep.runs] or [sweep.base_config]
  return sorted({c.get("granularity") or "weight" for c in configs})


def _unit(sweep: Sweep) -> str:
  """What a sparsity is a fraction of: ``"weights"`` or ``"filters"``."""
  return "filters" if _granularities(sweep) == ["filter"] else "weights"


def _spread(values: Sequence[float | None]) -> dict[str, float] | None:
  """:func:`statistics.seed_spread` of the values that exist, or None."""
  kept = [v for v in values if v is not None]
  return statistics.seed_spread(kept) if kept else None


def _cell(spread: dict[str, float] | None) -> str:
  """``mean ± sd (n=k)`` in %; no sd for one seed (it is undefined, not 0)."""
  if spread is None:
    return "—"
  if spread["n"] < 2:
    return f"{_pct(spread['mean'])} (n=1)"
  return f"{_pct(spread['mean'])} ± {_pct(spread['sd'])} (n={spread['n']})"


def _get(summary: dict[str, Any], *keys: str) -> float | None:
  value: Any = summary
  for key in keys:
    if not isinstance(value, dict):
      return None
    value = value.get(key)
  return _num(value)


def _final_top1(r: RunData) -> float | None:
  return _get(r.summary, "final", "top1")


def _best_top1(r: RunData) -> float | None:
  return _get(r.summary, "best", "top1")


def _mean(values: Sequence[float | None]) -> float | None:
  kept = [v for v in values if v is not None]
  return float(np.mean(kept)) if kept else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _accuracy_table(sweep: Sweep, value: Callable[[RunData], float | None]) -> list[str]:
  """Methods x (dense, sparsities), mean ± sd over seeds in %."""
  header = ["Method", "dense (s = 0)"] + [f"s = {_sp(s)}" for s in sweep.sparsities]
  rows = []
  for method in sweep.methods:
    if method == "dense":
      cells = [_cell(_spread([value(r) for r in sweep.cell("dense")]))]
      cells += ["—"] * len(sweep.sparsities)
    else:
      cells = ["—"] + [
        _cell(_spread([value(r) for r in sweep.cell(method, s)])) for s in sweep.sparsities
      ]
    rows.append([_label(method)] + cells)
  return _table(header, rows)


def _by_seed(runs: Sequence[RunData]) -> dict[int, float]:
  return {r.seed: v for r in runs if (v := _final_top1(r)) is not None}


def _comparisons(sweep: Sweep, baseline: str) -> list[tuple[float, dict[str, Any] | None, Any]]:
  """Per sparsity: ``(s, compare(...) or None, (DCIL spread, baseline spread))``; the compare
  dict also holds the same-seed ``paired`` comparison."""
  out = []
  for s in sweep.sparsities:
    dcil_runs, other_runs = sweep.cell(MAIN_METHOD, s), sweep.cell(baseline, s)
    dcil = [v for v in map(_final_top1, dcil_runs) if v is not None]
    other = [v for v in map(_final_top1, other_runs) if v is not None]
    c = statistics.compare(dcil, other) if dcil and other else None
    if c is not None:
      c["paired"] = statistics.paired(_by_seed(dcil_runs), _by_seed(other_runs))
    out.append((s, c, (_spread(dcil), _spread(other))))
  return out


def _paired_cells(c: dict[str, Any]) -> list[str]:
  q = c.get("paired")
  if q is None:
    return [NA, NA]
  return [f"{q['mean']:+.2f} ± {q['sd']:.2f} ({q['wins']}/{q['n']})", _p(q["p"])]


def _comparison_table(sweep: Sweep, baseline: str) -> list[str]:
  rows = []
  for s, c, (dcil, other) in _comparisons(sweep, baseline):
    if c is None:
      rows.append([_sp(s), _cell(other), _cell(dcil), "—", "—", NA, NA, NA, NA])
      continue
    rows.append(
      [
        _sp(s),
        _cell(c["other"]),
        _cell(c["dcil"]),
        f"{c['diff']:+.2f}",
        NA if c["larger_sd"] is None else f"{c['larger_sd']:.2f}",
        _p(c["p"]),
        c["verdict"],
        *_paired_cells(c),
      ]
    )
  label = _label(baseline)
  header = ["Sparsity", f"{label} (%)", "DCIL (%)", "Difference (pp)", "Larger sd (pp)", "p"]
  return _table(header + ["Verdict", "Same-seed difference (pp, DCIL wins)", "paired p"], rows)


def _comparison_section(sweep: Sweep) -> list[str]:
  """DCIL vs each baseline: one Welch-test table per baseline, and with several baselines a
  table of the verdicts at a glance."""
  baselines = _baselines(sweep)
  names = ", ".join(_label(b) for b in baselines)
  lines = [
    "### DCIL vs each baseline",
    "",
    f"Baselines: {names}. Final sparse-path test top-1. Difference = DCIL mean − baseline"
    " mean in percentage points (pp); p = Welch's t-test (unequal variances) over seeds, n/a"
    " with fewer than 2 seeds a side. **Rule:** a difference is clear when |difference| > the"
    f" larger of the two seed sds **and** p < {statistics.P_THRESHOLD}; otherwise the verdict is"
    ' "no clear difference". Each baseline and sparsity is tested on its own (no correction'
    " for multiple testing). Runs of the same seed share the initialisation and the data"
    " order, so the last two columns also give the same-seed differences (mean ± sd, and on"
    " how many seeds DCIL is higher) and the paired t-test; they are shown as evidence, not"
    " used by the rule.",
    "",
  ]
  if len(baselines) > 1:
    results = {b: _comparisons(sweep, b) for b in baselines}
    rows = []
    for i, s in enumerate(sweep.sparsities):
      row = [_sp(s)]
      for b in baselines:
        c = results[b][i][1]
        verdict = None if c is None else c["verdict"].split(" (")[0]  # the reason is below
        row.append("—" if c is None else f"{verdict} ({c['diff']:+.2f} pp)")
      rows.append(row)
    header = ["Sparsity"] + [f"DCIL vs {_label(b)}" for b in baselines]
    lines += ["Verdicts at a glance (difference in pp):", ""] + _table(header, rows) + [""]
  for b in baselines:
    lines += [f"#### DCIL vs {_label(b)}", ""] + _comparison_table(sweep, b) + [""]
  return lines[:-1]


def _stability_values(runs: Sequence[RunData]) -> dict[str, Any]:
  """Seed means of the stability measures of one cell (None where no run has them)."""
  flip = _mean([_get(r.summary, "flip_rate", "mean_after_ramp") for r in runs])
  return {
    "flip": flip,
    "revived": _mean([_get(r.summary, "ever_revived") for r in runs]),
    "step_std": _mean([_get(r.summary, "top1_variability", "step_std") for r in runs]),
    "min": _mean([_get(r.summary, "top1_variability", "min") for r in runs]),
    "drop": _mean([_largest_drop(r) for r in runs]),
    "seed_sd": (_spread([_final_top1(r) for r in runs]) or {}).get("sd") if len(runs) > 1 else None,
    "sparsity": _mean([_get(r.summary, "sparsity") for r in runs]),
    "n": len(runs),
  }


def _largest_drop(run: RunData) -> float | None:
  curve = [r["top1"] for r in run.evals() if _num(r.get("top1")) is not None]
  return statistics.largest_drop(curve) if len(curve) >= 2 else None


def _compared(name: str, dcil: float, other: float, fmt: Callable[[float | None], str]) -> str:
  word = "lower" if dcil < other else "higher" if dcil > other else "equal"
  return f"{name} {word} ({fmt(dcil)} vs {fmt(other)})"


def _stability_verdict(dcil: dict[str, Any], other: dict[str, Any]) -> str:
  """yes: DCIL's seed means of flip rate after the ramp, step sd and largest drop are all lower
  than the baseline's; no: none is; mixed otherwise. The word, then the three comparisons."""
  keys = ("flip", "step_std", "drop")
  if any(d[k] is None for d in (dcil, other) for k in keys):
    return "n/a (a measure is missing)"
  lower = sum(dcil[k] < other[k] for k in keys)
  word = "**yes**" if lower == len(keys) else "**no**" if lower == 0 else "**mixed**"
  pp = lambda x: f"{_pct(x)} pp"
  facts = [
    _compared("flip rate after ramp", dcil["flip"], other["flip"], _sci),
    _compared("step sd", dcil["step_std"], other["step_std"], pp),
    _compared("largest drop", dcil["drop"], other["drop"], pp),
  ]
  return f"{word}: " + ", ".join(facts)


def _stability_section(sweep: Sweep) -> list[str]:
  lines = [
    "### Stability",
    "",
    "Seed means. *Flip rate after ramp*: fraction of mask bits changed per refresh once the"
    " sparsity ramp has ended. *Ever revived*: fraction of prunable weights pruned at one"
    " refresh and kept at the next at least once. *Step sd*: standard deviation of the"
    " evaluation-to-evaluation change of test top-1 over the last quarter of the evaluations"
    " (pp); *window min*: the lowest test top-1 there (%). *Largest drop*: the deepest fall of"
    " test top-1 from one evaluation to the next over the whole run after its first 10 % (pp):"
    " the dips during the sparsity ramp that the end window misses. *Seed sd*: standard"
    " deviation of final top-1 over seeds (pp).",
    "",
  ]
  header = [
    "Sparsity",
    "Method",
    "n",
    "Achieved sparsity",
    "Flip rate after ramp",
    "Ever revived",
    "Step sd (pp)",
    "Window min (%)",
    "Largest drop (pp)",
    "Seed sd (pp)",
  ]
  cells = [("dense", 0.0)] if "dense" in sweep.methods else []
  cells += [(m, s) for s in sweep.sparsities for m in sweep.methods if m != "dense"]
  rows = []
  for method, s in cells:
    runs = sweep.cell(method, s)
    if not runs:
      continue
    v = _stability_values(runs)
    rows.append(
      [
        "0" if method == "dense" else _sp(s),
        _label(method),
        str(v["n"]),
        _frac(v["sparsity"]),
        _sci(v["flip"]),
        _frac(v["revived"]),
        _pct(v["step_std"]),
        _pct(v["min"]),
        _pct(v["drop"]),
        _pct(v["seed_sd"]),
      ]
    )
  lines += _table(header, rows) if rows else ["No finished runs."]
  baselines = _baselines(sweep)
  if MAIN_METHOD not in sweep.methods or not baselines:
    return lines
  names = " / ".join(_label(b) for b in baselines)
  lines += [
    "",
    f"Is DCIL more stable than {names} (lower flip rate after the ramp, lower step sd **and**"
    " lower largest drop; seed means compared, no significance test)?",
  ]
  if "gmp" in baselines or "rigl" in baselines:
    lines[-1] += (
      " GMP never regrows a pruned weight and RigL stops updating its masks at 75 % of"
      " training, so their flip rates after the ramp are (near) zero by design, not by"
      " stability: compare them on step sd and largest drop."
    )
  lines.append("")
  for s in sweep.sparsities:
    dcil = sweep.cell(MAIN_METHOD, s)
    for b in baselines:
      at, other = f"s = {_sp(s)}, DCIL vs {_label(b)}", sweep.cell(b, s)
      if not dcil or not other:
        lines.append(f"- {at}: n/a (no finished DCIL or {_label(b)} run)")
        continue
      verdict = _stability_verdict(_stability_values(dcil), _stability_values(other))
      lines.append(f"- {at}: {verdict}")
  return lines


# The deployable model: counts from summary["deploy"] (experiments.run_state.deploy_report).
DEPLOY = "deploy"


def _deploy_values(runs: Sequence[RunData]) -> dict[str, float | None]:
  keys = ("params", "kept_params", "macs", "kept_macs", "dense_bytes", "compressed_bytes")
  return {k: _mean([_get(r.summary, DEPLOY, k) for r in runs]) for k in keys}


def _si(x: float | None) -> str:
  """A count in 3 significant digits with k / M / G (MACs)."""
  if x is None:
    return NA
  for scale, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.0f}"


def _bytes(x: float | None) -> str:
  if x is None:
    return NA
  for scale, unit in ((2**30, " GiB"), (2**20, " MiB"), (2**10, " KiB")):
    if x >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f} B"


def _share(part: float | None, whole: float | None) -> str:
  return NA if part is None or not whole else f"{100 * part / whole:.1f} %"


def _deploy_section(sweep: Sweep) -> list[str]:
  """Per method and sparsity, the seed means of the deployable model's kept parameters, MACs
  per example and compressed size, each also as a share of the dense model's."""
  lines = ["### Deployable model", ""]
  if not any(_get(r.summary, DEPLOY, "kept_params") is not None for r in sweep.runs):
    return lines + [
      "Not recorded: these runs' `summary.json` predate the deployment counts (`deploy`)."
    ]
  lines += [
    "The exported sparse path (the pruned model), counted from its shapes and final masks;"
    " seed means. *Kept params*: every parameter less the masked kernel entries. *MACs*:"
    " multiply-accumulates per example of the conv and dense layers, a masked weight costing"
    " none (BatchNorm, activations and pooling not counted). *Compressed*: bit-packed masks,"
    " the kept values and every other variable as stored (`dcil_jax.compress`); *dense*: every"
    " variable as stored (float32). Shares are of the same model unpruned. n/a: a run whose"
    " summary predates these counts.",
  ]
  if _unit(sweep) == "filters":
    lines[-1] += (
      " With filter masks these are the masked model's counts: a compact model"
      " (`dcil_jax.compact`) also drops the pruned filters' inputs in the next layer and"
      " is smaller still."
    )
  lines.append("")
  header = [
    "Sparsity",
    "Method",
    "n",
    "Kept params",
    "of all",
    "MACs / example",
    "of dense",
    "Compressed",
    "of dense",
    "Dense (float32)",
  ]
  cells = [("dense", 0.0)] if "dense" in sweep.methods else []
  cells += [(m, s) for s in sweep.sparsities for m in _pruning_methods(sweep)]
  rows = []
  for method, s in cells:
    runs = sweep.cell(method, s)
    if not runs:
      continue
    v = _deploy_values(runs)
    rows.append(
      [
        "0" if method == "dense" else _sp(s),
        _label(method),
        str(len(runs)),
        NA if v["kept_params"] is None else f"{v['kept_params']:,.0f}",
        _share(v["kept_params"], v["params"]),
        _si(v["kept_macs"]),
        _share(v["kept_macs"], v["macs"]),
        _bytes(v["compressed_bytes"]),
        _share(v["compressed_bytes"], v["dense_bytes"]),
        _bytes(v["dense_bytes"]),
      ]
    )
  return lines + _table(header, rows)


# Figures.


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs: Any):
  """A figure on the Agg canvas (no pyplot: no global state, no display needed)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
  return fig, axes


def _save(fig: Any, path: str) -> None:
  # No software version in the PNG: the same inputs give the same file.
  fig.savefig(path, dpi=110, metadata={"Software": None})


def _percent_axis(ax: Any, axis: str = "y") -> None:
  from matplotlib.ticker import FuncFormatter

  fmt = FuncFormatter(lambda v, _: f"{v:g}%")
  (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _mean_curve(
  series: Sequence[dict[float, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Seed curves ``{x: y}`` aligned on x: (x, mean, sd over the seeds that have each x)."""
  xs = sorted(set().union(*series)) if series else []
  grid = np.full((len(series), len(xs)), np.nan)
  index = {x: i for i, x in enumerate(xs)}
  for row, curve in enumerate(series):
    for x, y in curve.items():
      grid[row, index[x]] = y
  count = np.sum(~np.isnan(grid), axis=0)
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", RuntimeWarning)
    mean = np.nanmean(grid, axis=0)
    sd = np.where(count > 1, np.nanstd(grid, axis=0, ddof=1), 0.0)
  return np.asarray(xs, dtype=np.float64), mean, sd


def _series(run: RunData, split: str, key: str) -> dict[float, float]:
  """``{epoch: value}`` of one run's records of ``split``."""
  per_epoch = run.steps_per_epoch()
  if not per_epoch:
    return {}
  out = {}
  for r in run.records:
    value = _num(r.get(key))
    if r.get("split") == split and value is not None:
      out[round(r["step"] / per_epoch, 6)] = value
  return out


def _grid_shape(n: int, max_cols: int = 3) -> tuple[int, int]:
  cols = min(n, max_cols)
  return math.ceil(n / cols), cols


def _schedule_lines(ax: Any, sweep: Sweep) -> None:
  """Dashed vertical lines at the end of the sparsity ramp and the start of DCIL's KD."""
  ramp = _num(sweep.first("ramp_end_epoch"))
  kd_start = _num(sweep.first("kd_start_epoch"))
  if ramp is not None:
    ax.axvline(ramp, color="0.2", ls="--", lw=1, label=f"ramp end (epoch {ramp:g})")
  if kd_start is not None and "dcil" in sweep.methods:
    ax.axvline(kd_start, color="tab:green", ls="--", lw=1, label=f"KD start (epoch {kd_start:g})")


def _title(sweep: Sweep) -> str:
  return f"{sweep.first('model', '?')} / {sweep.first('dataset', '?')}"


def _accuracy_figure(sweep: Sweep, path: str) -> bool:
  fig, axes = _figure(6.4, 4.2)
  ax = axes[0, 0]
  positions = np.arange(len(sweep.sparsities))
  drawn = False
  dense = (
    _spread([_final_top1(r) for r in sweep.cell("dense")]) if "dense" in sweep.methods else None
  )
  if dense is not None:
    mean, sd = 100 * dense["mean"], 100 * dense["sd"]
    ax.axhline(mean, color=COLORS["dense"], lw=1.5, label=f"Dense ({mean:.2f}%, n={dense['n']})")
    if sd > 0:
      ax.axhspan(mean - sd, mean + sd, color=COLORS["dense"], alpha=0.15, lw=0)
    drawn = True
  pruning = [m for m in sweep.methods if m != "dense"]
  for k, method in enumerate(pruning):
    offset = (k - (len(pruning) - 1) / 2) * 0.08
    xs, means, sds = [], [], []
    for i, s in enumerate(sweep.sparsities):
      spread = _spread([_final_top1(r) for r in sweep.cell(method, s)])
      if spread is not None:
        xs.append(i + offset)
        means.append(100 * spread["mean"])
        sds.append(100 * spread["sd"])
    if xs:
      ax.errorbar(
        xs,
        means,
        yerr=sds,
        marker="o",
        capsize=4,
        color=_color(method),
        label=_label(method),
      )
      drawn = True
  if not drawn:
    return False
  ax.set_xticks(positions, [_sp(s) for s in sweep.sparsities])
  ax.set_xlim(-0.5, len(sweep.sparsities) - 0.5)
  ax.set_xlabel(f"target sparsity (fraction of {_unit(sweep)} pruned)")
  ax.set_ylabel("final test top-1 (sparse path)")
  _percent_axis(ax)
  ax.set_title(f"{_title(sweep)}: final top-1 vs sparsity (mean ± sd over seeds)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)
  return True


def _pruning_figure(
  sweep: Sweep,
  path: str,
  split: str,
  key: str,
  *,
  percent: bool,
  log: bool,
  ylabel: str,
  title: str,
) -> bool:
  """One subplot per sparsity: each pruning method's (and for accuracy dense's) mean curve over
  seeds with its ±sd band."""
  methods = _pruning_methods(sweep)
  if not sweep.sparsities or not any(sweep.cell(m, s) for m in methods for s in sweep.sparsities):
    return False
  rows, cols = _grid_shape(len(sweep.sparsities))
  fig, axes = _figure(4.4 * cols, 3.4 * rows, rows, cols, sharey=log)
  scale = 100.0 if percent else 1.0
  epochs = max([_num(r.config.get("num_epochs")) or 0.0 for r in sweep.runs] + [0.0])
  positive = []
  for i, s in enumerate(sweep.sparsities):
    ax = axes.flat[i]
    shown = [("dense", sweep.cell("dense"))] if percent and "dense" in sweep.methods else []
    shown += [(m, sweep.cell(m, s)) for m in methods]
    tail = []
    for method, runs in shown:
      x, mean, sd = _mean_curve([c for c in (_series(r, split, key) for r in runs) if c])
      if not x.size:
        continue
      mean, sd = scale * mean, scale * sd
      if log:
        mean = np.where(mean > 0, mean, np.nan)
        positive += list(mean[np.isfinite(mean)])
      style = {"lw": 1.0, "ls": ":"} if method == "dense" else {"lw": 1.5}
      if log:  # a refresh that flips nothing breaks the line: the points between stay visible
        style |= {"marker": ".", "ms": 3}
      color = _color(method)
      ax.plot(x, mean, color=color, label=f"{_label(method)} (n={len(runs)})", **style)
      if method != "dense":
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)
      tail += list(mean[x >= 0.1 * x.max()])
    if not any(sweep.cell(m, s) for m in methods):
      ax.text(0.5, 0.5, "no finished pruned runs yet", ha="center", transform=ax.transAxes)
    _schedule_lines(ax, sweep)
    if epochs:
      ax.set_xlim(0, epochs)
    ax.set_title(f"sparsity {_sp(s)}", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if log and positive:  # a log axis needs a positive value (short runs may refresh to no flip)
      ax.set_yscale("log")
    if percent:
      _percent_axis(ax)
      finite = [v for v in tail if math.isfinite(v)]
      if finite:  # the first epochs would squash the part that matters
        ax.set_ylim(max(0.0, min(finite) - 2.0), min(100.0, max(finite) + 1.0))
    ax.legend(fontsize=7)
  if log and positive:  # clip ±sd bands that reach zero
    axes.flat[0].set_ylim(bottom=min(positive) / 3)
  for ax in axes.flat[len(sweep.sparsities) :]:
    ax.set_visible(False)
  fig.suptitle(f"{_title(sweep)}: {title}", fontsize=11)
  _save(fig, path)
  return True


def training_curves_figure(sweep: Sweep, path: str) -> bool:
  """Test top-1 (sparse path) during training, one panel per sparsity: the report's training
  curves figure, which the quickstart writes as ``curves.png``."""
  return _pruning_figure(
    sweep,
    path,
    "eval",
    "top1",
    percent=True,
    log=False,
    ylabel="test top-1 (sparse path)",
    title="test top-1 during training",
  )


def _short_layer(key: str) -> str:
  """``"['BasicBlock_0']['Conv_1']['kernel']"`` -> ``"BasicBlock_0/Conv_1"``."""
  parts = [p.strip("'\"") for p in key.strip("[]").split("][")]
  if len(parts) > 1 and parts[-1] == "kernel":
    parts = parts[:-1]
  return "/".join(parts)


def _layer_sparsities(sweep: Sweep) -> list[float]:
  chosen = {sweep.sparsities[-1]} if sweep.sparsities else set()
  chosen |= {s for s in sweep.sparsities if _same(s, LAYER_SPARSITY_ALSO)}
  return sorted(chosen, reverse=True)


def _layer_figure(sweep: Sweep, path: str) -> bool:
  methods = _pruning_methods(sweep)
  panels = [s for s in _layer_sparsities(sweep) if any(sweep.cell(m, s) for m in methods)]
  if not panels:
    return False
  layers: list[str] = []
  for s in panels:
    for m in methods:
      for r in sweep.cell(m, s):
        layers += [k for k in r.summary.get("layer_sparsity", {}) if k not in layers]
  if not layers:
    return False
  width = max(6.0, 0.45 * len(layers) * len(methods) + 1.5)
  fig, axes = _figure(width, 3.6 * len(panels), len(panels), 1)
  positions = np.arange(len(layers))
  bar = 0.8 / len(methods)
  for ax, s in zip(axes[:, 0], panels):
    for k, method in enumerate(methods):
      runs = sweep.cell(method, s)
      if not runs:
        continue
      values = np.array(
        [[_nan(r.summary.get("layer_sparsity", {}).get(key)) for key in layers] for r in runs]
      )
      with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        sd = np.nanstd(values, axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(layers))
      ax.bar(
        positions + (k - (len(methods) - 1) / 2) * bar,
        100 * mean,
        bar,
        yerr=100 * np.nan_to_num(sd),
        capsize=2,
        color=_color(method),
        label=f"{_label(method)} (seed mean, n={len(runs)})",
      )
    ax.axhline(100 * s, color="0.2", ls="--", lw=1, label=f"target {_sp(s)} (overall)")
    ax.set_xticks(positions, [_short_layer(key) for key in layers], rotation=45, ha="right")
    ax.set_ylabel("layer sparsity at the end")
    ax.set_ylim(0, 125)  # room for the legend above the bars
    ax.set_yticks(np.arange(0, 101, 20))
    _percent_axis(ax)
    ax.set_title(f"target sparsity {_sp(s)}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", ncol=min(len(methods) + 1, 3))
  fig.suptitle(f"{_title(sweep)}: per-layer sparsity at the end of training", fontsize=11)
  _save(fig, path)
  return True


def _figures(sweep: Sweep, fig_dir: str) -> list[tuple[str, str, str]]:
  """Writes the sweep's figures; returns (alt text, caption, path relative to the report)."""
  os.makedirs(fig_dir, exist_ok=True)
  made = []
  pruning = _pruning_methods(sweep)
  if MAIN_METHOD in pruning and len(pruning) > 1:  # "DCIL vs DPF", "DCIL vs GMP, RigL, DPF"
    versus = "DCIL vs " + ", ".join(_label(m) for m in pruning if m != MAIN_METHOD)
  else:
    versus = ", ".join(_label(m) for m in pruning) or "no pruning method"

  def add(suffix: str, caption: str, draw: Callable[[str], bool]) -> None:
    name = f"{sweep.slug}_{suffix}.png"
    if draw(os.path.join(fig_dir, name)):
      made.append((suffix.replace("_", " "), caption, f"{FIGURES}/{name}"))

  add(
    "accuracy_vs_sparsity",
    "Final test top-1 vs sparsity (mean ± sd over seeds; dense as a line with its ±sd band)",
    lambda p: _accuracy_figure(sweep, p),
  )
  add(
    "training_curves",
    f"Test top-1 during training, {versus} (mean ± sd over seeds; dense dotted)",
    lambda p: _pruning_figure(
      sweep,
      p,
      "eval",
      "top1",
      percent=True,
      log=False,
      ylabel="test top-1 (sparse path)",
      title="test top-1 during training (mean ± sd over seeds)",
    ),
  )
  add(
    "flip_rate",
    f"Mask flip rate at each refresh, {versus} (mean ± sd over seeds, log scale)",
    lambda p: _pruning_figure(
      sweep,
      p,
      "refresh",
      "flip_rate",
      percent=False,
      log=True,
      ylabel="mask flip rate per refresh",
      title="mask flip rate per refresh (mean ± sd over seeds)",
    ),
  )
  add(
    "layer_sparsity",
    f"Per-layer sparsity at the end of training, {versus}",
    lambda p: _layer_figure(sweep, p),
  )
  return made


def _granularity_line(sweep: Sweep) -> str:
  kinds = _granularities(sweep)
  if kinds == ["weight"]:
    return "- Pruning granularity: weight (sparsity = fraction of the prunable weights pruned)"
  if kinds == ["filter"]:
    in_filters = all(
      r.summary.get("sparsity_unit") == "filter"
      for r in sweep.runs
      if r.summary.get("sparsity") is not None
    )
    achieved = (
      "in filters too" if in_filters else "in weights (runs that predate counting in filters)"
    )
    return (
      "- Pruning granularity: **filter**: sparsity is the fraction of *filters* (output"
      f" channels of the prunable kernels) pruned, not of weights. The *Achieved sparsity*"
      f" column is {achieved}; the deployable-model counts are in weights"
    )
  if len(kinds) == 1:
    return f"- Pruning granularity: {kinds[0]}"
  return f"- Pruning granularity: {', '.join(kinds)} (differs between runs)"


def _header(sweep: Sweep) -> list[str]:
  epochs = sorted({_num(r.config.get("num_epochs")) for r in sweep.runs} - {None})
  steps = sorted({int(r.summary["steps"]) for r in sweep.runs if "steps" in r.summary})
  per_epoch = sorted({round(p, 3) for p in (r.steps_per_epoch() for r in sweep.runs) if p})
  seeds = sorted({r.seed for r in sweep.runs})
  total = len(sweep.runs) + len(sweep.started) + len(sweep.not_started)
  params = sweep.first("num_params")
  join = lambda xs: ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs) or NA
  lines = [
    f"## {_title(sweep)} (`{sweep.slug}`)",
    "",
    f"- Sweep directory: `{sweep.path}`",
    f"- Model: {sweep.first('model', NA)}; dataset: {sweep.first('dataset', NA)}; parameters: "
    + (f"{int(params):,}" if params is not None else NA),
    f"- Training: {join(epochs)} epochs, {join(steps)} steps ({join(per_epoch)} per epoch); "
    f"sparsity ramp ends at epoch {_g(sweep.first('ramp_end_epoch'))}, DCIL's KD starts at"
    f" epoch {_g(sweep.first('kd_start_epoch'))}, masks refreshed every"
    f" {_g(sweep.first('update_every'))} steps",
    f"- Methods: {', '.join(_label(m) for m in sweep.methods) or NA}; sparsities: "
    f"{join(sweep.sparsities)}",
    _granularity_line(sweep),
    f"- Seeds found: {join(seeds)}",
    f"- Finished runs: {len(sweep.runs)} of {total}",
  ]
  if sweep.started or sweep.not_started:
    missing = []
    if sweep.started:
      missing.append("started, not finished: " + ", ".join(f"`{n}`" for n in sweep.started))
    if sweep.not_started:
      missing.append("not started: " + ", ".join(f"`{n}`" for n in sweep.not_started))
    lines.append("- Missing runs (no summary.json; left out below): " + "; ".join(missing))
  else:
    lines.append("- Missing runs: none")
  return lines


def _section(sweep: Sweep, fig_dir: str) -> list[str]:
  lines = _header(sweep) + [""]
  if not sweep.runs:
    return lines + ["No finished runs yet.", ""]
  lines += [
    "### Final test top-1 (sparse path, %)",
    "",
    "Mean ± sample sd over seeds (n seeds) at the end of training: the headline numbers.",
    "",
  ]
  lines += _accuracy_table(sweep, _final_top1) + [""]
  lines += [
    "Secondary: best test top-1 over the evaluations (%). The epoch is **chosen on the test set**,"
    " so these are optimistic; do not use them as the result.",
    "",
  ]
  lines += _accuracy_table(sweep, _best_top1) + [""]
  if MAIN_METHOD in sweep.methods and _baselines(sweep):
    lines += _comparison_section(sweep) + [""]
  lines += _stability_section(sweep) + [""]
  lines += _deploy_section(sweep) + [""]
  figures = _figures(sweep, fig_dir)
  if figures:
    lines += ["### Figures", ""]
    for alt, caption, rel in figures:
      lines += [f"![{alt}]({rel})", "", f"*{caption}.*", ""]
  return lines


def _slugs(paths: Sequence[str]) -> list[str]:
  """File-name-safe, distinct names of the sweep directories (for figure file names)."""
  slugs = []
  for path in paths:
    base = os.path.basename(os.path.normpath(os.path.abspath(path))) or "sweep"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)
    candidate, k = slug, 2
    while candidate in slugs:
      candidate, k = f"{slug}_{k}", k + 1
    slugs.append(candidate)
  return slugs


def command(
  sweep_dirs: Sequence[str],
  out_dir: str,
  notes: str | None = None,
  tuned: Sequence[str] = (),
) -> str:
  """The command line that regenerates the report."""
  args = ["python", "-m", "experiments.report", *sweep_dirs, f"--out={out_dir}"]
  if notes is not None:
    args.append(f"--notes={notes}")
  if tuned:
    args.append(f"--tuned={','.join(tuned)}")
  return shlex.join(args)


def build_report(
  sweep_dirs: list[str], out_dir: str, notes: str | None = None, tuned: Sequence[str] = ()
) -> str:
  """Writes ``OUT_DIR/REPORT.md`` and ``OUT_DIR/figures/*.png``; returns the report's path.

  ``tuned``: grids of ``experiments.fast_sweep`` (learning rate chosen on validation, stability
  map; :mod:`experiments.fast_report`), reported first."""
  if not sweep_dirs:
    raise ValueError("Need at least one sweep directory.")
  for path in sweep_dirs:
    if not os.path.isdir(path):
      raise ValueError(f"Not a directory: {path}")
  notes_text = None
  if notes is not None:
    with open(notes) as f:
      notes_text = f.read()
  fig_dir = os.path.join(out_dir, FIGURES)
  os.makedirs(fig_dir, exist_ok=True)
  sweeps = [load_sweep(p, s) for p, s in zip(sweep_dirs, _slugs(sweep_dirs))]
  present = {m for sweep in sweeps for m in sweep.methods}
  others = [m for m in METHOD_ORDER if m in present and m not in (MAIN_METHOD, "dense")]
  others += sorted(present - set(METHOD_ORDER))
  title = " vs ".join([_label(MAIN_METHOD)] + [_label(m) for m in others] + ["dense"])
  lines = [
    f"# {title} training: results",
    "",
    "Generated from the runs' `summary.json`, `metrics.jsonl` and `config.json`. Accuracies are"
    " test top-1 of the sparse path (the pruned model) in %; differences and spreads in"
    " percentage points (pp); ± is the sample standard deviation over seeds.",
    "",
    "How to reproduce (regenerate this report):",
    "",
    "```sh",
    command(sweep_dirs, out_dir, notes, tuned),
    "```",
    "",
  ]
  if tuned:
    from experiments import fast_report

    lines += fast_report.sections(tuned, out_dir)
  for sweep in sweeps:
    lines += _section(sweep, fig_dir)
  if notes_text is not None:
    lines += ["## Discussion", "", notes_text.rstrip("\n"), ""]
  path = os.path.join(out_dir, REPORT)
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip("\n") + "\n")
  return path


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Output directory: REPORT.md and figures/.")
  flags.DEFINE_string("notes", None, "Markdown file included verbatim under 'Discussion'.")
  flags.DEFINE_list("tuned", [], "experiments.fast_sweep grid directories, reported first.")
  flags.mark_flags_as_required(["out"])


def main(argv: Sequence[str]) -> None:
  sweep_dirs = list(argv[1:])
  if not sweep_dirs:
    raise app.UsageError("Usage: python -m experiments.report SWEEP_DIR [...] --out=OUT_DIR")
  f = flags.FLAGS
  try:
    path = build_report(sweep_dirs, f.out, f.notes, f.tuned)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(f"Wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
