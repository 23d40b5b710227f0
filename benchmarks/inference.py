"""Inference speed of dense, filter-masked and compact ResNet-32 on this CPU.

Run ``python -m benchmarks.inference`` (``--help`` for options). Writes
``<out>/inference_cpu.json`` and ``<out>/inference_cpu.md``.

Weights are random (Kaiming-normal fan-out kernels, random BatchNorm statistics): speed depends
on shapes, not on training. Filter masks come from :func:`dcil_jax.granularity.filter_masks`
(mean ``|w|``) at 30/40/50 % of filters, with the official ``global`` threshold and, to show how
much the distribution matters, ``layerwise`` (the same fraction in every conv). The masked model
is the plain model with pruned filters zeroed (what :func:`dcil_jax.export_variables` gives);
the compact model is :func:`dcil_jax.compact.compact` of it. Every model is jitted, in eval mode;
timed calls run round-robin over all models (so slow drift of a shared machine cancels in the
ratios), each a median of ``--rounds`` calls; ratios are medians of per-round ratios to the dense
model, all from one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

import dcil_jax
from dcil_jax import compact as compact_lib
from dcil_jax import compress, deploy_stats, models
from dcil_jax import granularity as gr

TARGET_SPEEDUP = 1.4  # compact vs dense at batch 128, 40 % of filters (the goal)


def conv_kernels(path, leaf):
  """The zoo's convolution kernels (4-D; its Dense heads are 2-D)."""
  return path[-1].key == "kernel" and leaf.ndim == 4


def random_variables(model: Any, shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
  """Kaiming-normal (fan-out) kernels and random BN statistics, from the shapes alone."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if name == "['kernel']":
      fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1] if leaf.ndim > 2 else leaf.shape[0]
      return rng.normal(size=leaf.shape, scale=np.sqrt(2.0 / fan_out)).astype(np.float32)
    if name in ("['var']", "['scale']"):
      return rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
    return rng.normal(size=leaf.shape, scale=0.1).astype(np.float32)

  return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(make, shapes))


def machine_info() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "device": str(jax.devices()[0]),
    "load_average_start": os.getloadavg(),
  }


def build(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """The models to time: dense, then masked and compact per (distribution, sparsity)."""
  model = models.create_model(args.model, 10)
  shape = (32, 32, 3)
  variables = random_variables(model, shape)
  template = dcil_jax.masks_like(variables["params"], conv_kernels)
  dense_stats = deploy_stats.deploy_stats(model, variables, shape)
  with tempfile.TemporaryDirectory() as tmp:
    np.savez(Path(tmp) / "dense.npz", **dcil_jax.compact_model.flatten_variables(variables))
    dense_bytes = (Path(tmp) / "dense.npz").stat().st_size
  configs = [
    {
      "label": "dense",
      "kind": "dense",
      "apply": model.apply,
      "variables": variables,
      "macs": dense_stats["macs"],
      "params": dense_stats["params"],
      "bytes": dense_bytes,
    }
  ]
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *shape)), jnp.float32)
  checks = {}
  for distribution in args.distributions:
    for s in args.sparsities:
      masks = jax.jit(lambda p, s=s, d=distribution: gr.filter_masks(p, template, s, "l1", d))(
        variables["params"]
      )
      masked = dict(variables, params=dcil_jax.apply_masks(variables["params"], masks))
      c = compact_lib.compact(model, variables, masks)
      stats = deploy_stats.deploy_stats(c.module, c.variables, shape)
      with tempfile.TemporaryDirectory() as tmp:
        sizes = compact_lib.save_compact(c, Path(tmp) / "compact")
        packed = compress.save_compressed(Path(tmp) / "packed.npz", variables, masks)
      tag = f"{distribution} {round(100 * s)}%"
      diff = float(
        jnp.max(jnp.abs(jax.jit(c.module.apply)(c.variables, x) - jax.jit(model.apply)(masked, x)))
      )
      checks[tag] = diff
      masked_stats = deploy_stats.deploy_stats(model, variables, shape, masks)
      configs.append(
        {
          "label": f"masked {tag}",
          "kind": "masked",
          "distribution": distribution,
          "sparsity": s,
          "apply": model.apply,
          "variables": masked,
          "macs": masked_stats["kept_macs"],
          "params": masked_stats["kept_params"],
          "bytes": packed["file_bytes"],
        }
      )
      configs.append(
        {
          "label": f"compact {tag}",
          "kind": "compact",
          "distribution": distribution,
          "sparsity": s,
          "apply": c.module.apply,
          "variables": c.variables,
          "macs": stats["macs"],
          "params": stats["params"],
          "bytes": sizes["variables.npz"],
          "filters_pruned": c.report["pruned"],
          "filters_removed": c.report["removed"],
          "filters": c.report["filters"],
        }
      )
      if round(100 * s) == 40:
        if distribution == "global":
          configs.append(_without_border(configs[-1], c))
        a = compact_lib.compact(model, variables, masks, align=args.align)
        stats = deploy_stats.deploy_stats(a.module, a.variables, shape)
        with tempfile.TemporaryDirectory() as tmp:
          aligned_bytes = compact_lib.save_compact(a, Path(tmp) / "c")["variables.npz"]
        checks[f"{tag} widths x{args.align}"] = float(
          jnp.max(
            jnp.abs(jax.jit(a.module.apply)(a.variables, x) - jax.jit(model.apply)(masked, x))
          )
        )
        configs.append(
          {
            "label": f"compact {tag}, widths multiple of {args.align}",
            "kind": "compact",
            "distribution": distribution,
            "sparsity": s,
            "apply": a.module.apply,
            "variables": a.variables,
            "macs": stats["macs"],
            "params": stats["params"],
            "bytes": aligned_bytes,
            "filters_pruned": a.report["pruned"],
            "filters_removed": a.report["removed"],
            "filters": a.report["filters"],
          }
        )
  return configs, {"max_abs_logit_diff_compact_vs_masked": checks, "shape": shape}


def _without_border(config: dict[str, Any], c: compact_lib.Compacted) -> dict[str, Any]:
  """The compact model without its constant border terms: inexact, timed only for their cost."""
  arch = json.loads(c.module.arch)
  for op in arch["ops"]:
    op.pop("border", None)
  params = {
    name: {k: v for k, v in layer.items() if k != "border"}
    for name, layer in c.variables["params"].items()
  }
  return dict(
    config,
    label=config["label"] + " without border terms (inexact)",
    kind="diagnostic",
    apply=dcil_jax.compact_model.CompactNet(json.dumps(arch)).apply,
    variables=dict(c.variables, params=params),
  )


CONV_CASES = (  # (input channels, output channels, spatial size): ResNet-32's stages 1 and 3
  (16, 16, 32),
  (16, 10, 32),
  (10, 10, 32),
  (64, 64, 8),
  (64, 38, 8),
  (38, 38, 8),
)


def conv_scaling(rounds: int, batch: int = 128) -> list[dict[str, Any]]:
  """Time of one 3x3 conv at ResNet-32's widths: does it fall with the channel count?"""
  conv = jax.jit(
    lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  rng = np.random.default_rng(3)
  args = []
  for cin, cout, hw in CONV_CASES:
    x = jnp.asarray(rng.normal(size=(batch, hw, hw, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    conv(x, k).block_until_ready()
    args.append((x, k))
  times = [[] for _ in args]
  for _ in range(rounds):
    for i, (x, k) in enumerate(args):
      t0 = time.perf_counter()
      conv(x, k).block_until_ready()
      times[i].append(time.perf_counter() - t0)
  out = []
  for (cin, cout, hw), t in zip(CONV_CASES, times):
    macs = batch * hw * hw * 9 * cin * cout
    med = float(np.median(t))
    out.append(
      {
        "in": cin,
        "out": cout,
        "size": hw,
        "batch": batch,
        "median_s": med,
        "gmacs_per_s": macs / med / 1e9,
      }
    )
  return out


def time_all(configs: list[dict[str, Any]], batch: int, rounds: int) -> None:
  """Round-robin timing: ``times[batch]`` per config, and per-round ratios to dense."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(batch, 32, 32, 3)), jnp.float32)
  fns = []
  for c in configs:
    fn = jax.jit(c["apply"])
    t0 = time.perf_counter()
    fn(c["variables"], x).block_until_ready()
    c.setdefault("compile_s", {})[batch] = time.perf_counter() - t0
    fns.append(fn)
  times = [[] for _ in configs]
  for _ in range(rounds):
    for i, (c, fn) in enumerate(zip(configs, fns)):
      t0 = time.perf_counter()
      fn(c["variables"], x).block_until_ready()
      times[i].append(time.perf_counter() - t0)
  for c, t in zip(configs, times):
    ratios = [d / own for d, own in zip(times[0], t)]  # dense time / this time = speed-up
    c.setdefault("times_s", {})[batch] = t
    c.setdefault("median_s", {})[batch] = float(np.median(t))
    c.setdefault("speedup", {})[batch] = float(np.median(ratios))


def report(result: dict[str, Any]) -> str:
  """The markdown report of a result (pure: tested on a fake result)."""
  m = result["machine"]
  lines = [
    f"# Inference on CPU: dense vs filter-masked vs compact {result['model']}",
    "",
    f"`python -m benchmarks.inference` on {result['date']}: {m['cpu']}, {m['cores']} cores "
    f"(load average {', '.join(f'{v:.1f}' for v in m['load_average_start'])} at the start, "
    f"{', '.join(f'{v:.1f}' for v in result['load_average_end'])} at the end: the machine is "
    f"shared), jax {m['jax']}, flax {m['flax']}, float32, 32x32x3 inputs, jitted eval mode, "
    f"median of {result['rounds']} calls per model, round-robin; speed-up = median over rounds "
    "of dense time / model time (same process). Random weights (speed depends on shapes only).",
    "",
    "| model | filters removed / pruned | MACs/image | params | bytes on disk | "
    "batch 1 latency (ms) | × dense | batch 128 images/s | × dense |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for c in result["configs"]:
    removed = (
      f"{c['filters_removed']} / {c['filters_pruned']} of {c['filters']}" if "filters" in c else ""
    )
    lines.append(
      f"| {c['label']} | {removed} | {c['macs'] / 1e6:.1f}M | {c['params']:,} | {c['bytes']:,} | "
      f"{1e3 * c['median_s']['1']:.2f} | {c['speedup']['1']:.2f} | "
      f"{128 / c['median_s']['128']:.0f} | {c['speedup']['128']:.2f} |"
    )
  goal = result["goal"]
  lines += [
    "",
    f"Goal: compact at 40 % of filters (global threshold, as the official code) at least "
    f"{TARGET_SPEEDUP}× dense at batch 128: measured {goal['speedup']:.2f}× "
    f"({'met' if goal['met'] else 'not met'}).",
    "",
    "Bytes on disk: dense = the plain variables as `.npz`; masked = `dcil_jax.compress` "
    "(bit-packed masks + kept values); compact = the compact model's `variables.npz`. MACs count "
    "conv and dense layers from the shapes (masked: kept weights; compact: its own shapes, "
    "without its per-batch constant border terms). Compact logits vs masked logits, max abs "
    "difference: "
    + ", ".join(
      f"{k} {v:.1e}" for k, v in result["checks"]["max_abs_logit_diff_compact_vs_masked"].items()
    )
    + ".",
  ]
  if result.get("conv_scaling"):
    lines += [
      "",
      "Why the compact model is not faster in proportion to its MACs: one 3x3 conv, batch "
      "128, XLA:CPU, same process:",
      "",
      "| in → out channels | size | ms | GMAC/s |",
      "|---|---:|---:|---:|",
    ]
    for r in result["conv_scaling"]:
      lines.append(
        f"| {r['in']} → {r['out']} | {r['size']}×{r['size']} | {1e3 * r['median_s']:.1f} | "
        f"{r['gmacs_per_s']:.1f} |"
      )
  if result.get("notes"):
    lines += ["", result["notes"]]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet32")
  parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.4, 0.5])
  parser.add_argument("--distributions", nargs="+", default=["global", "layerwise"])
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--align", type=int, default=8, help="widths of the aligned compact rows")
  parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
  parser.add_argument("--notes", default="", help="a paragraph appended to the report")
  args = parser.parse_args(argv)
  info = machine_info()
  configs, checks = build(args)
  for batch in (1, 128):
    time_all(configs, batch, args.rounds)
  scaling = conv_scaling(args.rounds)
  goal_cfg = next((c for c in configs if c["label"] == "compact global 40%"), configs[-1])
  result = {
    "model": args.model,
    "date": datetime.date.today().isoformat(),
    "machine": info,
    "load_average_end": os.getloadavg(),
    "rounds": args.rounds,
    "checks": checks,
    "goal": {
      "label": goal_cfg["label"],
      "speedup": goal_cfg["speedup"][128],
      "target": TARGET_SPEEDUP,
      "met": goal_cfg["speedup"][128] >= TARGET_SPEEDUP,
    },
    "notes": args.notes,
    "conv_scaling": scaling,
    "configs": [{k: v for k, v in c.items() if k not in ("apply", "variables")} for c in configs],
  }
  result = json.loads(json.dumps(result))  # batch keys become strings, as in the file
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "inference_cpu.json").write_text(json.dumps(result, indent=1))
  (out / "inference_cpu.md").write_text(report(result))
  print(report(result))
  return result


if __name__ == "__main__":
  main()
