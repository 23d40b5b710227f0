"""Sweep throughput on MNIST-1D: runs per minute of the per-run loop vs the fast sweep engine.

  python -m benchmarks.sweep_throughput  # writes benchmarks/results/sweep_throughput_cpu.*

**Before**: ``experiments.sweep.run_sweep`` (one ``experiments.train.train_and_evaluate`` per
run: grain input, an evaluation and a checkpoint every epoch), the paper's CNN at the MNIST-1D
recipe (30 epochs), dense and DCIL at 90 % (seed 0). **After**: ``experiments.fast_sweep.run_cell``
for the same two methods, each cell 4 learning rates x 5 seeds (20 runs) in one process, 30
epochs of the ``fit`` split, with the engine ``--batching`` names (``host``, the default: one
compiled single-run step queued from the host; ``map`` / ``vmap``: one program per epoch).
Both include compiling. Wall time and the process's CPU time (all threads) are recorded with
the load average: on a shared machine the wall time is inflated by the other jobs, the CPU time
much less.

**Two processes at once** (``--part=pinning``): the study runs one ``fast_sweep`` process per
recipe on 2 cores. Two child processes train the same cell (``--pinning_model``, DCIL at 90 %,
5 seeds, 3 epochs) side by side, first each free to use both cores, then each pinned to its own
core with ``taskset`` (and once with XLA's single-threaded CPU runtime instead of pinning); each
reports its wall ms per run-step after its first (compiling) epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _timed(fn) -> tuple[Any, dict[str, float]]:
  load = os.getloadavg()[0]
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return out, {"wall_s": wall, "cpu_s": cpu, "load_start": load, "load_end": os.getloadavg()[0]}


def before(epochs: int | None) -> list[dict[str, Any]]:
  from experiments import sweep
  from experiments.configs import mnist1d

  base = mnist1d.get_config("cnn")
  if epochs:
    base.num_epochs = epochs
  out = []
  for run in (sweep.Run("dense", 0.0, 0), sweep.Run("dcil", 0.9, 0)):
    with tempfile.TemporaryDirectory() as workdir:
      _, t = _timed(lambda run=run, workdir=workdir: sweep.run_sweep(
        base, workdir, [run], progress=False
      ))  # fmt: skip
    common.log(f"before {run.name}: {t}")
    steps = sweep.run_steps(sweep.run_config(base, run))
    out.append({"path": "experiments.sweep", "cell": run.name, "runs": 1, "steps": steps, **t})
  return out


def after(epochs: int | None, batching: str) -> list[dict[str, Any]]:
  from experiments import fast_sweep
  from experiments.configs import mnist1d

  base = mnist1d.get_config("cnn")
  base.dataset = "mnist1d_val"
  if epochs:
    base.num_epochs = epochs
  data = fast_sweep.mnist1d_data()
  seeds, lrs = [0, 1, 2, 3, 4], list(fast_sweep.DEFAULT_LRS)
  out = []
  for cell in (fast_sweep.Cell("dense", 0.0), fast_sweep.Cell("dcil", 0.9)):
    record, t = _timed(lambda cell=cell: fast_sweep.run_cell(
      base, cell, seeds, lrs, data, batching=batching
    ))  # fmt: skip
    t["compile_and_first_epoch_s"] = record["epoch_end_s"][0]
    common.log(f"after {cell.name}: {t}")
    runs = len(record["runs"])
    out.append({
      "path": f"experiments.fast_sweep ({batching})",
      "cell": cell.name,
      "runs": runs,
      "steps": record["steps"],
      **t,
    })  # fmt: skip
  return out


def after_from_grid(workdir: str) -> list[dict[str, Any]]:
  """The fast path's numbers from a grid's own cells (``run_cell`` records wall and CPU time),
  so that the study's runs are the measurement instead of an extra cell."""
  from experiments import fast_sweep

  out = []
  for record in fast_sweep.load_cells(workdir):
    if "cpu_s" not in record:
      continue
    out.append({
      "path": f"experiments.fast_sweep ({record['batching']}), grid {workdir}",
      "cell": record["cell"],
      "runs": len(record["runs"]),
      "steps": record["steps"],
      "wall_s": record["wall_s"],
      "cpu_s": record["cpu_s"],
      "load_start": float("nan"),
      "load_end": record["load_avg"],
    })  # fmt: skip
  return out


PLACEMENTS = {  # name: (command prefix for child k, extra environment)
  "free (both on all cores)": (lambda k: [], {}),
  "XLA single-threaded (--xla_cpu_multi_thread_eigen=false)": (
    lambda k: [],
    {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
  ),
  "pinned (taskset -c 0 / -c 1)": (lambda k: ["taskset", "-c", str(k)], {}),
}
PINNING_EPOCHS = 3


def pinning_child(model: str) -> dict[str, Any]:
  """One process's share of the pinning measurement: the steady wall ms per run-step."""
  from experiments import fast_sweep
  from experiments.configs import mnist1d

  base = mnist1d.get_config(model)
  base.dataset = "mnist1d_val"
  data = fast_sweep.mnist1d_data()
  cell = fast_sweep.Cell("dcil", 0.9)
  steps_per_epoch = len(data.train[1]) // fast_sweep.cell_config(base, cell).batch_size
  seeds = [0, 1, 2, 3, 4]
  record = fast_sweep.run_cell(
    base, cell, seeds, [0.1], data,
    num_steps=PINNING_EPOCHS * steps_per_epoch,
  )  # fmt: skip
  ends = record["epoch_end_s"]  # the first epoch's end includes compiling
  steady = (record["steps"] - record["steps_per_epoch"]) * len(record["runs"])
  return {"ms_per_run_step": 1000 * (ends[-1] - ends[0]) / steady, "run_steps": steady}


def pinning(model: str) -> list[dict[str, Any]]:
  out = []
  for name, (prefix, env) in PLACEMENTS.items():
    load = os.getloadavg()[0]
    children = [
      subprocess.Popen(
        [
          *prefix(k),
          sys.executable,
          "-m",
          "benchmarks.sweep_throughput",
          "--part=pinning_child",
          f"--pinning_model={model}",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
      )
      for k in range(2)
    ]
    results = []
    for child in children:
      stdout, _ = child.communicate()
      if child.returncode:
        raise RuntimeError(f"{name}: a child process failed (exit {child.returncode})")
      results.append(json.loads(stdout.strip().splitlines()[-1]))
    row = {
      "placement": name,
      "model": model,
      "ms_per_run_step": [r["ms_per_run_step"] for r in results],
      "run_steps": results[0]["run_steps"],
      "load_start": load,
      "load_end": os.getloadavg()[0],
    }
    common.log(f"pinning: {row}")
    out.append(row)
  return out


def pinning_report(rows: list[dict[str, Any]]) -> list[str]:
  if not rows:
    return []
  lines = [
    "",
    "## Two processes at once (`--part=pinning`)",
    "",
    "Two processes train the same cell (DCIL at 90 %, 5 seeds, lr 0.1) side by side; wall ms per "
    "run-step after each one's first (compiling) epoch. Both processes' cells together advance "
    "2 / (ms per run-step) run-steps per ms.",
    "",
    "| Model | Placement | Run-steps timed (each) | Wall ms / run-step (process 1, 2) "
    "| Load avg start / end |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    ms = ", ".join(f"{m:.1f}" for m in r["ms_per_run_step"])
    lines.append(
      f"| {r['model']} | {r['placement']} | {r['run_steps']} | {ms} | "
      f"{r['load_start']:.1f} / {r['load_end']:.1f} |"
    )
  return lines


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  lines = [
    "# Sweep throughput on CPU: MNIST-1D CNN, per-run loop vs fast sweep engine",
    "",
    "- **Commands** (each part measured by one): "
    + "; ".join(f"`{c}`" for c in meta.get("commands", [meta["command"]])),
    f"- **Machine**: {meta['machine']}",
    f"- **Date**: {meta['date']}",
    "- **Shared machine**: 2 cores shared with other engineers' jobs (load average at the start "
    "and end of each measurement below); wall times are inflated by that load, CPU time (this "
    "process, all threads) much less. Runs per minute are given for both.",
    "",
    "- **Steps**: a run of the per-run path trains on all 4,000 train signals (930 steps); the "
    "fast path's on the 3,500 of the `fit` split (810 steps). **CPU ms / run-step** compares "
    "the two per step.",
    "",
    "| Path | Cell | Runs | Steps / run | Wall (s) | CPU (s) | Wall s / run | CPU s / run "
    "| CPU ms / run-step | Runs / min (wall) | Runs / min (CPU) | Load avg start / end |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['path']} | {r['cell']} | {r['runs']} | {r.get('steps', '?')} | {r['wall_s']:.0f} | "
      f"{r['cpu_s']:.0f} | {r['wall_s'] / r['runs']:.1f} | {r['cpu_s'] / r['runs']:.1f} | "
      f"{1000 * r['cpu_s'] / (r['runs'] * r.get('steps', float('nan'))):.1f} | "
      f"{60 * r['runs'] / r['wall_s']:.2f} | {60 * r['runs'] / r['cpu_s']:.2f} | "
      f"{r['load_start']:.1f} / {r['load_end']:.1f} |"
    )
  lines += pinning_report(meta.get("pinning", []))
  return "\n".join(lines) + "\n"


READING = "## Reading"


def kept_reading(path: str) -> str:
  """The hand-written reading at the end of the last report (from its ``## Reading`` heading):
  a rerun rewrites the tables, not the text written about them."""
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    text = f.read()
  at = text.find("\n" + READING)
  return text[at:] if at >= 0 else ""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--part", choices=("before", "after", "both", "pinning", "pinning_child"), default="both"
  )
  parser.add_argument("--pinning_model", default="resnet1d", choices=("cnn", "resnet1d"))
  parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's 30")
  parser.add_argument("--batching", default="host", choices=("host", "map", "vmap"))
  parser.add_argument("--after_from", default=None, help="a fast_sweep grid directory")
  parser.add_argument("--out", default=os.path.join(RESULTS, "sweep_throughput_cpu"))
  args = parser.parse_args()
  if args.part == "pinning_child":
    print(json.dumps(pinning_child(args.pinning_model)))
    return
  start = time.perf_counter()
  path = args.out + ".json"
  rows, commands, pinned = [], [], []
  if os.path.exists(path):  # parts measured at another time are kept
    with open(path) as f:
      old = json.load(f)
    rows, commands = old["rows"], old["meta"].get("commands", [old["meta"]["command"]])
    pinned = old["meta"].get("pinning", [])
  new = []
  if args.part in ("before", "both") and not args.after_from:
    new += before(args.epochs)
  if args.after_from:
    new += after_from_grid(args.after_from)
  elif args.part in ("after", "both"):
    new += after(args.epochs, args.batching)
  if args.part == "pinning":
    fresh = pinning(args.pinning_model)
    pinned = [r for r in pinned if r["model"] != args.pinning_model] + fresh
  keys = {(r["path"], r["cell"]) for r in new}
  rows = [r for r in rows if (r["path"], r["cell"]) not in keys] + new
  meta = {
    "command": "python -m benchmarks.sweep_throughput "
    + " ".join(f"--{k}={v}" for k, v in vars(args).items() if k != "out" and v is not None),
    "commands": [],
    "machine": {k: common.machine_info()[k] for k in ("cpu_model", "cpus_usable", "jax")},
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "benchmark_wall_s": time.perf_counter() - start,
    "pinning": pinned,
  }
  meta["commands"] = [c for c in commands if c != meta["command"]] + [meta["command"]]
  with open(path, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(report(rows, meta) + kept_reading(args.out + ".md"))


if __name__ == "__main__":
  main()
