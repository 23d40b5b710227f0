"""The tuned study's tables and figures from ``experiments.fast_sweep`` grids.

  python -m experiments.fast_report results/mnist1d_tuned_cnn results/mnist1d_tuned_resnet1d \
      --out=results

For each grid (one model): each method's learning rate is **chosen on the validation split**
(the highest mean validation top-1 over seeds; a run that diverged counts as chance), and test
top-1 is reported at that learning rate only. Then the same-seed (paired) comparisons of each
DCIL variant with every other method at their chosen learning rates, and the **stability map**:
for each method, sparsity and learning rate, the fraction of seeds that diverged (a non-finite
step) or collapsed (final test top-1 below ``fast_sweep.COLLAPSE_FACTOR`` x chance).

``experiments.report --tuned=...`` puts these sections at the top of ``REPORT.md``; this
module's command writes them alone to ``OUT/TUNED.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import fast_sweep, statistics

FIGURES = "figures"
ORDER = ("dense", "gmp", "rigl", "dpf", "dcil", "dcil_robust", "dcil_clip1", "dcil_robust_kdclip")
LABELS = {
  "dense": "Dense",
  "gmp": "GMP",
  "rigl": "RigL",
  "dpf": "DPF",
  "dcil": "DCIL-official",
  "dcil_robust": "DCIL-robust",
  "dcil_clip1": "DCIL, gradient clipped at norm 1",
  "dcil_robust_kdclip": "DCIL, clipped at norm 1 + kd_clip 1",
}
DCIL_VARIANTS = ("dcil", "dcil_robust", "dcil_clip1", "dcil_robust_kdclip")  # "dcil": official
NUM_CLASSES = 10


def _order(variant: str) -> int:
  return ORDER.index(variant) if variant in ORDER else len(ORDER)


def _label(variant: str, bounded: bool = False) -> str:
  """The variant's name; in a grid whose recipe bounds every method's step (``max_step_norm``),
  the official DCIL variant is ``DCIL.robust`` (the official loss with the bound)."""
  if bounded and variant == "dcil":
    return LABELS["dcil_robust"]
  return LABELS.get(variant, variant)


def _bounded(cell: dict[str, Any]) -> bool:
  return bool(cell["config"].get("max_step_norm"))


def failed(run: dict[str, Any]) -> bool:
  """Diverged (a non-finite step) or collapsed (final test top-1 < 2x chance)."""
  return run["diverged_step"] is not None or run["collapsed"]


def _val(run: dict[str, Any]) -> float:
  """Validation top-1 for choosing: a diverged run counts as chance (the loop would stop it)."""
  return 1.0 / NUM_CLASSES if run["diverged_step"] is not None else run["val_top1"]


def by_lr(cell: dict[str, Any]) -> dict[float, list[dict[str, Any]]]:
  out: dict[float, list[dict[str, Any]]] = {}
  for run in cell["runs"]:
    out.setdefault(run["lr"], []).append(run)
  return dict(sorted(out.items()))


def choose_lr(cell: dict[str, Any]) -> float:
  """The learning rate with the highest mean validation top-1 (the smaller one on a tie)."""
  means = {lr: np.mean([_val(r) for r in runs]) for lr, runs in by_lr(cell).items()}
  best = max(means.values())
  return min(lr for lr, m in means.items() if m == best)


def _mean_sd(values: Sequence[float]) -> str:
  values = np.asarray(values, np.float64) * 100
  if len(values) < 2:
    return f"{values.mean():.2f} (n={len(values)})"
  return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _key(cell: dict[str, Any]) -> tuple[int, float]:
  return _order(cell["variant"]), cell["sparsity"]


def _name(cell: dict[str, Any]) -> str:
  label = _label(cell["variant"], _bounded(cell))
  return label if cell["variant"] == "dense" else f"{label} @ {cell['sparsity']:g}"


# Published test top-1 on MNIST-1D (Greydanus 2020: the CNN, ``ConvBase``); the 1-D ResNet is
# this project's own model.
PUBLISHED_TOP1 = {"mnist1d_cnn": 0.94}


def _grid_lines(workdir: str, cells: list[dict[str, Any]], fig_dir: str) -> list[str]:
  import json

  with open(os.path.join(workdir, "grid.json")) as f:
    grid = json.load(f)
  first = cells[0]
  config = first["config"]
  model = config["model"]
  bounded = _bounded(first)
  total_runs = sum(len(c["runs"]) for c in cells)
  wall = sum(c["wall_s"] for c in cells)
  cpu = [c["cpu_s"] for c in cells if "cpu_s" in c]
  boundaries = ", ".join(f"{b:g}" for b in config["lr_boundaries"])
  missing = [n for n in grid["cells"] if n not in {c["cell"] for c in cells}]
  lines = [
    f"## Tuned MNIST-1D study: {model} (`{workdir}`)",
    "",
    "- Data: MNIST-1D, trained on the `fit` split (3,500 of the 4,000 train signals), learning "
    "rate chosen on `validation` (the other 500, fixed seed), test on the published 1,000.",
    f"- Training: {config['num_epochs']} epochs of {first['steps_per_epoch']} steps (batch "
    f"{config['batch_size']}), lr warm-up over {config['warmup_epochs']:g} epoch(s) from half the "
    f"peak, ×{config['lr_decay']:g} at epochs {boundaries}; "
    f"sparsity ramp ends at epoch {config['ramp_end_epoch']:g}; DCIL's distillation from epoch "
    f"{config['kd_start_epoch']:g}; masks refreshed every {config['update_every']} steps.",
    (
      f"- Recipe: every method's SGD step bounded, lr·‖g‖ ≤ {config['max_step_norm']:g} "
      "(`dcil_jax.clip_step_norm`), so DCIL here is DCIL-robust."
      if bounded
      else "- Recipe: no step bound (the official recipe), so DCIL here is DCIL-official."
    ),
    f"- Grid: learning rates {', '.join(f'{x:g}' for x in grid['lrs'])} × seeds "
    f"{', '.join(map(str, grid['seeds']))}; {len(cells)} of {len(grid['cells'])} cells finished "
    f"({total_runs} runs)" + (f"; **missing**: {', '.join(missing)}" if missing else "") + ".",
    f"- Wall time of the finished cells: {wall / 60:.1f} min"
    + (f" ({sum(cpu) / 60:.1f} min of CPU time)" if cpu else "")
    + " (`experiments.fast_sweep`; cells of one grid may run in parallel "
    "processes, so their wall times overlap; on 2 CPU cores shared with other jobs).",
    "",
  ]
  cells = sorted(cells, key=_key)
  chosen = {c["cell"]: choose_lr(c) for c in cells}

  # Validation by lr
  lrs = grid["lrs"]
  lines += [
    "### Validation top-1 by learning rate (%, mean over seeds; the chosen one in bold)",
    "",
    "A diverged run counts as chance here. ✗k = k seeds failed (diverged or collapsed).",
    "",
    "| Method @ sparsity | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
    "|---|" + "---|" * len(lrs),
  ]
  for c in cells:
    groups = by_lr(c)
    row = []
    for lr in lrs:
      runs = groups.get(lr, [])
      if not runs:
        row.append("—")
        continue
      text = f"{100 * np.mean([_val(r) for r in runs]):.2f}"
      if lr == chosen[c["cell"]]:
        text = f"**{text}**"
      bad = sum(failed(r) for r in runs)
      row.append(text + (f" ✗{bad}" if bad else ""))
    lines.append(f"| {_name(c)} | " + " | ".join(row) + " |")
  lines.append("")

  # Test at the chosen lr
  sparsities = sorted({c["sparsity"] for c in cells if c["variant"] != "dense"})
  variants = sorted({c["variant"] for c in cells}, key=_order)
  table = {(c["variant"], c["sparsity"]): c for c in cells}
  lines += [
    "### Test top-1 at the learning rate chosen on validation (%, mean ± sd over seeds)",
    "",
    "| Method | " + " | ".join(["dense"] + [f"s = {s:g}" for s in sparsities]) + " |",
    "|---|" + "---|" * (len(sparsities) + 1),
  ]
  tests: dict[tuple[str, float], dict[int, float]] = {}
  for v in variants:
    row = []
    for s in [0.0] + sparsities:
      c = table.get((v, s))
      if c is None:
        row.append("—")
        continue
      runs = by_lr(c)[chosen[c["cell"]]]
      tests[(v, s)] = {r["seed"]: r["test_top1"] for r in runs}
      bad = sum(failed(r) for r in runs)
      row.append(
        f"{_mean_sd([r['test_top1'] for r in runs])} (lr {chosen[c['cell']]:g}"
        + (f", ✗{bad}" if bad else "")
        + ")"
      )
    lines.append(f"| {_label(v, bounded)} | " + " | ".join(row) + " |")
  lines.append("")
  if ("dense", 0.0) in tests:
    dense = np.mean(list(tests[("dense", 0.0)].values()))
    published = PUBLISHED_TOP1.get(model)
    versus = (
      f" ({'at or above' if dense >= published else '**below**'} the published "
      f"~{100 * published:.0f} % of this model on MNIST-1D)"
      if published
      else " (no published accuracy for this model)"
    )
    lines += [f"Dense reaches {100 * dense:.2f} % test at its chosen learning rate{versus}.", ""]

  # Paired comparisons
  mains = [v for v in variants if v in DCIL_VARIANTS]
  for main in mains:
    others = [v for v in variants if v not in ("dense", main)]
    lines += [
      f"### {_label(main, bounded)} vs each other method (test, each at its own chosen lr)",
      "",
      "Same-seed difference = DCIL variant − other, in pp (mean ± sd over seeds, and on how many "
      "seeds the DCIL variant is higher), paired t-test p; Welch's test and the report's rule "
      "(|difference| > larger sd and p < 0.05) as in the sections below.",
      "",
      "| Other | Sparsity | Other (%) | "
      + _label(main, bounded)
      + " (%) | Same-seed diff (pp, wins) | paired p | Welch verdict |",
      "|---|---|---|---|---|---|---|",
    ]
    for other in others:
      for s in sparsities:
        a, b = tests.get((main, s)), tests.get((other, s))
        if not a or not b:
          continue
        pair = statistics.paired(a, b)
        welch = statistics.compare(list(a.values()), list(b.values()))
        same = (
          "—"
          if pair is None
          else f"{pair['mean']:+.2f} ± {pair['sd']:.2f} ({pair['wins']}/{pair['n']})"
        )
        p = "—" if pair is None or pair["p"] is None else f"{pair['p']:.3g}"
        lines.append(
          f"| {_label(other, bounded)} | {s:g} | {_mean_sd(list(b.values()))} | "
          f"{_mean_sd(list(a.values()))} | {same} | {p} | {welch['verdict']} "
          f"({welch['diff']:+.2f} pp) |"
        )
    lines.append("")

  # Stability map
  collapse = 100 * fast_sweep.COLLAPSE_FACTOR / NUM_CLASSES
  lines += [
    "### Stability map: seeds that diverged or collapsed, by learning rate",
    "",
    "k/n = k of n seeds failed: diverged (a non-finite step; the loop stops such a run, "
    "first step in brackets) or collapsed (final test top-1 < "
    f"{fast_sweep.COLLAPSE_FACTOR:g}× chance = {collapse:g} %).",
    "",
    "| Method @ sparsity | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
    "|---|" + "---|" * len(lrs),
  ]
  for c in cells:
    groups = by_lr(c)
    row = []
    for lr in lrs:
      runs = groups.get(lr, [])
      if not runs:
        row.append("—")
        continue
      bad = sum(failed(r) for r in runs)
      steps = sorted(r["diverged_step"] for r in runs if r["diverged_step"] is not None)
      text = f"{bad}/{len(runs)}"
      if steps:
        text += f" ({len(steps)} NaN, step {steps[0]})"
      row.append(f"**{text}**" if bad else text)
    lines.append(f"| {_name(c)} | " + " | ".join(row) + " |")
  lines.append("")
  figure = _stability_figure(cells, lrs, model, fig_dir)
  rel = os.path.join(FIGURES, os.path.basename(figure))
  lines += [f"![Stability map, {model}]({rel})", ""]
  return lines


def _stability_figure(cells: list[dict[str, Any]], lrs: Sequence[float], model: str, fig_dir: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  frac = np.full((len(cells), len(lrs)), np.nan)
  for i, c in enumerate(cells):
    groups = by_lr(c)
    for j, lr in enumerate(lrs):
      runs = groups.get(lr, [])
      if runs:
        frac[i, j] = np.mean([failed(r) for r in runs])
  fig, ax = plt.subplots(figsize=(1.4 * len(lrs) + 2.8, 0.32 * len(cells) + 1.4))
  im = ax.imshow(frac, cmap="Reds", vmin=0, vmax=1, aspect="auto")
  for i in range(len(cells)):
    for j in range(len(lrs)):
      if np.isfinite(frac[i, j]):
        ax.text(j, i, f"{frac[i, j]:.1f}", ha="center", va="center", fontsize=7)
  ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
  ax.set_yticks(range(len(cells)), [_name(c) for c in cells], fontsize=7)
  ax.set_xlabel("peak learning rate")
  ax.set_title(f"{model}: fraction of seeds diverged or collapsed", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  os.makedirs(fig_dir, exist_ok=True)
  # one figure per model, recipe length and recipe (grids of one model at two lengths coexist)
  suffix = f"_{cells[0]['config']['num_epochs']:g}ep" + ("_bounded" if _bounded(cells[0]) else "")
  path = os.path.join(fig_dir, f"stability_map_{model}{suffix}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def sections(grid_dirs: Sequence[str], out_dir: str) -> list[str]:
  """The markdown lines of every grid's section; figures go to ``OUT_DIR/figures``."""
  lines = []
  for workdir in grid_dirs:
    cells = fast_sweep.load_cells(workdir)
    if not cells:
      lines += [f"## Tuned MNIST-1D study: `{workdir}`", "", "No finished cell yet.", ""]
      continue
    lines += _grid_lines(workdir, cells, os.path.join(out_dir, FIGURES))
  return lines


def main(argv: Sequence[str]) -> None:
  from absl import flags

  grid_dirs = list(argv[1:])
  out = flags.FLAGS.out
  lines = ["# Tuned MNIST-1D study", ""] + sections(grid_dirs, out)
  path = os.path.join(out, "TUNED.md")
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip("\n") + "\n")
  print(f"Wrote {path}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("out", "results", "Output directory (TUNED.md and figures/).")
  app.run(main)
