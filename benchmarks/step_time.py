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
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import dcil_jax
from dcil_jax import models

SPARSITY = 0.9
UPDATE_EVERY = 16
PROBE_UPDATE_EVERY = 2
BATCH = 128
NUM_CLASSES = 10
MODELS = {
  "resnet20": (models.resnet20, (32, 32, 3)),
  "small_cnn": (models.SmallCNN, (8, 8, 1)),
  "resnet50": (models.resnet50, (224, 224, 3)),  # compile-only memory (--memory-models)
}
TARGETS = {
  "dcil_ratio": 2.1,
  "dpf_ratio": 1.1,
  "refresh_pct": 2.0,
  # issue 14: DCIL "sequential" against today's default DCIL step, and its memory against dense
  "sequential_vs_unrolled_kd": 1.2,
  "sequential_vs_unrolled_no_kd": 1.05,
  "sequential_memory_vs_dense": 1.1,
}
KD_OFF_STEP = 10**9  # kd_start_step that keeps distillation off for the whole benchmark
DEVICE_FLAG = "--xla_force_host_platform_device_count=2"
MAIN, TWO_DEV = "main", "2-dev"
# (method, strategy, distillation on): DCIL's kd_weight is traced (on from step 0, or off for the
# whole run), as in training, so "sequential" decides on its teacher forward under lax.cond.
MAIN_CONFIGS = (
  ("dense", None, True),
  ("dpf", None, True),
  ("dcil", "unrolled", True),
  ("dcil", "vmap", True),
  ("dcil", "sequential", True),
  ("dcil", "sequential", False),
)
WORKER_CONFIGS = (("dense", None, True), ("dcil", "unrolled", True), ("dcil", "sharded", True))
MEMORY_CONFIGS = (
  ("dense", None, True),
  ("dpf", None, True),
  ("dcil", "unrolled", True),
  ("dcil", "sequential", True),
  ("dcil", "sequential", False),
)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
MB = 2**20


def log(msg: str) -> None:
  """Progress on stderr (results go to files)."""
  print(f"[{time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


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


def make_problem(model_name: str, batch_size: int = BATCH) -> tuple[Any, Any, dict[str, jax.Array]]:
  """``(model, variables, batch)``: a random batch of ``batch_size`` images and integer labels."""
  model_fn, shape = MODELS[model_name]
  model = model_fn(num_classes=NUM_CLASSES)
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(batch_size, *shape)).astype(np.float32)),
    "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)),
  }
  variables = model.init(jax.random.PRNGKey(0), batch["image"][:1], train=False)
  return model, variables, batch


# --------------------------------------------------------------------------------------------
# Measurement helpers

_process_peak_kb = 0


def _vm_hwm_kb() -> int:
  """Peak resident set size (``VmHWM``) of this process in KiB; 0 if unavailable."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def reset_peak_rss() -> None:
  """Resets ``VmHWM`` to the current RSS (Linux ``clear_refs``); remembers the old peak."""
  global _process_peak_kb
  _process_peak_kb = max(_process_peak_kb, _vm_hwm_kb())
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def process_peak_rss_mb() -> float:
  """Peak RSS of the whole process so far, across resets."""
  return max(_process_peak_kb, _vm_hwm_kb()) / 1024


def cpu_snapshot() -> tuple[float, float, list[int]]:
  """(wall time, this process's CPU seconds, the ``cpu`` line of ``/proc/stat``)."""
  try:
    with open("/proc/stat") as f:
      stat = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    stat = []
  t = os.times()
  return time.perf_counter(), t.user + t.system, stat


def cpu_usage(start: tuple[float, float, list[int]]) -> dict[str, float | None]:
  """Average busy cores (whole machine and this process) and steal since ``start``."""
  wall0, proc0, stat0 = start
  wall1, proc1, stat1 = cpu_snapshot()
  wall = wall1 - wall0
  out: dict[str, float | None] = {"wall_s": wall, "process_cores": (proc1 - proc0) / wall}
  if stat0 and stat1:
    delta = [b - a for a, b in zip(stat0, stat1)]
    hz = os.sysconf("SC_CLK_TCK")
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
    steal = delta[7] if len(delta) > 7 else 0
    total = sum(delta[:8])
    out["machine_busy_cores"] = (total - idle - steal) / hz / wall
    out["steal_pct"] = 100 * steal / total if total else 0.0
  return out


def quantiles(times: list[float]) -> dict[str, float]:
  q25, med, q75 = np.percentile(np.asarray(times), [25, 50, 75])
  return {"median_s": float(med), "q25_s": float(q25), "q75_s": float(q75), "iqr_s": q75 - q25}


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?\S+ = (.*?)\b([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def collective_stats(text: str) -> dict[str, dict[str, float]]:
  """Collectives of an optimized HLO module: count and result megabytes per kind.

  Collectives with tuple results (``(f32[..], f32[..]) all-reduce(...)``, what XLA's
  combiners make) are counted too.
  """
  counts: Counter = Counter()
  megabytes: Counter = Counter()
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    kind = match.group(2).removesuffix("-start")
    if kind not in COLLECTIVES:
      continue
    counts[kind] += 1
    for dtype, dims in _ARRAY.findall(match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      megabytes[kind] += size * DTYPE_BYTES.get(dtype, 4) / MB
  return {"counts": dict(counts), "megabytes": dict(megabytes)}


def hlo_stats(text: str) -> dict[str, Any]:
  """Convolutions (and how many are grouped) and collectives in an optimized HLO module."""
  convs = re.findall(r"= \S+ convolution\(.*", text)
  grouped = [c for c in convs if "feature_group_count=" in c or "batch_group_count=" in c]
  collectives = collective_stats(text)["counts"]
  partitions = re.search(r"num_partitions=(\d+)", text)
  return {
    "convolutions": len(convs),
    "grouped_convolutions": len(grouped),
    "collectives": collectives,
    "num_partitions": int(partitions.group(1)) if partitions else 1,
  }


def cost_stats(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of the compiled step (per device for a partitioned module)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
  return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": cost.get("bytes accessed", 0.0)}


def memory_stats(compiled: Any) -> dict[str, int]:
  """``memory_analysis`` of the compiled step; ``total`` = temp + argument + output."""
  m = compiled.memory_analysis()
  out = {
    "temp_bytes": int(m.temp_size_in_bytes),
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
  }
  out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
  return out


def time_call(fn: Any, *args: Any, n: int) -> list[float]:
  """Wall times of ``n`` blocking calls of ``fn(*args)`` (after one untimed call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return times


def shardings(tree: Any) -> list[str]:
  return [str(getattr(x, "sharding", None)) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------------------------
# Timed items: a train-step config and the jitted mask refresh


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
    """Where the refresh time goes: with ``flip_rate``, the sort alone, a sort-free selection."""

    def with_flips(p, m):
      new = dcil_jax.magnitude_masks(p, m, SPARSITY, "global")
      return new, dcil_jax.flip_rate(m, new)

    flat = jnp.concatenate([jnp.square(p).reshape(-1) for p in prunable(self.params, self.masks)])
    num_pruned = int(round(SPARSITY * flat.size))
    select = jax.jit(lambda s: bisection_keep(s, num_pruned))
    reference = jnp.concatenate(
      [m.reshape(-1) for m in jax.tree.leaves(self.fn(self.params, self.masks))]
    )
    fns = {
      "magnitude_masks_s": (self.fn, (self.params, self.masks)),
      "with_flip_rate_s": (jax.jit(with_flips), (self.params, self.masks)),
      "argsort_only_s": (jax.jit(lambda s: jnp.argsort(s, stable=True)), (flat,)),
      "sort_free_s": (select, (flat,)),
    }
    out = {k: float(np.median(time_call(fn, *a, n=n))) for k, (fn, a) in fns.items()}
    out["sort_free_same_masks"] = bool(jnp.array_equal(select(flat), reference))
    return out


def prunable(params: Any, masks: Any) -> list[jax.Array]:
  """The prunable leaves of ``params`` in the order of ``jax.tree.leaves(masks)``."""
  return [
    p
    for m, p in zip(jax.tree.leaves(masks, is_leaf=lambda x: x is None), jax.tree.leaves(params))
    if m is not None
  ]


def bisection_keep(scores: jax.Array, num_pruned: int) -> jax.Array:
  """Keep-mask pruning the ``num_pruned`` smallest non-negative ``scores``, ties by lower index.

  The same masks as ``magnitude_masks``' stable sort, without sorting: non-negative float32
  values order like their int32 bit patterns, so 31 bisection steps find the threshold and a
  cumulative sum breaks ties. (A reference for the profiling notes, not used for training.)
  """
  bits = jax.lax.bitcast_convert_type(scores, jnp.int32)

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid) >= num_pruned
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  threshold, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(0x7F800000)))
  below, tied = bits < threshold, bits == threshold
  pruned = below | (tied & (jnp.cumsum(tied) <= num_pruned - jnp.sum(below)))
  return ~pruned if num_pruned > 0 else jnp.ones_like(pruned)


def config_label(method: str, strategy: str | None, kd: bool = True) -> str:
  """``"dense"``, ``"dcil/unrolled"``, ``"dcil/sequential (kd off)"``, ..."""
  label = method if strategy is None else f"{method}/{strategy}"
  return label if kd else f"{label} (kd off)"


def create_state(
  model_name: str,
  method: str,
  strategy: str | None,
  kd: bool = True,
  update_every: int = UPDATE_EVERY,
  batch_size: int = BATCH,
) -> tuple[dcil_jax.TrainState, dict[str, jax.Array]]:
  """The benchmark's train state for one config, and its batch."""
  model, variables, batch = make_problem(model_name, batch_size)
  tx = make_tx(update_every) if method != "dense" else make_tx(update_every, masked=False)
  extra = {} if kd or method != "dcil" else {"kd_start_step": KD_OFF_STEP}
  state = dcil_jax.TrainState.create(
    model,
    variables,
    tx,
    method=method,
    strategy=strategy,
    example_input=batch["image"][:1],
    **extra,
  )
  return state, batch


def prepare_config(
  model_name: str,
  method: str,
  strategy: str | None,
  args: argparse.Namespace,
  process: str,
  update_every: int = UPDATE_EVERY,
  kd: bool = True,
) -> Config:
  """Compiles and analyses one train step, then runs its warm-up steps.

  The number of timed steps is ``args.steps`` unless the last warm-up step predicts more than
  ``args.budget_s`` seconds; then it is ``max(args.min_steps, budget / step)``.
  """
  label = config_label(method, strategy, kd)
  if update_every != UPDATE_EVERY:
    label += f" (update_every={update_every})"
  log(f"{model_name} {label} [{process}]: compile + warm-up")
  gc.collect()
  reset_peak_rss()
  state, batch = create_state(model_name, method, strategy, kd, update_every)
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
    "kd": kd,
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
  record["peak_rss_mb"] = _vm_hwm_kb() / 1024
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
# Compile-only memory: step memory at a batch size, and the largest batch under a budget


def batch_shapes(model_name: str, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch for ``train_step.lower`` (compile-only: no images are allocated)."""
  shape = MODELS[model_name][1]
  return {
    "image": jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32),
    "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }


def step_memory(state: dcil_jax.TrainState, model_name: str, batch_size: int) -> dict[str, int]:
  """``memory_stats`` of ``train_step`` compiled for ``batch_size`` (never executed)."""
  compiled = dcil_jax.train_step.lower(state, batch_shapes(model_name, batch_size)).compile()
  return memory_stats(compiled)


def memory_at_batch(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Compile-only step memory of every ``MEMORY_CONFIGS`` entry at ``--memory-batch``."""
  records = []
  for model_name in args.memory_models:
    for method, strategy, kd in MEMORY_CONFIGS:
      label = config_label(method, strategy, kd)
      log(f"{model_name} {label}: compile-only memory at batch {args.memory_batch}")
      state, _ = create_state(model_name, method, strategy, kd, batch_size=1)
      t = time.perf_counter()
      memory = step_memory(state, model_name, args.memory_batch)
      records.append(
        {
          "model": model_name,
          "label": label,
          "batch": args.memory_batch,
          "memory": memory,
          "compile_s": time.perf_counter() - t,
        }
      )
      del state
      gc.collect()
  for r in records:
    dense = next(d for d in records if d["model"] == r["model"] and d["label"] == "dense")
    r["total_vs_dense"] = r["memory"]["total_bytes"] / dense["memory"]["total_bytes"]
    r["temp_vs_dense"] = r["memory"]["temp_bytes"] / dense["memory"]["temp_bytes"]
  return records


def largest_batch(fits: Any, guess: int, step: int) -> tuple[int, list[int]]:
  """The largest multiple of ``step`` for which ``fits(batch)`` holds, searched from ``guess``
  (memory grows with the batch, so ``fits`` is monotone): a doubling bracket, then bisection.

  Returns:
    ``(batch, batches checked)``; batch 0 if even ``step`` does not fit.
  """
  checked = []

  def check(b):
    checked.append(b)
    return fits(b)

  lo = max(step, guess // step * step)
  if check(lo):
    hi = lo + step
    while check(hi):
      lo, hi = hi, hi + 2 * (hi - lo)
  else:
    hi = lo
    lo = max(step, (hi // 2) // step * step)
    while lo < hi and not check(lo):
      hi, lo = lo, max(step, (lo // 2) // step * step)
      if hi == step:
        return 0, checked
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    if check(mid):
      lo = mid
    else:
      hi = mid
  return lo, checked


def batch_fit(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Largest per-device batch whose compiled step memory (temp + argument + output) fits
  ``--fit-budget-gib``, for every ``MEMORY_CONFIGS`` entry: compile-only, never executed.

  Two compiles (batch 32 and 64) give a linear fit of memory against batch to start from;
  exact compiles then bracket and bisect to a multiple of ``--fit-step``.
  """
  budget = args.fit_budget_gib * 2**30
  records = []
  for model_name in args.fit_models:
    for method, strategy, kd in MEMORY_CONFIGS:
      label = config_label(method, strategy, kd)
      log(f"{model_name} {label}: largest batch under {args.fit_budget_gib} GiB")
      state, _ = create_state(model_name, method, strategy, kd, batch_size=1)
      t = time.perf_counter()
      cache: dict[int, int] = {}

      def total(b, state=state, model_name=model_name, cache=cache):
        if b not in cache:
          cache[b] = step_memory(state, model_name, b)["total_bytes"]
        return cache[b]

      per_image = (total(64) - total(32)) / 32
      guess = int((budget - total(32)) / per_image) + 32 if per_image > 0 else 32
      batch, checked = largest_batch(
        lambda b, total=total: total(b) <= budget, guess, args.fit_step
      )
      records.append(
        {
          "model": model_name,
          "label": label,
          "budget_gib": args.fit_budget_gib,
          "batch": batch,
          "memory_at_batch": cache.get(batch),
          "linear_guess": guess,
          "per_image_bytes": per_image,
          "compiles": len(cache),
          "checked": checked,
          "seconds": time.perf_counter() - t,
        }
      )
      log(f"  batch {batch} ({len(cache)} compiles)")
      del state
      gc.collect()
  return records


# --------------------------------------------------------------------------------------------
# Processes


def run_process(args: argparse.Namespace, process: str) -> dict[str, Any]:
  """Every model's configs (and refresh timer) of one process, each model interleaved."""
  configs = MAIN_CONFIGS if process == MAIN else WORKER_CONFIGS
  if args.only:
    configs = [c for c in configs if config_label(*c) in args.only]
  out: dict[str, Any] = {"records": [], "refresh": {}, "cpu_usage": {}}
  for model_name in args.models if configs else []:
    items = [prepare_config(model_name, m, s, args, process, kd=kd) for m, s, kd in configs]
    if process == MAIN and model_name in args.probe_models and not args.only:
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
    if args.only:
      cmd += ["--only", ",".join(args.only)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def git(*argv: str, cwd: Path) -> str:
  try:
    out = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=cwd)
  except OSError:
    return ""
  return out.stdout.strip() if out.returncode == 0 else ""


def library_info() -> dict[str, Any]:
  """Which ``dcil_jax`` this process imported: its folder, git commit and uncommitted edits."""
  path = Path(dcil_jax.__file__).resolve().parent
  dirty = git("status", "--porcelain", "--", ".", cwd=path)
  return {
    "path": str(path),
    "commit": git("rev-parse", "--short", "HEAD", cwd=path) or "unknown",
    "uncommitted": dirty.splitlines(),
  }


def machine_info() -> dict[str, Any]:
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  try:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    mem_gb = float("nan")
  return {
    "cpu_model": cpu,
    "cpu_count": os.cpu_count(),
    "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "memory_gb": mem_gb,
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
  }


# --------------------------------------------------------------------------------------------
# Analysis


def paired_median(num: list[float], den: list[float], scale: float = 1.0) -> float:
  """Median over rounds of ``scale * num[i] / den[i]`` (the first min(len) rounds)."""
  return float(np.median([scale * a / b for a, b in zip(num, den)]))


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
    if "previous_run" in r:  # paired with the dense steps of its own run
      continue
    dense = find(records, r["model"], "dense", r["process"])
    r["ratio_to_dense"] = paired_median(r["times_s"], dense["times_s"])
    r["ratio_of_medians"] = r["median_s"] / dense["median_s"]
    r["memory_vs_dense"] = r["memory"]["total_bytes"] / dense["memory"]["total_bytes"]
    unrolled = find(records, r["model"], "dcil/unrolled", r["process"])
    if r.get("strategy") == "sequential" and unrolled and "previous_run" not in unrolled:
      r["ratio_to_unrolled"] = paired_median(r["times_s"], unrolled["times_s"])


def analyse_refresh(result: dict[str, Any]) -> None:
  """Refresh / ``UPDATE_EVERY`` as a percentage of each DCIL step (paired per round)."""
  for key, ref in result["refresh"].items():
    model, process = key.split("/")
    ref["amortized_pct"] = {
      r["label"]: paired_median(ref["times_s"], r["times_s"], 100 / UPDATE_EVERY)
      for r in result["records"]
      if (r["model"], r["process"], r["method"]) == (model, process, "dcil")
      and r["update_every"] == UPDATE_EVERY
      and ("previous_run" in r) == ("previous_run" in ref)
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
  for r in result["records"]:
    if r.get("strategy") != "sequential" or "ratio_to_unrolled" not in r:
      continue
    key = "sequential_vs_unrolled_kd" if r.get("kd", True) else "sequential_vs_unrolled_no_kd"
    checks.append(
      {
        "target": f"{r['label']} <= {TARGETS[key]}x dcil/unrolled (KD on) step time",
        "model": r["model"],
        "process": r["process"],
        "value": r["ratio_to_unrolled"],
        "limit": TARGETS[key],
        "pass": r["ratio_to_unrolled"] <= TARGETS[key],
      }
    )
    limit = TARGETS["sequential_memory_vs_dense"]
    checks.append(
      {
        "target": f"{r['label']} step memory <= {limit}x dense",
        "model": r["model"],
        "process": r["process"],
        "value": r["memory_vs_dense"],
        "limit": limit,
        "pass": r["memory_vs_dense"] <= limit,
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


def profile_notes(result: dict[str, Any]) -> list[str]:
  """Findings from the compiled HLO, XLA's cost analysis and the microbenchmarks, in words."""
  notes = []
  records, conv = result["records"], result.get("conv")
  for r in records:
    if r["method"] == "dense" or r["update_every"] != UPDATE_EVERY:
      continue
    base = find(records, r["model"], "dense", r["process"])
    h = r["hlo"]
    flops_ratio = r["cost"]["flops"] / base["cost"]["flops"]
    bytes_ratio = r["cost"]["bytes_accessed"] / base["cost"]["bytes_accessed"]
    text = (
      f"**{r['model']} {r['label']}** [{r['process']}] ({r['ratio_to_dense']:.2f}x dense): "
      f"{h['convolutions']} convolutions in the compiled step ({h['grouped_convolutions']} "
      f"grouped; dense has {base['hlo']['convolutions']}); XLA cost analysis "
      f"{r['cost']['flops'] / 1e9:.2f} GFLOP{' per device' if h['num_partitions'] > 1 else ''}"
      f" = {flops_ratio:.2f}x dense, bytes accessed {bytes_ratio:.2f}x dense."
    )
    if r["method"] == "dpf":
      text += " DPF only adds elementwise masking of the kernels to the dense step."
    if r["strategy"] == "unrolled":
      text += (
        " Unrolled runs the plain model once per path with ordinary convolutions: twice the"
        " dense work, as the cost analysis shows."
      )
    if r["strategy"] == "vmap" and h["grouped_convolutions"]:
      text += (
        " `jax.vmap` over the path axis batches the kernels, and JAX lowers a convolution with"
        " a batched kernel to one grouped convolution (`feature_group_count=2`); XLA:CPU runs"
        " grouped convolutions far slower than ordinary ones"
      )
      if conv:
        text += f" (microbenchmark below: {conv['vmap_over_unrolled']:.1f}x for the same FLOPs)"
      text += "."
    if r["strategy"] == "sequential":
      text += (
        " Sequential runs the sparse path's forward and backward, then the dense path's (with"
        " distillation on, after one forward-only pass of the dense path for the teacher"
        " logits), so only one path's activations are alive."
      )
    if r["strategy"] == "sharded":
      ordinary = h["grouped_convolutions"] == 0 and h["num_partitions"] == 2
      coll = ", ".join(f"{k} x{v}" for k, v in sorted(h["collectives"].items())) or "none"
      text += (
        f" Each device runs ordinary (non-grouped) convolutions: **{'yes' if ordinary else 'no'}**"
        f" (num_partitions={h['num_partitions']}; {h['grouped_convolutions']} of "
        f"{h['convolutions']} per-device convolutions grouped; collectives: {coll})."
      )
      unrolled = find(records, r["model"], "dcil/unrolled", r["process"])
      if unrolled:
        share = r["cost"]["flops"] / unrolled["cost"]["flops"]
        verdict = (
          "the paths are split across the devices"
          if share < 0.6
          else "the devices do not split the paths: the vmapped (grouped) convolutions and"
          " their gradients run on all-gathered operands, replicated on both devices"
        )
        text += (
          f" Per-device FLOPs are {share:.2f}x those of the whole single-device DCIL step"
          f" (ideal: 0.50): {verdict}."
        )
    if r.get("resharded_by_first_step"):
      init = r["initial"]["hlo"]
      text += (
        " `TrainState.create` leaves the state on one device and the first step returns it"
        " sharded over the mesh, so the second call traces and compiles again"
        f" ({r['recompile_call_s']:.1f} s for that call); the numbers above are for the"
        " executable that runs from then on (the first one: "
        f"{init['grouped_convolutions']} of {init['convolutions']} convolutions grouped)."
      )
    notes.append(text)
  for key, ref in result["refresh"].items():
    p = ref["profile"]
    worst = max(ref["amortized_pct"].values(), default=0.0)
    vs_sort = p["magnitude_masks_s"] / p["argsort_only_s"]
    text = (
      f"**{key} refresh** ({ref['prunable_weights']:,} prunable weights; worst amortized "
      f"{worst:.2f}% of a DCIL step): `magnitude_masks` takes {p['magnitude_masks_s'] * 1e3:.1f}"
      f" ms, {vs_sort:.2f}x a stable `argsort` of the same concatenated scores "
      f"({p['argsort_only_s'] * 1e3:.1f} ms)"
      f"{': a sort dominates its cost (XLA:CPU sorts slowly)' if vs_sort > 0.8 else ''}. "
      "Reference exact sort-free selection (32-step bisection on the float bit patterns + a "
      f"cumsum for ties): {p['sort_free_s'] * 1e3:.1f} ms; its masks equal `magnitude_masks`': "
      f"{p['sort_free_same_masks']}."
    )
    notes.append(text)
  return notes


# --------------------------------------------------------------------------------------------
# Report


def sequential_section(result: dict[str, Any]) -> list[str]:
  """Issue 14: DCIL "sequential" against unrolled and dense, and the compile-only tables."""
  rows = [r for r in result["records"] if r.get("strategy") == "sequential"]
  lines = []
  if rows:
    lines += [
      "",
      "## DCIL `sequential`: time and memory",
      "",
      "*x unrolled* = median over rounds of (sequential step / `dcil/unrolled` step of the same "
      "round): `dcil/unrolled` with distillation on is today's default DCIL step (its cost does "
      "not depend on the distillation weight). Memory as in the step-time table.",
      "",
      "| model | process | config | median ms | x unrolled | x dense | step memory MB | "
      "memory x dense | temp memory x dense |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
      dense = find(result["records"], r["model"], "dense", r["process"])
      temp = r["memory"]["temp_bytes"] / dense["memory"]["temp_bytes"]
      lines.append(
        f"| {r['model']} | {r['process']} | {r['label']} | {fmt_ms(r['median_s'])} | "
        f"**{r.get('ratio_to_unrolled', float('nan')):.2f}** | {r['ratio_to_dense']:.2f} | "
        f"{r['memory']['total_bytes'] / MB:.0f} | **{r['memory_vs_dense']:.2f}** | {temp:.2f} |"
      )
  at_batch = result.get("memory_at_batch") or []
  if at_batch:
    lines += [
      "",
      "### Compile-only step memory",
      "",
      "`train_step.lower(state, abstract batch).compile().memory_analysis()`; nothing is run.",
      "",
      "| model | batch | config | step memory MB (temp / arg / out) | x dense | temp x dense |",
      "|---|---:|---|---|---:|---:|",
    ]
    for r in at_batch:
      m = r["memory"]
      lines.append(
        f"| {r['model']} | {r['batch']} | {r['label']} | {m['total_bytes'] / MB:.0f} "
        f"({m['temp_bytes'] / MB:.0f} / {m['argument_bytes'] / MB:.0f} / "
        f"{m['output_bytes'] / MB:.0f}) | **{r['total_vs_dense']:.2f}** | "
        f"{r['temp_vs_dense']:.2f} |"
      )
  fit = result.get("batch_fit") or []
  if fit:
    budget = fit[0]["budget_gib"]
    lines += [
      "",
      f"### Largest per-device batch within {budget:g} GiB",
      "",
      f"The largest batch (a multiple of {result['args'].get('fit_step', 8)}) whose compiled "
      f"step memory (temp + argument + output, XLA:CPU's estimate) is at most {budget:g} GiB: "
      "compile-only, never executed. A linear fit of two compiles (batch 32 and 64) gives the "
      "starting guess; exact compiles bracket and bisect. An accelerator's compiler lays out "
      "memory differently, so read the ratios between the methods, not the absolute batch.",
      "",
      "| model | config | largest batch | x dense | memory at that batch MB | MB per image | "
      "compiles |",
      "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in fit:
      dense = next(d for d in fit if d["model"] == r["model"] and d["label"] == "dense")
      share = r["batch"] / dense["batch"] if dense["batch"] else float("nan")
      at = "-" if r["memory_at_batch"] is None else f"{r['memory_at_batch'] / MB:.0f}"
      lines.append(
        f"| {r['model']} | {r['label']} | **{r['batch']}** | {share:.2f} | {at} | "
        f"{r['per_image_bytes'] / MB:.2f} | {r['compiles']} |"
      )
  return lines


def fmt_ms(s: float | None) -> str:
  return "-" if s is None else f"{s * 1e3:.1f}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
  m, a, lib = result["machine"], result["args"], result["library"]["start"]
  lines = [
    "# `dcil_jax.train_step` step time on CPU",
    "",
    f"- **CPU**: {m['cpu_model']}, {m['cpu_count']} cores ({m['cpus_usable']} usable), "
    f"{m['memory_gb']:.0f} GiB RAM; {m['platform']}",
    f"- **Software**: Python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
    f"flax {m['flax']}, optax {m['optax']}; backend `{m['backend']}`",
    f"- **Date**: {m['date_utc']}; benchmark wall time {result['wall_s'] / 60:.1f} min",
    f"- **dcil_jax**: commit `{lib['commit']}`"
    f"{' with uncommitted changes' if lib['uncommitted'] else ''}, imported from `{lib['path']}`",
    f"- **Command**: `{result['command']}`",
    *[f"- **Note**: {n}" for n in result["notes"]],
    "",
    "## Setup",
    "",
    f"Random batch of {BATCH} (ResNet-20: 32x32x3, SmallCNN: 8x8x1; {NUM_CLASSES} classes). "
    "Optimizer `optax.chain(add_decayed_weights(1e-4), sgd(0.1, momentum=0.9, nesterov=True), "
    f"dcil_jax.masked_update(constant_sparsity({SPARSITY}), update_every={UPDATE_EVERY}))`, "
    "state from `dcil_jax.TrainState.create`, step `dcil_jax.train_step` (jitted, state "
    "donated), `jax.block_until_ready` after every step.",
    "",
    f"- Timing: {a['warmup']} warm-up steps (the first one re-traces; excluded), then "
    f"{a['steps']} timed steps, round-robin over the configs of one model and process (with "
    "the jitted refresh as one more item), so drift and background load hit all of them alike. "
    "Median and IQR (q75 - q25) of each config's steps. Configs whose last warm-up step "
    f"predicts more than {a['budget_s']:.0f} s of timing get fewer steps (at least "
    f"{a['min_steps']}; marked *).",
    "- **x dense** = median over rounds of (config step / dense step of the same round and "
    "process); the ratio of the two medians is shown next to it. Process "
    f"`{MAIN}`: this script, 1 CPU device. Process `{TWO_DEV}`: a subprocess started with "
    f"`XLA_FLAGS={DEVICE_FLAG}` (2 CPU devices on the same 2 cores) that times its own dense "
    "baseline: **every ratio compares numbers from the same process.**",
    "- Compile: `train_step.lower(...)` (*lower*: trace + lower) and `.compile()`; the first "
    "real call reuses the executable but traces again (*first call*, includes one step).",
    "- Step memory: `compile().memory_analysis()` temp + argument + output (the donated state is "
    "in both argument and output); per device for the 2-device program. Peak RSS: `VmHWM` while "
    "that config compiled and warmed up (reset before each config via `/proc/self/clear_refs`; "
    "includes the process baseline and the configs prepared before it).",
    "",
    "## Step time",
    "",
    "| model | process | config | steps | median ms | IQR ms | x dense | x dense (medians) | "
    "lower s | compile s | first call s | step memory MB (temp / arg / out) | peak RSS MB | "
    "convs (grouped) |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
  ]
  for r in result["records"]:
    mem = r["memory"]
    lines.append(
      f"| {r['model']} | {r['process']} | {r['label']}{' †' if 'previous_run' in r else ''} | "
      f"{r['steps']}{'*' if r['capped'] else ''} "
      f"| {fmt_ms(r['median_s'])} | {fmt_ms(r['iqr_s'])} | **{r['ratio_to_dense']:.2f}** | "
      f"{r['ratio_of_medians']:.2f} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
      f"{r['first_call_s']:.1f} | {mem['total_bytes'] / MB:.0f} ({mem['temp_bytes'] / MB:.0f} / "
      f"{mem['argument_bytes'] / MB:.1f} / {mem['output_bytes'] / MB:.1f}) | "
      f"{r['peak_rss_mb']:.0f} | {r['hlo']['convolutions']} ({r['hlo']['grouped_convolutions']}) |"
    )
  peaks = ", ".join(f"`{k}` {v:.0f} MB" for k, v in result["process_peak_rss_mb"].items())
  usage = "; ".join(
    f"{k}: machine {u.get('machine_busy_cores', float('nan')):.2f} busy cores, this process "
    f"{u['process_cores']:.2f}, steal {u.get('steal_pct', float('nan')):.1f}%"
    for k, u in result["cpu_usage"].items()
  )
  lines += [
    "",
    f"Whole-process peak RSS: {peaks}. CPU use while timing: {usage}.",
    "",
    "## Targets (CPU)",
    "",
    "| target | model | process | measured | limit | result |",
    "|---|---|---|---:|---:|---|",
  ]
  for c in result["targets"]:
    unit = "%" if "refresh" in c["target"] else "x"
    lines.append(
      f"| {c['target']} | {c['model']} | {c['process']} | {c['value']:.2f}{unit} | "
      f"{c['limit']}{unit} | {'PASS' if c['pass'] else '**FAIL**'} |"
    )
  lines += [
    "",
    "## Mask refresh",
    "",
    "Direct cost: a jitted `dcil_jax.magnitude_masks(params, masks, 0.9, 'global')` on the "
    "plain model's params, timed in the same rounds as the steps. Amortized = median over "
    f"rounds of (refresh / {UPDATE_EVERY}) / (DCIL step of the same round), in percent. The "
    "transform's refresh branch also computes `flip_rate` (column *+ flip_rate*).",
    "",
    "| model / process | prunable weights | magnitude_masks ms | + flip_rate ms | "
    "amortized % of DCIL step |",
    "|---|---:|---:|---:|---|",
  ]
  for key, ref in result["refresh"].items():
    pct = ", ".join(f"{k}: {v:.2f}%" for k, v in ref["amortized_pct"].items())
    lines.append(
      f"| {key} | {ref['prunable_weights']:,} | {fmt_ms(ref['median_s'])} | "
      f"{fmt_ms(ref['profile']['with_flip_rate_s'])} | {pct} |"
    )
  lines += [
    "",
    "In-step check: timed steps whose update refreshed the masks (`metrics['mask_refreshed']`) "
    "vs the others. With update_every=16 a run of 20 steps holds one refresh step (or none), so "
    f"the *update_every={PROBE_UPDATE_EVERY}* rows rerun DCIL (default strategy) with refresh "
    "and plain steps alternating. *Local* = median over refresh steps of (step - mean of its "
    "non-refresh neighbours), robust to drift; compare it with the jitted refresh + flip_rate. "
    "A single refresh step's difference is within the step-to-step noise (see IQR).",
    "",
    "| model | process | config | refresh steps | median ms | other steps | median ms | "
    "local difference ms | jitted refresh + flip_rate ms |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in result["records"]:
    if r["method"] == "dense":
      continue
    s = r["refresh_split"]
    ref = result["refresh"][f"{r['model']}/{r['process']}"]
    local = s["local_diff_s"]
    lines.append(
      f"| {r['model']} | {r['process']} | {r['label']} | {s['n_refresh']} | "
      f"{fmt_ms(s['median_refresh_s'])} | {s['n_other']} | {fmt_ms(s['median_other_s'])} | "
      f"{'-' if local is None else f'{local * 1e3:+.1f}'} | "
      f"{fmt_ms(ref['profile']['with_flip_rate_s'])} |"
    )
  lines += sequential_section(result)
  lines += ["", "## Profiling", ""]
  lines += [f"- {n}" for n in result["profile_notes"]]
  conv = result.get("conv")
  if conv:
    lines += [
      "",
      f"Conv microbenchmark ({conv['shape']}, both paths, interleaved): unrolled "
      f"{conv['unrolled']['median_s'] * 1e3:.1f} ms "
      f"({conv['unrolled']['hlo']['grouped_convolutions']} grouped convolutions), vmap "
      f"{conv['vmap']['median_s'] * 1e3:.1f} ms ({conv['vmap']['hlo']['grouped_convolutions']} "
      f"grouped convolutions): {conv['vmap_over_unrolled']:.1f}x.",
    ]
  path.write_text("\n".join(lines) + "\n")


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
    "--only",
    default="",
    help="comma-separated config labels to time (e.g. 'dense,dcil/unrolled,dcil/sequential,"
    "dcil/sequential (kd off)'); also skips the conv microbenchmark and the probe rows",
  )
  p.add_argument(
    "--merge",
    action="store_true",
    help="keep the rows of <out>/step_time_cpu.json that this run does not measure (marked as "
    "from a previous run, with their own ratios)",
  )
  p.add_argument(
    "--memory-models", default="", help="models for compile-only step memory at --memory-batch"
  )
  p.add_argument("--memory-batch", type=int, default=32, help="batch of --memory-models")
  p.add_argument(
    "--fit-models", default="", help="models for the largest-batch-under-a-budget table"
  )
  p.add_argument("--fit-budget-gib", type=float, default=16.0, help="memory budget per device")
  p.add_argument("--fit-step", type=int, default=8, help="batch granularity of the fit")
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
  args.only = [c.strip() for c in args.only.split(",") if c.strip()]
  args.memory_models = [m.strip() for m in args.memory_models.split(",") if m.strip()]
  args.fit_models = [m.strip() for m in args.fit_models.split(",") if m.strip()]
  known = {config_label(*c) for c in (*MAIN_CONFIGS, *WORKER_CONFIGS)}
  if set(args.only) - known:
    p.error(f"unknown configs {sorted(set(args.only) - known)}; choose from {sorted(known)}")
  names = args.models + args.probe_models + args.memory_models + args.fit_models
  unknown = sorted(set(names) - set(MODELS))
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
  conv = None if args.only else bench_conv(args)
  records, refresh, usage = main_out["records"], main_out["refresh"], main_out["cpu_usage"]
  peaks = {MAIN: main_out["peak_rss_mb"]}
  worker_info = None
  worker_labels = {config_label(*c) for c in WORKER_CONFIGS} - {"dense"}
  if not args.no_sharded and (not args.only or worker_labels & set(args.only)):
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
  result["memory_at_batch"] = memory_at_batch(args)
  result["batch_fit"] = batch_fit(args)
  result["wall_s"] = time.perf_counter() - start
  if args.merge:
    merge_previous(result, out / "step_time_cpu.json")
  finish(result, out)


def merge_previous(result: dict[str, Any], path: Path) -> None:
  """Adds the rows of the previous results file that this run did not measure."""
  previous = json.loads(path.read_text())
  stamp = {
    "date_utc": previous["machine"]["date_utc"],
    "commit": previous["library"]["start"]["commit"],
  }
  measured = {(r["model"], r["process"], r["label"]) for r in result["records"]}
  kept = []
  for r in previous["records"]:
    if (r["model"], r["process"], r["label"]) not in measured:
      kept.append(r | {"previous_run": r.get("previous_run", stamp)})
  result["records"] += kept
  for key, ref in previous["refresh"].items():
    result["refresh"].setdefault(key, ref | {"previous_run": ref.get("previous_run", stamp)})
  for key in ("conv", "worker"):
    if result.get(key) is None and previous.get(key) is not None:
      result[key] = previous[key]
  for key, value in previous.get("cpu_usage", {}).items():
    result["cpu_usage"].setdefault(key, value)
  for key, value in previous.get("process_peak_rss_mb", {}).items():
    result["process_peak_rss_mb"].setdefault(key, value)
  for key in ("memory_at_batch", "batch_fit"):
    if not result.get(key) and previous.get(key):
      result[key] = previous[key]
  labels = sorted({f"{m}/{p}: {lab}" for m, p, lab in measured})
  result["notes"].append(
    f"Rows measured in this run: {', '.join(labels) or 'none'}. The other rows are kept from "
    f"the previous run ({stamp['date_utc']}, commit `{stamp['commit']}`; marked †), with the "
    "ratios of that run."
  )


def finish(result: dict[str, Any], out: Path) -> None:
  """Analysis of the raw measurements, then the JSON and markdown files."""
  add_ratios(result["records"])
  analyse_refresh(result)
  result["targets"] = evaluate(result)
  result["profile_notes"] = profile_notes(result)
  out.mkdir(parents=True, exist_ok=True)
  (out / "step_time_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
  write_markdown(result, out / "step_time_cpu.md")
  log(f"wrote {out / 'step_time_cpu.md'} and .json")
  for c in result["targets"]:
    log(f"{'PASS' if c['pass'] else 'FAIL'} {c['model']} {c['target']}: {c['value']:.2f}")


if __name__ == "__main__":
  main()
