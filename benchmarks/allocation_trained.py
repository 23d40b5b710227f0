"""Runs trained with each filter allocation: final test top-1 and what compaction keeps.

  python -m benchmarks.allocation_trained runs/alloc/global_s0 runs/alloc/groups_s0 ...

For each run directory (trained by ``experiments.digits`` or another entry point with
``granularity="filter"``), the *final* checkpoint (the one the final top-1 in ``summary.json``
is measured on) is restored, its deployable sparse path compacted
(:func:`dcil_jax.deploy.compact`) and counted (:func:`dcil_jax.deploy.deploy_stats`). Prints one
Markdown row per run: allocation, seed, final sparse-path top-1, filters pruned / removed, params
and MACs kept (compact model vs dense).

``--time`` also times each compact model against the dense model (the first run's architecture
with every filter), jitted in JAX and as ONNX in onnxruntime, at each ``--batches`` size:
round-robin over ``--rounds`` rounds, the speed-up being the median of the per-round ratios
(``benchmarks.inference.time_all``). Run it on a quiet machine: other jobs on the same cores
distort the ratios.

  python -m benchmarks.allocation_trained --time --rounds=30 runs/alloc/global_s0 ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

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
  x = np.random.default_rng(1).normal(size=(4, *shape)).astype(np.float32)
  masked = dcil_jax.deploy.masked_function(model, variables, masks)
  return {
    "_compact_fn": c.apply,
    "_dense_fn": dcil_jax.deploy.masked_function(model, variables),
    "shape": shape,
    "max_abs_logit_diff": float(np.max(np.abs(jax.jit(c.apply)(x) - jax.jit(masked)(x)))),
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


def time_runs(
  results: list[dict[str, Any]], batches: list[int], rounds: int, load_before: float
) -> list[str]:
  """Dense vs each run's compact model (see the module docstring); the Markdown table."""
  import onnxruntime

  from benchmarks import inference

  first = results[0]
  configs = [{"model": "m", "label": "dense", "fn": first["_dense_fn"], "shape": first["shape"]}]
  configs += [
    {"model": "m", "label": f"{m['allocation']} s{m['seed']}", "fn": m["_compact_fn"],
     "shape": m["shape"]}
    for m in results
  ]  # fmt: skip
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = os.cpu_count() or 1
  for c in configs:
    onnx = dcil_jax.deploy.to_onnx(c["fn"], c["shape"]).SerializeToString()
    c["_session"] = onnxruntime.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
  for batch in batches:
    inference.time_all(configs, batch, rounds)
  keys = [f"{rt} b{b}" for rt in ("jax", "onnxruntime") for b in batches]
  lines = [
    f"load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}; "
    f"{rounds} rounds; speed-up = median of per-round dense / compact time (ms: median time)",
    "",
    "| model | " + " | ".join(keys) + " |",
    "|---|" + "---|" * len(keys),
  ]
  for c in configs:
    cells = [f"{c['speedup'][k]:.2f}× ({1e3 * c['median_s'][k]:.2f} ms)" for k in keys]
    lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
  for m, c in zip(results, configs[1:]):
    m["speedup"], m["median_s"] = c["speedup"], c["median_s"]
  return lines


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories")
  parser.add_argument("--time", action="store_true", help="also time dense vs compact")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  args = parser.parse_args(argv)
  load = os.getloadavg()[0]
  results = [measure(w) for w in args.workdirs]
  print("| allocation | seed | final top-1 | pruned / removed filters | params kept | MACs kept |")
  print("|---|---|---|---|---|---|")
  for m in results:
    print(row(m))
  if args.time:
    print("\n".join(["", *time_runs(results, args.batches, args.rounds, load)]))
  print(json.dumps([{k: v for k, v in m.items() if not k.startswith("_")} for m in results]))


if __name__ == "__main__":
  main()
