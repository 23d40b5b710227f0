"""Step time of the jitted ``dcil_jax.train_step`` on CPU: dense vs DPF vs DCIL.

Run ``python -m benchmarks.step_time`` (or ``python benchmarks/step_time.py``); see ``--help``.

The main process (one CPU device) times dense, DPF, DCIL ``unrolled`` and DCIL ``vmap`` and the
mask refresh. DCIL ``sharded`` needs two devices, so it runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``; that process times its own dense
baseline (and DCIL ``unrolled``), and every ratio divides by the dense time of the same process.
Timed steps run round-robin over the configs of one model, and ratios are medians of per-round
ratios, so slow drift of the machine's speed cancels. Results go to ``<out>/step_time_cpu.json``
and ``<out>/step_time_cpu.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dcil_jax
from benchmarks.common import (
  cost_stats,
  cpu_snapshot,
  cpu_usage,
  git,
  hlo_stats,
  log,
  machine_info,
  memory_stats,
  paired_median,
  process_peak_rss_mb,
  quantiles,
  reset_peak_rss,
  shardings,
  time_call,
  vm_hwm_kb,
)
from dcil_jax import models

SPARSITY = 0.9
UPDATE_EVERY = 16
PROBE_UPDATE_EVERY = 2
BATCH = 128
NUM_CLASSES = 10
MODELS = {"resnet20": (models.resnet20, (32, 32, 3)), "small_cnn": (models.SmallCNN, (8, 8, 1))}
TARGETS = {"dcil_ratio": 2.1, "dpf_ratio": 1.1, "refresh_pct": 2.0}
DEVICE_FLAG = "--xla_force_host_platform_device_count=2"
MAIN, TWO_DEV = "main", "2-dev"
MAIN_CONFIGS = (("dense", None), ("dpf", None), ("dcil", "unrolled"), ("dcil", "vmap"))
WORKER_CONFIGS = (("dense", None), ("dcil", "unrolled"), ("dcil", "sharded"))


# --------------------------------------------------------------------------------------------
# Problem setup


def CONV_KERNELS(path: Any, leaf: Any) -> bool:  # noqa: N802  (a rule, used like a constant)
  """The benchmark models' convolution kernels (4-D; their Dense heads are 2-D)."""
  return dcil_jax.rules.all_kernels(path, leaf) and leaf.ndim == 4


def make_tx(update_every: int = UPDATE_EVERY, masked: bool = True) -> optax.GradientTransformation:
  """The benchmark's optimizer: decoupled L2, Nesterov SGD, then the mask transform (for
  DCIL/DPF; ``TrainState`` finds the convolutions from the example input)."""
  parts = [optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True)]
  if masked:
    mask = dcil_jax.masked_update(dcil_jax.constant_sparsity(SPARSITY), update_every=update_every)
    parts.append(mask)
  return optax.chain(*parts)


def make_problem(model_name: str) -> tuple[Any, Any, dict[str, jax.Array]]:
  """``(model, variables, batch)``: a random batch of ``BATCH`` images and integer labels."""
  model_fn, shape = MODELS[model_name]
  model = model_fn(num_classes=NUM_CLASSES)
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(BATCH, *shape)).astype(np.float32)),
    "label": jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)),
  }
  variables = model.init(jax.random.PRNGKey(0), batch["image"][:1], train=False)
  return model, variables, batch


# --------------------------------------------------------------------------------------------
# Measurement helpers


class Config:
  """One compiled and warmed-up (model, method, strategy) train step, ready to time."""

  def __init__(self, state: dcil_jax.TrainState, batch: dict[str, jax.Array], record: dict):
    self.state, self.batch, self.record = state, batch, record
    self.times: list[float] = []
    self.refreshed: list[bool] = []

  def step(self) -> tuple[float, bool]:
    """One blocking ``dcil_jax.train_step``; returns its wall time and ``mask_refreshed``."""
    t = time.perf_counter()
    self.state, metrics = dcil_jax.train_step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    dt = time.perf_counter() - t
    return dt, bool(metrics.get("mask_refreshed", False))


class RefreshTimer(Config):
  """A jitted ``magnitude_masks(params, masks, 0.9, "global")`` on the plain model's params."""

  def __init__(self, model_name: str, process: str, steps: int):
    _, variables, _ = make_problem(model_name)
    self.params = variables["params"]
    self.masks = dcil_jax.masks_like(self.params, CONV_KERNELS)
    self.fn = jax.jit(lambda p, m: dcil_jax.magnitude_masks(p, m, SPARSITY, "global"))
    jax.block_until_ready(self.fn(self.params, self.masks))
    record = {"model": model_name, "process": process, "label": "refresh", "steps": steps}
    record["prunable_weights"] = int(sum(m.size for m in jax.tree.leaves(self.masks)))
    super().__init__(None, None, record)

  def step(self) -> tuple[float, bool]:
    t = time.perf_counter()
    jax.block_until_ready(self.fn(self.params, self.masks))
    return time.perf_counter() - t, False

  def profile(self, n: int) -> dict[str, Any]:
    """Where the refresh time goes: with ``flip_rate``, and a sort of the same scores."""

    def with_flips(p, m):
      new = dcil_jax.magnitude_masks(p, m, SPARSITY, "global")
      return new, dcil_jax.flip_rate(m, new)

    flat = jnp.concatenate([jnp.square(p).reshape(-1) for p in prunable(self.params, self.masks)])
    fns = {
      "magnitude_masks_s": (self.fn, (self.params, self.masks)),
      "with_flip_rate_s": (jax.jit(with_flips), (self.params, self.masks)),
      "argsort_only_s": (jax.jit(lambda s: jnp.argsort(s, stable=True)), (flat,)),
    }
    return {k: float(np.median(time_call(fn, *a, n=n))) for k, (fn, a) in fns.items()}


def prunable(params: Any, masks: Any) -> list[jax.Array]:
  """The prunable leaves of ``params`` in the order of ``jax.tree.leaves(masks)``."""
  return [
    p
    for m, p in zip(jax.tree.leaves(masks, is_leaf=lambda x: x is None), jax.tree.leaves(params))
    if m is not None
  ]


def prepare_config(
  model_name: str,
  method: str,
  strategy: str | None,
  args: argparse.Namespace,
  process: str,
  update_every: int = UPDATE_EVERY,
) -> Config:
  """Compiles and analyses one train step, then runs its warm-up steps.

  The number of timed steps is ``args.steps`` unless the last warm-up step predicts more than
  ``args.budget_s`` seconds; then it is ``max(args.min_steps, budget / step)``.
  """
  label = method if strategy is None else f"{method}/{strategy}"
  if update_every != UPDATE_EVERY:
    label += f" (update_every={update_every})"
  log(f"{model_name} {label} [{process}]: compile + warm-up")
  gc.collect()
  reset_peak_rss()
  model, variables, batch = make_problem(model_name)
  tx = make_tx(update_every) if method != "dense" else make_tx(update_every, masked=False)
  state = dcil_jax.TrainState.create(
    model, variables, tx, method=method, strategy=strategy, example_input=batch["image"][:1]
  )
  t0 = time.perf_counter()
  lowered = dcil_jax.train_step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  record: dict[str, Any] = {
    "model": model_name,
    "process": process,
    "method": method,
    "strategy": getattr(state.method, "strategy", None),
    "label": label,
    "update_every": update_every,
    "devices": jax.device_count(),
    "lower_s": t1 - t0,
    "compile_s": t2 - t1,
    "memory": memory_stats(compiled),
    "cost": cost_stats(compiled),
    "hlo": hlo_stats(compiled.as_text()),
  }
  del lowered, compiled
  config = Config(state, batch, record)
  before = shardings(state)
  warmup = [config.step()[0]]
  # A state whose shardings the first step changes makes the second call compile again: time
  # that call separately, analyse the executable that then runs, and warm up once more.
  record["resharded_by_first_step"] = shardings(config.state) != before
  if record["resharded_by_first_step"]:
    record["recompile_call_s"] = config.step()[0]
    steady = dcil_jax.train_step.lower(config.state, batch).compile()
    record["initial"] = {k: record[k] for k in ("memory", "cost", "hlo")}
    record |= {"memory": memory_stats(steady), "cost": cost_stats(steady)}
    record["hlo"] = hlo_stats(steady.as_text())
    del steady
  warmup += [config.step()[0] for _ in range(args.warmup - 1)]
  estimate = warmup[-1] if len(warmup) > 1 else warmup[0] / 2
  n = args.steps
  if args.budget_s > 0 and estimate * n > args.budget_s:
    n = max(args.min_steps, int(args.budget_s // estimate))
  record |= {"first_call_s": warmup[0], "warmup_s": warmup, "steps": n, "capped": n < args.steps}
  # Peak RSS of compiling and warming up this config (the process baseline included).
  record["peak_rss_mb"] = vm_hwm_kb() / 1024
  log(f"  compile {record['compile_s']:.1f} s, warm-up step {warmup[-1]:.3f} s, {n} timed steps")
  return config


def time_interleaved(items: list[Config]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Timed steps, round-robin over ``items`` so drift and noise hit every item alike.

  Returns the items' records (with ``times_s``) and the machine's CPU usage meanwhile.
  """
  rounds = max(c.record["steps"] for c in items)
  log(f"timing {len(items)} items interleaved, {rounds} rounds")
  start = cpu_snapshot()
  for i in range(rounds):
    for c in items:
      if i < c.record["steps"]:
        dt, refreshed = c.step()
        c.times.append(dt)
        c.refreshed.append(refreshed)
  usage = cpu_usage(start)
  records = []
  for c in items:
    r = c.record | {"times_s": c.times, "mask_refreshed": c.refreshed} | quantiles(c.times)
    r["refresh_split"] = refresh_split(c.times, c.refreshed)
    log(f"  {r['model']} {r['label']}: median {r['median_s'] * 1e3:.1f} ms ({r['steps']} steps)")
    records.append(r)
    c.state = None
  return records, usage


def refresh_split(times: list[float], refreshed: list[bool]) -> dict[str, Any]:
  """Steps whose update refreshed the masks vs the others.

  ``local_diff_s``: median over refresh steps of (its time - the mean of its non-refresh
  neighbours in the same run), which is robust to slow drift.
  """
  on = [t for t, r in zip(times, refreshed) if r]
  off = [t for t, r in zip(times, refreshed) if not r]
  local = []
  for i, r in enumerate(refreshed):
    near = [times[j] for j in (i - 1, i + 1) if 0 <= j < len(times) and not refreshed[j]]
    if r and near:
      local.append(times[i] - float(np.mean(near)))
  return {
    "n_refresh": len(on),
    "median_refresh_s": float(np.median(on)) if on else None,
    "n_other": len(off),
    "median_other_s": float(np.median(off)) if off else None,
    "local_diff_s": float(np.median(local)) if local else None,
  }


# --------------------------------------------------------------------------------------------
# Convolution microbenchmark


def bench_conv(args: argparse.Namespace) -> dict[str, Any]:
  """Forward+backward of ResNet-20's 16->16 3x3 conv for two paths: unrolled vs ``jax.vmap``."""
  log("conv microbenchmark (two paths: unrolled vs vmap)")

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, BATCH, 32, 32, 16))
  w = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 16, 16))
  fns = {
    "unrolled": jax.jit(lambda x, w: [grad(x[i], w[i]) for i in range(2)]),
    "vmap": jax.jit(jax.vmap(grad)),
  }
  out: dict[str, Any] = {"shape": "x [2,128,32,32,16], w [2,3,3,16,16], fwd+bwd"}
  for name, fn in fns.items():
    out[name] = {"hlo": hlo_stats(fn.lower(x, w).compile().as_text()), "times_s": []}
  for _ in range(max(6, args.steps // 2)):  # interleaved, like the train steps
    for name, fn in fns.items():
      out[name]["times_s"] += time_call(fn, x, w, n=1)
  for name in fns:
    out[name]["median_s"] = float(np.median(out[name]["times_s"]))
  out["vmap_over_unrolled"] = out["vmap"]["median_s"] / out["unrolled"]["median_s"]
  return out


# --------------------------------------------------------------------------------------------
# Processes


def run_process(args: argparse.Namespace, process: str) -> dict[str, Any]:
  """Every model's configs (and refresh timer) of one process, each model interleaved."""
  configs = MAIN_CONFIGS if process == MAIN else WORKER_CONFIGS
  out: dict[str, Any] = {"records": [], "refresh": {}, "cpu_usage": {}}
  for model_name in args.models:
    items = [prepare_config(model_name, m, s, args, process) for m, s in configs]
    if process == MAIN and model_name in args.probe_models:
      items.append(
        prepare_config(model_name, "dcil", None, args, process, update_every=PROBE_UPDATE_EVERY)
      )
    timer = RefreshTimer(model_name, process, args.steps)
    records, usage = time_interleaved([*items, timer])
    out["records"] += records[:-1]
    refresh = records[-1]
    refresh["profile"] = timer.profile(n=max(10, args.steps // 2))
    out["refresh"][f"{model_name}/{process}"] = refresh
    out["cpu_usage"][f"{model_name}/{process}"] = usage
    del items, timer
  out["peak_rss_mb"] = process_peak_rss_mb()
  return out


def worker(args: argparse.Namespace) -> None:
  """The two-device subprocess."""
  log(f"worker: {jax.device_count()} devices, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  library = library_info()
  out = run_process(args, TWO_DEV)
  out["library"] = library
  out |= {"devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS")}
  Path(args.worker_out).write_text(json.dumps(out))


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
  """Starts :func:`worker` in a fresh interpreter with two host devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()
  # Import the same dcil_jax as this process (it may come from the working directory).
  root = str(Path(dcil_jax.__file__).resolve().parent.parent)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "worker.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-out", str(out)]
    cmd += ["--models", ",".join(args.models), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--budget-s", str(args.budget_s)]
    cmd += ["--min-steps", str(args.min_steps)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def library_info() -> dict[str, Any]:
  """Which ``dcil_jax`` this process imported: its folder, git commit and uncommitted edits."""
  path = Path(dcil_jax.__file__).resolve().parent
  dirty = git("status", "--porcelain", "--", ".", cwd=path)
  return {
    "path": str(path),
    "commit": git("rev-parse", "--short", "HEAD", cwd=path) or "unknown",
    "uncommitted": dirty.splitlines(),
  }


# --------------------------------------------------------------------------------------------
# Analysis


def find(records: list[dict[str, Any]], model: str, label: str, process: str | None = None):
  for r in records:
    if r["model"] == model and r["label"] == label and (process is None or r["process"] == process):
      return r
  return None


def add_ratios(records: list[dict[str, Any]]) -> None:
  """``ratio_to_dense``: median of per-round ratios to the dense step of the same process.

  Also ``ratio_of_medians`` (median over dense median). Both use the same model and process.
  """
  for r in records:
    dense = find(records, r["model"], "dense", r["process"])
    r["ratio_to_dense"] = paired_median(r["times_s"], dense["times_s"])
    r["ratio_of_medians"] = r["median_s"] / dense["median_s"]


def analyse_refresh(result: dict[str, Any]) -> None:
  """Refresh / ``UPDATE_EVERY`` as a percentage of each DCIL step (paired per round)."""
  for key, ref in result["refresh"].items():
    model, process = key.split("/")
    ref["amortized_pct"] = {
      r["label"]: paired_median(ref["times_s"], r["times_s"], 100 / UPDATE_EVERY)
      for r in result["records"]
      if (r["model"], r["process"], r["method"]) == (model, process, "dcil")
      and r["update_every"] == UPDATE_EVERY
    }


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
  """Pass/fail of every target."""
  checks = []
  for r in result["records"]:
    if r["update_every"] != UPDATE_EVERY or r["method"] == "dense":
      continue
    key = "dcil_ratio" if r["method"] == "dcil" else "dpf_ratio"
    checks.append(
      {
        "target": f"{r['label']} <= {TARGETS[key]}x dense",
        "model": r["model"],
        "process": r["process"],
        "value": r["ratio_to_dense"],
        "limit": TARGETS[key],
        "pass": r["ratio_to_dense"] <= TARGETS[key],
      }
    )
  for key, ref in result["refresh"].items():
    model, process = key.split("/")
    for label, pct in ref["amortized_pct"].items():
      checks.append(
        {
          "target": f"refresh/{UPDATE_EVERY} <= {TARGETS['refresh_pct']}% of {label} step",
          "model": model,
          "process": process,
          "value": pct,
          "limit": TARGETS["refresh_pct"],
          "pass": pct <= TARGETS["refresh_pct"],
        }
      )
  return checks


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=20, help="timed steps per config (default 20)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile (default 2)")
  p.add_argument(
    "--models", default="resnet20,small_cnn", help=f"comma-separated subset of {sorted(MODELS)}"
  )
  p.add_argument(
    "--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder"
  )
  p.add_argument(
    "--budget-s",
    type=float,
    default=40.0,
    help="timed seconds per config before slow configs get fewer steps (0: no cap; default 40)",
  )
  p.add_argument("--min-steps", type=int, default=5, help="fewest timed steps under the cap")
  p.add_argument(
    "--probe-models",
    default="small_cnn",
    help=f"models that also run DCIL with update_every={PROBE_UPDATE_EVERY} ('' for none)",
  )
  p.add_argument("--no-sharded", action="store_true", help="skip the 2-device subprocess")
  p.add_argument(
    "--render-only",
    action="store_true",
    help="rewrite the report from <out>/step_time_cpu.json without measuring",
  )
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  args.probe_models = [m.strip() for m in args.probe_models.split(",") if m.strip()]
  unknown = sorted(set(args.models + args.probe_models) - set(MODELS))
  if unknown:
    p.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
  if args.steps < 1 or args.min_steps < 1 or args.warmup < 1:
    p.error("--steps, --min-steps and --warmup must be positive")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return
  out = Path(args.out)
  if args.render_only:
    result = json.loads((out / "step_time_cpu.json").read_text())
    finish(result, out)
    return
  start = time.perf_counter()
  machine, library = machine_info(), library_info()
  notes = []
  if jax.device_count() != 1:
    notes.append(f"The main process saw {jax.device_count()} devices (XLA_FLAGS was set).")
  main_out = run_process(args, MAIN)
  conv = bench_conv(args)
  records, refresh, usage = main_out["records"], main_out["refresh"], main_out["cpu_usage"]
  peaks = {MAIN: main_out["peak_rss_mb"]}
  worker_info = None
  if not args.no_sharded:
    worker_info = run_worker(args)
    records += worker_info.pop("records")
    refresh |= worker_info.pop("refresh")
    usage |= worker_info.pop("cpu_usage")
    peaks[TWO_DEV] = worker_info["peak_rss_mb"]
  libraries = {
    "start": library,
    "worker": (worker_info or {}).get("library"),
    "end": library_info(),
  }
  if any(lib not in (None, library) for lib in libraries.values()):
    notes.append(
      "**dcil_jax changed during the run** (commit or uncommitted files differ between the main "
      f"process's start, the worker and the end): {json.dumps(libraries)}"
    )
  if library["uncommitted"]:
    notes.append(f"dcil_jax had uncommitted changes: {library['uncommitted']}")
  result: dict[str, Any] = {
    "machine": machine,
    "library": libraries,
    "args": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")},
    "command": " ".join([Path(sys.executable).name, *sys.argv]),
    "targets_spec": TARGETS,
    "records": records,
    "refresh": refresh,
    "conv": conv,
    "worker": worker_info,
    "cpu_usage": usage,
    "process_peak_rss_mb": peaks,
    "notes": notes,
  }
  result["wall_s"] = time.perf_counter() - start
  finish(result, out)


def finish(result: dict[str, Any], out: Path) -> None:
  """Analysis of the raw measurements, then the JSON and markdown files."""
  from benchmarks import step_time_report  # the prose, written from the result alone

  add_ratios(result["records"])
  analyse_refresh(result)
  result["targets"] = evaluate(result)
  result["profile_notes"] = step_time_report.profile_notes(result)
  out.mkdir(parents=True, exist_ok=True)
  (out / "step_time_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
  step_time_report.write_markdown(result, out / "step_time_cpu.md")
  log(f"wrote {out / 'step_time_cpu.md'} and .json")
  for c in result["targets"]:
    log(f"{'PASS' if c['pass'] else 'FAIL'} {c['model']} {c['target']}: {c['value']:.2f}")


if __name__ == "__main__":
  main()
