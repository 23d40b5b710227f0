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
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dcil_jax
import dcil_jax.pool_gradient
from benchmarks import step_time_report  # the prose, written from the result alone
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
  vm_rss_kb,
)
from benchmarks.step_time_report import (
  BATCH,
  DEVICE_FLAG,
  MAIN,
  NUM_CLASSES,
  PROBE_UPDATE_EVERY,
  SPARSITY,
  TWO_DEV,
  UPDATE_EVERY,
  find,
  row_model,
)
from dcil_jax import models

MODELS = {
  "resnet20": (models.resnet20, (32, 32, 3)),
  "small_cnn": (models.SmallCNN, (8, 8, 1)),
  "resnet50": (models.resnet50, (224, 224, 3)),  # memory tables; timed at --batch 32
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
# (method, strategy, distillation on): DCIL's kd_weight is traced (on from step 0, or off for the
# whole run), as in training, so "sequential" decides on its teacher forward under lax.cond.
MAIN_CONFIGS = (
  ("dense", None, True),
  ("dpf", None, True),
  ("dcil", "unrolled", True),
  ("dcil", "unrolled", False),
  ("dcil", "vmap", True),
  ("dcil", "sequential", True),
  ("dcil", "sequential", False),
)
WORKER_CONFIGS = (("dense", None, True), ("dcil", "unrolled", True), ("dcil", "sharded", True))
# Compile-only, so the loop form of "sequential" (what GPUs and TPUs run; XLA:CPU runs its
# gradient convolutions ~40x slower, see the conv microbenchmark) is measured here and not timed.
MEMORY_CONFIGS = (
  ("dense", None, True),
  ("dpf", None, True),
  ("dcil", "unrolled", True),
  ("dcil", "sequential", True),
  ("dcil", "sequential", False),
  ("dcil", "sequential_loop", True),
  ("dcil", "sequential_loop", False),
)


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
  state, batch = create_state(model_name, method, strategy, kd, update_every, args.batch)
  t0 = time.perf_counter()
  lowered = dcil_jax.train_step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  record: dict[str, Any] = {
    "model": model_name,
    "process": process,
    "batch": args.batch,
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
  """Forward+backward of ResNet-20's 16->16 3x3 conv for two paths: unrolled, ``jax.vmap``, and
  a loop over the paths (``lax.map``, the form of ``strategy="sequential_loop"``)."""
  log("conv microbenchmark (two paths: unrolled vs vmap vs loop)")

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
    "loop": jax.jit(lambda x, w: jax.lax.map(lambda xw: grad(*xw), (x, w))),
    # The forward alone: which of the two passes a loop body slows down.
    "unrolled_forward": jax.jit(lambda x, w: [conv(x[i], w[i]) for i in range(2)]),
    "loop_forward": jax.jit(lambda x, w: jax.lax.map(lambda xw: conv(*xw), (x, w))),
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
  out["loop_over_unrolled"] = out["loop"]["median_s"] / out["unrolled"]["median_s"]
  out["loop_forward_over_unrolled"] = (
    out["loop_forward"]["median_s"] / out["unrolled_forward"]["median_s"]
  )
  return out


def bench_pool(args: argparse.Namespace) -> dict[str, Any]:
  """Gradient of ResNet-50's stem max-pool (batch 32): JAX's (``select-and-scatter``, which
  XLA:CPU expands with operand-free index arrays) against ``dcil_jax.pool_gradient``'s, which
  the CPU form of ``sequential`` uses. Same values (checked here), so this is their cost."""
  log("max-pool gradient microbenchmark (JAX vs late index arrays)")

  def loss(x):
    pooled = flax.linen.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return jnp.sum(pooled**2)

  x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (32, 112, 112, 64)))  # ties at 0
  fns = {
    "jax": jax.jit(jax.grad(loss)),
    "late": jax.jit(jax.grad(dcil_jax.pool_gradient.late_pool_indices(loss))),
  }
  out: dict[str, Any] = {"shape": "x [32,112,112,64] after a ReLU, 3x3/2 pool, padding 1"}
  out["max_abs_diff"] = float(jnp.max(jnp.abs(fns["jax"](x) - fns["late"](x))))
  for name, fn in fns.items():
    memory = fn.lower(x).compile().memory_analysis()
    out[name] = {"temp_bytes": int(memory.temp_size_in_bytes), "times_s": []}
  for _ in range(max(6, args.steps // 2)):  # interleaved
    for name, fn in fns.items():
      out[name]["times_s"] += time_call(fn, x, n=1)
  for name in fns:
    out[name]["median_s"] = float(np.median(out[name]["times_s"]))
  out["late_over_jax"] = out["late"]["median_s"] / out["jax"]["median_s"]
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
      failed: dict[int, str] = {}

      def total(b, state=state, model_name=model_name, cache=cache, failed=failed):
        """Step bytes at batch ``b``; a compile that fails on this host (XLA:CPU's LLVM can run
        out of host memory at large batches) counts as not fitting and is recorded."""
        if b in failed:
          return float("inf")
        if b not in cache:
          try:
            cache[b] = step_memory(state, model_name, b)["total_bytes"]
          except (RuntimeError, MemoryError) as e:  # XlaRuntimeError is a RuntimeError
            failed[b] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"  batch {b}: the compile failed ({failed[b]}); counted as not fitting")
            gc.collect()
            return float("inf")
        return cache[b]

      low, high = total(32), total(64)
      finite = math.isfinite(low) and math.isfinite(high)
      per_image = (high - low) / 32 if finite else float("nan")
      guess = int((budget - low) / per_image) + 32 if per_image > 0 else 32
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
          "failed_compiles": failed,
          "checked": checked,
          "seconds": time.perf_counter() - t,
        }
      )
      log(f"  batch {batch} ({len(cache)} compiles)")
      del state
      gc.collect()
  return records


# --------------------------------------------------------------------------------------------
# Step memory by RSS: one fresh process per configuration

RSS_CONFIGS = (
  ("dense", None, True),
  ("dpf", None, True),
  ("dcil", "unrolled", True),
  ("dcil", "sequential", True),
  ("dcil", "sequential", False),
)
RSS_STEPS = 3


def rss_child(args: argparse.Namespace) -> None:
  """In a fresh process: compile one config, run a warm-up step, then the peak RSS over
  ``RSS_STEPS`` steps above the RSS before them (state, batch, executable: already resident).
  Prints one JSON line."""
  method, strategy, kd = next(c for c in RSS_CONFIGS if config_label(*c) == args.rss_config)
  state, batch = create_state(args.rss_model, method, strategy, kd, batch_size=args.rss_batch)
  step = dcil_jax.train_step.lower(state, batch).compile()
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  gc.collect()
  reset_peak_rss()
  before = vm_rss_kb()
  for _ in range(RSS_STEPS):
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  peak = vm_hwm_kb()
  print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024}))


def rss_per_config(args: argparse.Namespace) -> list[dict[str, Any]]:
  """:func:`rss_child` for every ``RSS_CONFIGS`` entry of every ``--rss-models`` model: the
  step's memory as the operating system sees it, each config alone in its process."""
  records = []
  for model_name in args.rss_models:
    for config in RSS_CONFIGS:
      label = config_label(*config)
      log(f"{model_name} {label}: step RSS in a fresh process")
      cmd = [sys.executable, "-m", "benchmarks.step_time", "--rss-child"]
      cmd += ["--rss-model", model_name, "--rss-config", label, f"--rss-batch={args.rss_batch}"]
      root = str(Path(__file__).resolve().parent.parent)
      out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
      r = json.loads(out.strip().splitlines()[-1])
      records.append(
        {"model": model_name, "label": label, "steps": RSS_STEPS, "batch": args.rss_batch, **r}
      )
  for r in records:
    dense = next(d for d in records if d["model"] == r["model"] and d["label"] == "dense")
    r["step_mb"] = r["peak_mb"] - r["before_mb"]
    r["step_vs_dense"] = r["step_mb"] / dense["step_mb"] if dense["step_mb"] > 0 else None
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
    cmd += ["--min-steps", str(args.min_steps), "--batch", str(args.batch)]
    if args.only:
      cmd += ["--only", ",".join(args.only)]
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
    # Today's default DCIL step with distillation as in this row (issue 14's two targets);
    # the KD-on row where a run has no KD-off one.
    same_kd = config_label("dcil", "unrolled", r.get("kd", True))
    unrolled = find(records, r["model"], same_kd, r["process"]) or find(
      records, r["model"], "dcil/unrolled", r["process"]
    )
    if r.get("strategy") == "sequential" and unrolled and "previous_run" not in unrolled:
      r["ratio_to_unrolled"] = paired_median(r["times_s"], unrolled["times_s"])
      r["unrolled_reference"] = unrolled["label"]


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
        "model": row_model(r),
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
        "target": f"{r['label']} <= {TARGETS[key]}x "
        f"{r.get('unrolled_reference', 'dcil/unrolled')} step time",
        "model": row_model(r),
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
        "model": row_model(r),
        "process": r["process"],
        "value": r["memory_vs_dense"],
        "limit": limit,
        "pass": r["memory_vs_dense"] <= limit,
      }
    )
  for r in result.get("memory_at_batch") or []:
    if r["label"].startswith("dcil/sequential"):
      limit = TARGETS["sequential_memory_vs_dense"]
      checks.append(
        {
          "target": f"{r['label']} compile-only step memory at batch {r['batch']} <= {limit}x "
          "dense",
          "model": r["model"],
          "process": MAIN,
          "value": r["total_vs_dense"],
          "limit": limit,
          "pass": r["total_vs_dense"] <= limit,
        }
      )
  for r in result.get("rss_per_config") or []:
    if r["label"].startswith("dcil/sequential") and r["step_vs_dense"] is not None:
      limit = TARGETS["sequential_memory_vs_dense"]
      checks.append(
        {
          "target": f"{r['label']} step RSS (fresh process) <= {limit}x dense",
          "model": r["model"],
          "process": "fresh",
          "value": r["step_vs_dense"],
          "limit": limit,
          "pass": r["step_vs_dense"] <= limit,
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
    "--batch", type=int, default=BATCH, help=f"batch of the timed steps (default {BATCH})"
  )
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
    "--rss-models",
    default="",
    help="models whose step memory is also measured as RSS, each config in a fresh process",
  )
  p.add_argument(
    "--rss-only",
    action="store_true",
    help="measure only --rss-models, into <out>/step_time_cpu.json",
  )
  p.add_argument("--rss-batch", type=int, default=BATCH, help="batch of --rss-models")
  p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--rss-model", help=argparse.SUPPRESS)
  p.add_argument("--rss-config", help=argparse.SUPPRESS)
  p.add_argument(
    "--conv-only",
    action="store_true",
    help="rerun only the microbenchmarks (conv, max-pool gradient), into <out>/step_time_cpu.json",
  )
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
  args.rss_models = [m.strip() for m in args.rss_models.split(",") if m.strip()]
  known = {config_label(*c) for c in (*MAIN_CONFIGS, *WORKER_CONFIGS)}
  if set(args.only) - known:
    p.error(f"unknown configs {sorted(set(args.only) - known)}; choose from {sorted(known)}")
  names = args.models + args.probe_models + args.memory_models + args.fit_models + args.rss_models
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
  if args.rss_child:
    rss_child(args)
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
  if args.conv_only or args.rss_only:  # one part alone, into the previous results
    result = json.loads((out / "step_time_cpu.json").read_text())
    if args.conv_only:
      result["conv"], result["pool"] = bench_conv(args), bench_pool(args)
    if args.rss_only:  # the other models' rows stay
      kept = [r for r in result.get("rss_per_config") or [] if r["model"] not in args.rss_models]
      result["rss_per_config"] = kept + rss_per_config(args)
    part = "fresh-process RSS table"
    if args.conv_only:
      part = "microbenchmarks (conv, max-pool gradient)"
    verb = "were" if args.conv_only else "was"
    result["notes"].append(
      f"The {part} {verb} rerun alone on {machine['date_utc']} (commit `{library['commit']}`)."
    )
    finish(result, out)
    return
  main_out = run_process(args, MAIN)
  conv = None if args.only else bench_conv(args)
  pool = None if args.only else bench_pool(args)
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
    "pool": pool,
    "worker": worker_info,
    "cpu_usage": usage,
    "process_peak_rss_mb": peaks,
    "notes": notes,
  }
  result["memory_at_batch"] = memory_at_batch(args)
  result["batch_fit"] = batch_fit(args)
  result["rss_per_config"] = rss_per_config(args)
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
  for key in ("conv", "pool", "worker"):
    if result.get(key) is None and previous.get(key) is not None:
      result[key] = previous[key]
  for key, value in previous.get("cpu_usage", {}).items():
    result["cpu_usage"].setdefault(key, value)
  for key, value in previous.get("process_peak_rss_mb", {}).items():
    result["process_peak_rss_mb"].setdefault(key, value)
  for key in ("memory_at_batch", "batch_fit", "rss_per_config"):
    if not result.get(key) and previous.get(key):
      result[key] = previous[key]
  # Parts rerun alone into the previous file, and kept here, keep their notes.
  result["notes"] += [n for n in previous.get("notes", []) if "rerun alone" in n]
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
  result["profile_notes"] = step_time_report.profile_notes(result)
  out.mkdir(parents=True, exist_ok=True)
  (out / "step_time_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
  step_time_report.write_markdown(result, out / "step_time_cpu.md")
  log(f"wrote {out / 'step_time_cpu.md'} and .json")
  for c in result["targets"]:
    log(f"{'PASS' if c['pass'] else 'FAIL'} {c['model']} {c['target']}: {c['value']:.2f}")


if __name__ == "__main__":
  main()
