"""Runs trained with each filter allocation: final test top-1 and what compaction keeps.

  python -m benchmarks.allocation_trained runs/alloc/global_s0 runs/alloc/groups_s0 ...

For each run directory (trained by ``experiments.digits`` or another entry point with
``granularity="filter"``), the *final* checkpoint (the one the final top-1 in ``summary.json``
is measured on) is restored, its deployable sparse path compacted
(:func:`dcil_jax.deploy.compact`) and counted (:func:`dcil_jax.deploy.deploy_stats`). Prints one
Markdown row per run: allocation, seed, final sparse-path top-1, filters pruned / removed, params
and MACs kept (compact model vs dense). No timing: MACs are what the allocation changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax

import dcil_jax
from experiments import export, run_state


def measure(workdir: str | Path) -> dict[str, Any]:
  """The numbers of one run (see the module docstring)."""
  workdir = Path(workdir).resolve()  # orbax wants absolute paths
  state, config, step = export.restore_best(workdir, final=True)
  summary = json.loads((Path(workdir) / "summary.json").read_text())
  variables = jax.device_get(dcil_jax.export_variables(state))
  masks = jax.device_get(state.trained_masks)
  shape = tuple(run_state.example_input(config).shape[1:])
  model = state.model.module
  c = dcil_jax.deploy.compact(model, variables, masks, shape)
  dense = dcil_jax.deploy.deploy_stats(model, variables, shape)
  small = dcil_jax.deploy.deploy_stats(c.module, c.variables, shape)
  return {
    "workdir": str(workdir),
    "allocation": config.get("filter_allocation", "global"),
    "seed": config.seed,
    "step": step,
    "final_top1": summary["final"]["top1"],
    "sparsity": summary["final"]["sparsity"],
    "filters": c.report["filters"],
    "pruned": c.report["pruned"],
    "removed": c.report["removed"],
    "params": (small["params"], dense["params"]),
    "macs": (small["macs"], dense["macs"]),
  }


def row(m: dict[str, Any]) -> str:
  p, pd = m["params"]
  a, ad = m["macs"]
  return (
    f"| {m['allocation']} | {m['seed']} | {100 * m['final_top1']:.2f} % | "
    f"{m['pruned']} / {m['removed']} of {m['filters']} | {p:,} of {pd:,} ({p / pd:.1%}) | "
    f"{a / 1e6:.2f} M of {ad / 1e6:.2f} M ({a / ad:.1%}) |"
  )


def main(argv: list[str]) -> None:
  print("| allocation | seed | final top-1 | pruned / removed filters | params kept | MACs kept |")
  print("|---|---|---|---|---|---|")
  results = [measure(w) for w in argv]
  for m in results:
    print(row(m))
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:])
