"""Training throughput (images/s) of the real training components: dense vs DPF vs DCIL.

Run ``python -m benchmarks.throughput`` (CPU; results in ``<out>/throughput_cpu.{json,md}``) or
``python -m benchmarks.throughput --gpu`` (an accelerator; ``<out>/throughput_gpu.{json,md}``).

CPU, two parts:

1. *ImageNet with the input pipeline*: inside ``tfds.testing.mock_data`` (random images of small
   random sizes, which still go through the real random-resized crop to 224), each method gets
   the config of ``experiments/configs/imagenet.py`` (small batch, sparsity 0.9), the state of
   ``experiments.run_state.create_train_state``, the real train iterator behind ``shard_batch`` and
   ``input_pipeline.prefetch``, and the compiled ``dcil_jax.train_step``, exactly as
   ``experiments.train`` builds them. One timed step = waiting for the next batch + the step. The
   iterator's own images/s is measured alone first, so the reader sees whether input limits.
2. *Data-only vs data+path mesh*: a subprocess per device count with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` times a CIFAR ResNet-20 (synthetic batch)
   as dense and DCIL on ``make_mesh()`` (batch split over ``data``, both paths on every device)
   and DCIL on ``make_mesh(path_parallel=True)`` (one path per device), and counts the
   collectives in each compiled step. The fake devices share the same cores: this shows the
   communication pattern and overheads, not a multi-chip speed-up.

``--gpu``: ResNet-50 at 128 images per device in bfloat16 with a synthetic batch kept on the
devices (no input pipeline): dense, DPF, DCIL ``unrolled`` and ``vmap`` on a data-only mesh, and
DCIL ``sharded`` on a data+path mesh when there are at least 2 devices.

Timing follows ``benchmarks/step_time.py``: compile, warm-up steps, then round-robin rounds over
the methods (each round runs ``--steps-per-round`` steps of every method), medians of per-round
ratios to the dense step of the same round, so drift of the machine's speed cancels.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

import dcil_jax
from benchmarks import common, throughput_report  # the report: prose from the result alone
from benchmarks.throughput_report import DCIL_TARGET, SPARSITY
from dcil_jax import sharding
from experiments import input_pipeline, resolve, run_state
from experiments import train as xtrain
from experiments.configs import cifar as cifar_configs
from experiments.configs import imagenet as imagenet_configs

REPO = Path(__file__).resolve().parents[1]
CPU_METHODS = (("dense", None), ("dpf", None), ("dcil", None))  # None: the config's default
GPU_METHODS = (("dense", None), ("dpf", None), ("dcil", "unrolled"), ("dcil", "vmap"))
MESH_CONFIGS = (("dense", False), ("dcil", False), ("dcil", True))  # (method, path_parallel)
CIFAR_TRAIN_EXAMPLES = 50_000
IMAGENET_TRAIN_EXAMPLES = 1_281_167
MB = 2**20
log = common.log


# --------------------------------------------------------------------------------------------
# Configs: the experiment configs with the benchmark's overrides, resolved as the loop does


def imagenet_config(
  model: str,
  method: str,
  batch: int,
  dtype: str,
  *,
  strategy: str | None = None,
  image_size: int | None = None,
  worker_count: int = 0,
  path_parallel: bool = False,
) -> ml_collections.ConfigDict:
  """``experiments/configs/imagenet.py`` for one method, resolved like ``train_and_evaluate``."""
  config = imagenet_configs.get_config()
  with config.unlocked():
    config.model, config.method, config.batch_size, config.dtype = model, method, batch, dtype
    config.sparsity = 0.0 if method == "dense" else SPARSITY
    config.strategy = strategy
    config.path_parallel = path_parallel
    config.run.worker_count = worker_count
    if image_size is not None:
      config.image_size = image_size
  return resolve.resolve_config(config, platform=resolve.platform_name(jax.default_backend()))


def cifar_config(model: str, method: str, batch: int, path_parallel: bool):
  """``experiments/configs/cifar.py`` for one method and mesh, resolved."""
  config = cifar_configs.get_config()
  with config.unlocked():
    config.model, config.method, config.batch_size = model, method, batch
    config.sparsity = 0.0 if method == "dense" else SPARSITY
    config.path_parallel = path_parallel
  return resolve.resolve_config(config, platform=resolve.platform_name(jax.default_backend()))


def synthetic_batches(config: ml_collections.ConfigDict, mesh: Any) -> Iterator[dict]:
  """One random batch put on the mesh once and fed again every step (no input cost)."""
  info = input_pipeline.DATASETS[config.dataset]
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  batch = {
    "image": rng.normal(size=shape).astype(run_state.DTYPES[config.dtype]),
    "label": rng.integers(0, info.num_classes, config.batch_size).astype(np.int32),
  }
  return itertools.repeat(sharding.shard_batch(batch, mesh))


def pipeline_batches(config: ml_collections.ConfigDict, mesh: Any) -> Iterator[dict]:
  """The training loop's input: train iterator -> ``shard_batch`` -> ``prefetch`` thread."""
  return (batch for batch, _ in xtrain.create_train_input(config, mesh)[1])


# --------------------------------------------------------------------------------------------
# Timed items


class Item:
  """One compiled and warmed-up train step with its own state and batch source."""

  def __init__(self, state: Any, step_fn: Any, batches: Iterator[dict], record: dict[str, Any]):
    self.state, self.step_fn, self.batches, self.record = state, step_fn, batches, record
    self.times: list[float] = []
    self.waits: list[float] = []

  def run(self, steps: int) -> tuple[float, float]:
    """``steps`` steps then one block; returns (seconds per step, input wait per step)."""
    start, wait, metrics = time.perf_counter(), 0.0, None
    for _ in range(steps):
      t = time.perf_counter()
      batch = next(self.batches)
      wait += time.perf_counter() - t
      self.state, metrics = self.step_fn(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - start) / steps, wait / steps


def prepare(
  label: str,
  config: ml_collections.ConfigDict,
  mesh: Any,
  steps_per_epoch: int,
  batches: Iterator[dict],
  args: argparse.Namespace,
  extra: dict[str, Any],
) -> Item:
  """State and compiled step as ``experiments.train`` builds them, analysed and warmed up."""
  log(f"{label}: state + compile + warm-up")
  gc.collect()
  common.reset_peak_rss()
  t0 = time.perf_counter()
  state = run_state.create_train_state(config, mesh, steps_per_epoch)
  t1 = time.perf_counter()
  first = next(batches)
  compiled = run_state.compile_train_step(state, first)
  t2 = time.perf_counter()
  record: dict[str, Any] = {
    "label": label,
    "model": config.model,
    "method": config.method,
    "strategy": run_state.describe(state)["strategy"] if config.method == "dcil" else None,
    "dtype": config.dtype,
    "batch": config.batch_size,
    "image_size": config.image_size,
    "devices": mesh.devices.size,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "create_state_s": t1 - t0,
    "compile_s": t2 - t1,
    "memory": common.memory_stats(compiled),
    "cost": common.cost_stats(compiled),
  } | extra
  text = compiled.as_text()
  record["hlo"] = common.hlo_stats(text)
  record["collectives"] = common.collective_stats(text)
  item = Item(state, compiled, itertools.chain([first], batches), record)
  warmup = [item.run(1)[0] for _ in range(args.warmup)]
  warmup += [item.run(args.steps_per_round)[0]]  # the estimate, at the timed stride
  round_s = warmup[-1] * args.steps_per_round
  record |= {
    "warmup_s": warmup,
    "peak_rss_mb": common.vm_hwm_kb() / 1024,
    "round_s_estimate": round_s,
  }
  log(f"  state {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, warm-up steps {warmup}")
  return item


def time_rounds(items: list[Item], rounds: int, steps_per_round: int) -> dict[str, Any]:
  """Rounds over ``items`` (each round in a rotated order); fills each item's times and
  returns the CPU usage meanwhile."""
  log(f"timing {len(items)} items, {rounds} rounds of {steps_per_round} step(s) each")
  start = common.cpu_snapshot()
  for i in range(rounds):
    # A rotating order: no config always runs right after the same (e.g. the largest) one.
    for item in items[i % len(items) :] + items[: i % len(items)]:
      step_s, wait_s = item.run(steps_per_round)
      item.times.append(step_s)
      item.waits.append(wait_s)
    log(
      f"  round {i + 1}/{rounds}: "
      + ", ".join(f"{x.record['label']} {x.times[-1]:.3f} s" for x in items)
    )
  return common.cpu_usage(start)


def capped_rounds(items: list[Item], args: argparse.Namespace) -> int:
  """``args.steps`` rounds, fewer (at least ``args.min_steps``) when they exceed the budget."""
  per_round = sum(item.record["round_s_estimate"] for item in items)
  rounds = args.steps
  if args.budget_s > 0 and per_round * rounds > args.budget_s:
    rounds = max(args.min_steps, int(args.budget_s // per_round))
  return rounds


def finish_records(items: list[Item], group: str, steps_per_round: int) -> list[dict[str, Any]]:
  """Records with times, waits and images/s; ``group`` names the items timed together."""
  out = []
  for item in items:
    r = item.record | {"group": group, "steps_per_round": steps_per_round}
    r |= {"times_s": item.times, "waits_s": item.waits, "rounds": len(item.times)}
    r |= common.quantiles(item.times)
    r["median_wait_s"] = float(np.median(item.waits))
    r["images_per_s"] = r["batch"] / r["median_s"]
    out.append(r)
    item.state = item.batches = item.step_fn = None
  return out


# --------------------------------------------------------------------------------------------
# Part 1 (CPU): ImageNet with the input pipeline


def time_pipeline(config: ml_collections.ConfigDict, mesh: Any, batches: int) -> dict[str, Any]:
  """images/s of the train iterator alone, and with ``shard_batch`` (no step running)."""
  log(f"input pipeline alone: {batches} batches of {config.batch_size}")
  out: dict[str, Any] = {"batches": batches, "batch": config.batch_size}
  iterator = input_pipeline.create_train_iterator(
    config.dataset,
    global_batch_size=config.batch_size,
    seed=config.seed + 1,  # not the batches the steps will see (no warm cache)
    image_size=config.image_size,
    dtype=np.dtype(run_state.DTYPES[config.dtype]),
    worker_count=config.run.worker_count,
  )
  next(iterator)  # starts the read threads
  for key, with_shard in (("iterator", False), ("iterator_shard_batch", True)):
    start = common.cpu_snapshot()
    t = time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
      if with_shard:
        jax.block_until_ready(sharding.shard_batch(batch, mesh))
    seconds = time.perf_counter() - t
    out[key] = {"seconds": seconds, "images_per_s": batches * config.batch_size / seconds}
    out[key]["cpu_usage"] = common.cpu_usage(start)
    log(f"  {key}: {out[key]['images_per_s']:.0f} images/s")
  sample = next(iterator)
  out["image_shape"] = list(sample["image"].shape)
  out["image_dtype"] = str(sample["image"].dtype)
  return out


def mock_source_sizes(dataset: str, n: int = 64) -> dict[str, Any]:
  """Sizes of the mock records (inside ``mock_data``), so the report can say what was decoded."""
  source = input_pipeline.data_source(dataset, input_pipeline.get_info(dataset).train_split)
  shapes = [np.asarray(source[i]["image"]).shape for i in range(min(n, len(source)))]
  heights, widths = [s[0] for s in shapes], [s[1] for s in shapes]
  return {
    "records": len(source),
    "sampled": len(shapes),
    "height_range": [int(min(heights)), int(max(heights))],
    "width_range": [int(min(widths)), int(max(widths))],
    "stored_as": type(source[0]["image"]).__name__,
  }


def run_imagenet(args: argparse.Namespace) -> dict[str, Any]:
  """Part 1: every ``--models`` model, dense/DPF/DCIL interleaved, fed by the input pipeline."""
  import tensorflow_datasets as tfds

  out: dict[str, Any] = {"records": [], "pipeline": {}, "cpu_usage": {}}
  mesh = sharding.make_mesh()
  with tfds.testing.mock_data(num_examples=args.mock_examples):
    out["mock_source"] = mock_source_sizes("imagenet2012")
    for model in args.models:
      configs = {
        (m, s): imagenet_config(
          model,
          m,
          args.batch,
          args.dtype,
          strategy=s,
          image_size=args.image_size,
          worker_count=args.worker_count,
        )
        for m, s in CPU_METHODS
      }
      base = next(iter(configs.values()))
      out["pipeline"][model] = time_pipeline(base, mesh, args.pipeline_batches)
      # The loop's schedules and refresh period follow real ImageNet epochs, not the mock split.
      steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // args.batch
      items = []
      for (method, strategy), config in configs.items():
        if method == "dcil":
          strategy = strategy or dcil_jax.default_strategy()
        items.append(
          prepare(
            method if strategy is None else f"{method}/{strategy}",
            config,
            mesh,
            steps_per_epoch,
            pipeline_batches(config, mesh),
            args,
            {
              "input": "pipeline",
              "worker_count": config.run.worker_count,
              "prefetch": config.run.prefetch,
            },
          )
        )
      rounds = capped_rounds(items, args)
      out["cpu_usage"][model] = time_rounds(items, rounds, args.steps_per_round)
      out["records"] += finish_records(items, f"{model}/pipeline", args.steps_per_round)
      del items
  return out


# --------------------------------------------------------------------------------------------
# Part 2 (CPU subprocess with N fake devices): data-only vs data+path mesh


def mesh_worker(args: argparse.Namespace) -> None:
  """Runs in the subprocess: dense and DCIL on a data mesh, DCIL on a data+path mesh."""
  code_at_start = code_info()  # the modules were imported just now
  n = jax.device_count()
  log(f"mesh worker: {n} devices, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  items = []
  for method, path_parallel in MESH_CONFIGS:
    config = cifar_config(args.mesh_model, method, args.mesh_batch, path_parallel)
    mesh = sharding.make_mesh(path_parallel=path_parallel)
    mesh_name = "data+path" if path_parallel else "data"
    label = f"{method}/{mesh_name}"
    item = prepare(
      f"{label} [{n} dev]",
      config,
      mesh,
      CIFAR_TRAIN_EXAMPLES // args.mesh_batch,
      synthetic_batches(config, mesh),
      args,
      {"input": "synthetic", "mesh_name": mesh_name, "process": f"{n}-dev"},
    )
    item.record["label"] = label
    items.append(item)
  rounds = capped_rounds(items, args)
  usage = time_rounds(items, rounds, args.steps_per_round)
  result = {
    "devices": n,
    "device_list": [str(d) for d in jax.devices()],
    "xla_flags": os.environ.get("XLA_FLAGS"),
    "records": finish_records(items, f"{args.mesh_model}/{n}-dev", args.steps_per_round),
    "cpu_usage": usage,
    "peak_rss_mb": common.process_peak_rss_mb(),
    "code": {"start": code_at_start, "end": code_info()},
  }
  Path(args.worker_out).write_text(json.dumps(result))


def run_mesh(args: argparse.Namespace, devices: int) -> dict[str, Any]:
  """Starts :func:`mesh_worker` in a fresh interpreter with ``devices`` host devices."""
  env = dict(os.environ)
  flag = f"--xla_force_host_platform_device_count={devices}"
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "worker.json"
    cmd = [
      sys.executable,
      "-m",
      "benchmarks.throughput",
      "--mesh-worker",
      "--worker-out",
      str(path),
    ]
    cmd += ["--mesh-model", args.mesh_model, "--mesh-batch", str(args.mesh_batch)]
    cmd += ["--steps", str(args.mesh_steps), "--warmup", str(args.warmup)]
    cmd += ["--budget-s", str(args.mesh_budget_s), "--min-steps", str(args.min_steps)]
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# GPU (or any accelerator): ResNet-50, synthetic on-device batch, bfloat16


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
  """Dense, DPF, DCIL unrolled/vmap (data mesh) and DCIL sharded (data+path mesh, >= 2 devices)."""
  n = jax.device_count()
  out: dict[str, Any] = {"records": [], "cpu_usage": {}}
  for model in args.models:
    batch = args.batch * n
    items = []
    specs = [(m, s, False) for m, s in GPU_METHODS]
    if n >= 2 and n % 2 == 0:
      specs.append(("dcil", "sharded", True))
    for method, strategy, path_parallel in specs:
      config = imagenet_config(
        model,
        method,
        batch,
        args.dtype,
        strategy=strategy,
        image_size=args.image_size,
        path_parallel=path_parallel,
      )
      mesh = sharding.make_mesh(path_parallel=path_parallel)
      label = method if strategy is None else f"{method}/{strategy}"
      item = prepare(
        label,
        config,
        mesh,
        IMAGENET_TRAIN_EXAMPLES // batch,
        synthetic_batches(config, mesh),
        args,
        {"input": "synthetic", "per_device_batch": args.batch},
      )
      items.append(item)
    rounds = capped_rounds(items, args)
    out["cpu_usage"][model] = time_rounds(items, rounds, args.steps_per_round)
    out["records"] += finish_records(items, f"{model}/synthetic", args.steps_per_round)
    del items
  return out


# --------------------------------------------------------------------------------------------
# Analysis


def add_ratios(records: list[dict[str, Any]]) -> None:
  """``speed_vs_dense``: median over rounds of (dense step / this step) in the same group,
  i.e. this config's images/s over dense's; ``speed_of_medians``: the ratio of the medians."""
  for r in records:
    dense = next((d for d in records if d["group"] == r["group"] and d["method"] == "dense"), None)
    if dense is None:
      r["speed_vs_dense"] = r["speed_of_medians"] = None
      continue
    r["speed_vs_dense"] = common.paired_median(dense["times_s"], r["times_s"])
    r["speed_of_medians"] = dense["median_s"] / r["median_s"]


def evaluate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The issue's target: DCIL images/s >= ``DCIL_TARGET`` x dense, per group."""
  checks = []
  for r in records:
    if r["method"] != "dcil" or r["speed_vs_dense"] is None:
      continue
    checks.append(
      {
        "target": f"{r['label']} images/s >= {DCIL_TARGET}x dense",
        "group": r["group"],
        "value": r["speed_vs_dense"],
        "limit": DCIL_TARGET,
        "pass": r["speed_vs_dense"] >= DCIL_TARGET,
      }
    )
  return checks


def analyse(result: dict[str, Any]) -> None:

  add_ratios(result["records"])
  result["targets"] = evaluate(result["records"])
  result["summary"] = throughput_report.summary_lines(result)


# --------------------------------------------------------------------------------------------
# Report


def write_results(result: dict[str, Any], out: Path) -> None:

  analyse(result)
  name = f"throughput_{result['mode']}"
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
  (out / f"{name}.md").write_text(throughput_report.render_markdown(result))
  log(f"wrote {out / name}.md and .json")
  for s in result["summary"]:
    log(s)


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gpu", action="store_true", help="the accelerator benchmark (see module doc)")
  p.add_argument(
    "--allow-cpu", action="store_true", help="let --gpu run on CPU (a smoke test, not results)"
  )
  p.add_argument(
    "--batch",
    type=int,
    help="part 1: global batch (default 8); --gpu: images per device (default 128)",
  )
  p.add_argument("--models", help="ImageNet models (default resnet50), comma-separated")
  p.add_argument("--dtype", help="compute dtype (default float32; --gpu: bfloat16)")
  p.add_argument("--image-size", type=int, help="crop size (default: the config's, 224)")
  p.add_argument("--steps", type=int, help="timed rounds (default 8; --gpu: 20)")
  p.add_argument("--steps-per-round", type=int, help="steps per config per round (1; --gpu: 10)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compile (default 1)")
  p.add_argument(
    "--budget-s",
    type=float,
    default=300.0,
    help="timed seconds per group before fewer rounds are run (0: no cap; default 300)",
  )
  p.add_argument("--min-steps", type=int, default=3, help="fewest rounds under the budget")
  p.add_argument("--mock-examples", type=int, default=256, help="mock_data records per split")
  p.add_argument("--pipeline-batches", type=int, default=40, help="batches for the input alone")
  p.add_argument(
    "--worker-count",
    type=int,
    default=0,
    help="grain worker processes for part 1 (default 0: reader threads; tfds mock_data does not "
    "reach worker processes)",
  )
  p.add_argument("--mesh-model", default="resnet20", help="part 2 model (CIFAR)")
  p.add_argument("--mesh-batch", type=int, default=64, help="part 2 global batch (default 64)")
  p.add_argument("--mesh-steps", type=int, default=20, help="part 2 timed rounds (default 20)")
  p.add_argument("--mesh-budget-s", type=float, default=90.0, help="part 2 budget per device count")
  p.add_argument(
    "--mesh-devices", default="2,4", help="part 2 fake device counts, comma-separated ('' skips)"
  )
  p.add_argument("--note", action="append", default=[], help="a note for the report")
  p.add_argument("--skip-imagenet", action="store_true", help="run part 2 only")
  p.add_argument(
    "--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder"
  )
  p.add_argument(
    "--render-only", action="store_true", help="rewrite the report from <out>/throughput_*.json"
  )
  p.add_argument("--mesh-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--worker-out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  gpu = args.gpu
  args.batch = args.batch or (128 if gpu else 8)
  args.models = [m.strip() for m in (args.models or "resnet50").split(",") if m.strip()]
  args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
  args.steps = args.steps or (20 if gpu else 8)
  args.steps_per_round = args.steps_per_round or (10 if gpu else 1)
  args.mesh_devices = [int(n) for n in args.mesh_devices.split(",") if n.strip()]
  if args.mesh_worker:
    args.steps_per_round = 1
  if min(args.batch, args.steps, args.steps_per_round, args.min_steps) < 1 or args.warmup < 0:
    p.error("--batch, --steps, --steps-per-round and --min-steps must be positive")
  if any(n < 2 or n % 2 for n in args.mesh_devices):
    p.error("--mesh-devices must be even counts >= 2 (the path axis has size 2)")
  return args


def code_info() -> dict[str, Any]:
  """The repository's commit and, what decides whether two runs ran the same code, the git
  trees of ``dcil_jax`` and ``experiments`` plus their uncommitted changes."""
  out: dict[str, Any] = {
    "commit": common.git("rev-parse", "--short", "HEAD", cwd=REPO) or "unknown"
  }
  for folder in ("dcil_jax", "experiments"):
    out[folder] = {
      "tree": common.git("rev-parse", "--short", f"HEAD:{folder}", cwd=REPO),
      "uncommitted": common.git("status", "--porcelain", "--", folder, cwd=REPO).splitlines(),
    }
  return out


def same_code(a: dict[str, Any], b: dict[str, Any]) -> bool:
  return all(a[k] == b[k] for k in ("dcil_jax", "experiments"))


OTHER_LOAD = "benchmarks/input_pipeline|benchmarks.input_pipeline|pytest"


def other_load() -> list[str]:
  """Command lines of other known CPU-heavy jobs (another benchmark, a test run) right now."""
  try:
    out = subprocess.run(["pgrep", "-af", OTHER_LOAD], capture_output=True, text=True).stdout
  except OSError:
    return []
  own = {str(os.getpid())}
  return [ln[:160] for ln in out.splitlines() if ln.split(" ", 1)[0] not in own]


def versions() -> dict[str, str]:
  import importlib.metadata as md

  out = {}
  for name in ("grain", "tensorflow_datasets", "ml_collections"):
    with contextlib.suppress(md.PackageNotFoundError):
      out[name] = md.version(name.replace("_", "-"))
  return out


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.mesh_worker:
    mesh_worker(args)
    return
  mode = "gpu" if args.gpu else "cpu"
  out = Path(args.out)
  if args.render_only:
    result = json.loads((out / f"throughput_{mode}.json").read_text())
    write_results(result, out)
    return
  backend = jax.default_backend()
  if args.gpu and backend == "cpu" and not args.allow_cpu:
    raise SystemExit("--gpu found only CPU devices; pass --allow-cpu for a smoke test.")
  start = time.perf_counter()
  code = code_info()
  notes: list[str] = list(args.note)
  result: dict[str, Any] = {
    "mode": mode,
    "machine": common.machine_info(),
    "versions": versions(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "args": {k: v for k, v in vars(args).items() if k not in ("mesh_worker", "worker_out")},
    "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.throughput", *sys.argv[1:]]),
    "records": [],
    "cpu_usage": {},
    "notes": notes,
  }
  seen: dict[str, list[str]] = {"start": other_load()}
  if args.gpu:
    if backend == "cpu":
      notes.append("**Smoke test on CPU (--allow-cpu): these are not GPU numbers.**")
    result |= run_gpu(args)
  else:
    if jax.device_count() != 1:
      notes.append(f"The main process saw {jax.device_count()} devices (XLA_FLAGS was set).")
    if not args.skip_imagenet:
      result |= run_imagenet(args)
      seen["after part 1"] = other_load()
      result["code_after_part_1"] = code_info()
      if not same_code(result["code_after_part_1"], code):
        notes.append("**dcil_jax or experiments changed during part 1** (see the JSON).")
      if args.dtype == "float32":
        notes.append(
          "bfloat16 is not measured on CPU (kept out of the time budget): how XLA:CPU runs "
          "bfloat16 convolutions says nothing about bfloat16 on GPU/TPU; `--gpu` measures that."
        )
    result["workers"] = {}
    for n in args.mesh_devices:
      worker = run_mesh(args, n)
      result["records"] += worker.pop("records")
      result["cpu_usage"][f"{args.mesh_model}/{n}-dev"] = worker.pop("cpu_usage")
      result["workers"][str(n)] = worker
    codes = [code, code_info()]
    codes += [c for w in result["workers"].values() for c in w["code"].values()]
    if not all(same_code(c, code) for c in codes):
      notes.append("**dcil_jax or experiments changed during the run** (see `code` in the JSON).")
  seen["end"] = other_load()
  result["other_load"] = seen
  if any(seen.values()):
    notes.append(
      "**Other CPU-heavy jobs ran during this benchmark** (see the busy cores below): "
      + "; ".join(f"{k}: {v}" for k, v in seen.items() if v)
    )
  dirty = code["dcil_jax"]["uncommitted"] + code["experiments"]["uncommitted"]
  if dirty:
    notes.append(f"Uncommitted changes in dcil_jax/experiments: {dirty}")
  result["code"] = {"start": code, "end": code_info()}
  result["peak_rss_mb"] = common.process_peak_rss_mb()
  result["wall_s"] = time.perf_counter() - start
  write_results(result, out)


if __name__ == "__main__":
  main()
