"""Measurement code shared by the benchmarks: timing, CPU and memory use, XLA's cost, memory and
HLO statistics, and where the numbers came from (machine, versions, git).

``benchmarks/step_time.py`` and ``benchmarks/throughput.py`` measure with these and write their
own reports; nothing here formats prose.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib
import numpy as np
import optax

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
MB = 2**20


def log(msg: str) -> None:
  """Progress on stderr (results go to files)."""
  print(f"[{time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


_process_peak_kb = 0


def _proc_status_kb(field: str) -> int:
  """A ``/proc/self/status`` memory field of this process in KiB; 0 if unavailable."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(f"{field}:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def vm_hwm_kb() -> int:
  """Peak resident set size (``VmHWM``) of this process in KiB; 0 if unavailable."""
  return _proc_status_kb("VmHWM")


def vm_rss_kb() -> int:
  """Current resident set size (``VmRSS``) of this process in KiB; 0 if unavailable."""
  return _proc_status_kb("VmRSS")


def reset_peak_rss() -> None:
  """Resets ``VmHWM`` to the current RSS (Linux ``clear_refs``); remembers the old peak."""
  global _process_peak_kb
  _process_peak_kb = max(_process_peak_kb, vm_hwm_kb())
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def process_peak_rss_mb() -> float:
  """Peak RSS of the whole process so far, across resets."""
  return max(_process_peak_kb, vm_hwm_kb()) / 1024


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


def paired_median(num: list[float], den: list[float], scale: float = 1.0) -> float:
  """Median over rounds of ``scale * num[i] / den[i]`` (the first min(len) rounds)."""
  return float(np.median([scale * a / b for a, b in zip(num, den)]))


def git(*argv: str, cwd: Path) -> str:
  try:
    out = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=cwd)
  except OSError:
    return ""
  return out.stdout.strip() if out.returncode == 0 else ""


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
    "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
  }
