"""The prose of the throughput benchmark: ``throughput_<mode>.md`` and its summary lines, written
from the measured result (``throughput_<mode>.json``) alone. ``benchmarks/throughput.py``
measures.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import MB

# The benchmark's settings, shared with throughput.py (which imports them from here).
SPARSITY = 0.9
DCIL_TARGET = 0.48  # DCIL images/s >= 0.48x dense (issue); the floor of two passes is 0.5
DCIL_FLOOR = 0.5


def _find(records: list[dict[str, Any]], group: str, label: str) -> dict[str, Any] | None:
  return next((r for r in records if r["group"] == group and r["label"] == label), None)


def _collectives(r: dict[str, Any]) -> str:
  c = r["collectives"]
  return (
    ", ".join(f"{k} x{n} ({c['megabytes'][k]:.2f} MB)" for k, n in sorted(c["counts"].items()))
    or "none"
  )


def _megabytes(r: dict[str, Any]) -> float:
  return float(sum(r["collectives"]["megabytes"].values()))


def summary_lines(result: dict[str, Any]) -> list[str]:
  """What the numbers say, in words (generated from them, so it cannot drift from the tables)."""
  records, lines = result["records"], []
  groups = list(dict.fromkeys(r["group"] for r in records))
  for group in groups:
    rows = [r for r in records if r["group"] == group]
    dense = _find(records, group, "dense")
    if dense is None or rows[0].get("process"):
      continue
    parts = [
      f"{r['label']} {r['images_per_s']:.2f} images/s"
      + ("" if r is dense else f" ({r['speed_vs_dense']:.2f}x dense)")
      for r in rows
    ]
    lines.append(
      f"**{group}** (batch {dense['batch']}, {dense['dtype']}, {dense['rounds']} rounds): "
      + "; ".join(parts)
      + "."
    )
    for r in rows:
      if r["method"] == "dcil":
        verdict = "meets" if r["speed_vs_dense"] >= DCIL_TARGET else "misses"
        flops = r["cost"]["flops"] / dense["cost"]["flops"]
        lines.append(
          f"{r['label']} {verdict} the target of >= {DCIL_TARGET}x dense images/s "
          f"({r['speed_vs_dense']:.2f}x; {DCIL_FLOOR}x is the floor of running two forward + "
          f"backward passes); XLA's cost analysis counts {flops:.2f}x dense's FLOPs for its step."
        )
    model = group.split("/")[0]
    pipe = result.get("pipeline", {}).get(model)
    if pipe and rows[0]["input"] == "pipeline":
      alone = pipe["iterator"]["images_per_s"]
      fastest = max(r["images_per_s"] for r in rows)
      waits = ", ".join(f"{r['label']} {r['median_wait_s'] * 1e3:.1f} ms" for r in rows)
      bound = "is not" if alone > 3 * fastest else "may be"
      sharded = pipe["iterator_shard_batch"]["images_per_s"]
      lines.append(
        f"Input pipeline alone: {alone:.0f} images/s ({sharded:.0f}"
        f" with `shard_batch`), {alone / fastest:.0f}x what the fastest step consumes: input "
        f"{bound} the bottleneck here. Median wait for the next batch per step: {waits}."
      )
  for n in sorted({r["devices"] for r in records if r.get("process")}):
    group = next(r["group"] for r in records if r.get("process") == f"{n}-dev")
    data, path = _find(records, group, "dcil/data"), _find(records, group, "dcil/data+path")
    dense = _find(records, group, "dense/data")
    if not (data and path and dense):
      continue
    lines.append(
      f"**{n} fake CPU devices, {data['model']} batch {data['batch']}**: DCIL on the data mesh "
      f"{data['images_per_s']:.0f} images/s ({data['speed_vs_dense']:.2f}x dense), on the "
      f"data+path mesh {path['images_per_s']:.0f} images/s ({path['speed_vs_dense']:.2f}x dense; "
      f"{path['speed_vs_dense'] / data['speed_vs_dense']:.2f}x data-only DCIL). Collectives per "
      f"step: dense/data {_collectives(dense)}; dcil/data {_collectives(data)}; dcil/data+path "
      f"{_collectives(path)}."
    )
    same_flops = abs(path["cost"]["flops"] / data["cost"]["flops"] - 1) < 0.05
    lines.append(
      f"Per device, DCIL on the data+path mesh computes {path['cost']['flops'] / 1e9:.1f} GFLOP "
      f"per step against {data['cost']['flops'] / 1e9:.1f} on the data mesh"
      + (" (the same work, split by path instead of by batch)" if same_flops else "")
      + f", and its collectives return {_megabytes(path):.2f} MB against {_megabytes(data):.2f} "
      "MB. The fake devices share the same cores, so this measures that extra communication and "
      "partitioning overhead, not what one path per real chip gains."
    )
  return lines


def _fmt(x: float | None, spec: str = ".2f") -> str:
  return "-" if x is None else format(x, spec)


def render_markdown(result: dict[str, Any]) -> str:
  """The report: summary, machine, command, then one table per part."""
  m, a, code = result["machine"], result["args"], result["code"]["start"]
  gpu = result["mode"] == "gpu"
  title = "GPU" if gpu else "CPU"
  lines = [f"# Training throughput on {title}: dense vs DPF vs DCIL", "", "## Summary", ""]
  lines += [f"- {s}" for s in result["summary"]]
  lines += [f"- **Note**: {n}" for n in result["notes"]]
  lines += [
    "",
    "## Machine and command",
    "",
    f"- **Devices**: {result['device_kind']} x{result['device_count']} (backend `{m['backend']}`)",
    f"- **CPU**: {m['cpu_model']}, {m['cpu_count']} cores ({m['cpus_usable']} usable), "
    f"{m['memory_gb']:.0f} GiB RAM; {m['platform']}",
    f"- **Software**: Python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
    f"flax {m['flax']}, optax {m['optax']}, grain {result['versions'].get('grain', '?')}, "
    f"tensorflow-datasets {result['versions'].get('tensorflow_datasets', '?')}",
    f"- **Date**: {m['date_utc']}; benchmark wall time {result['wall_s'] / 60:.1f} min",
    f"- **Code**: commit `{code['commit']}` (trees: dcil_jax `{code['dcil_jax']['tree']}`, "
    f"experiments `{code['experiments']['tree']}`)",
    f"- **Command**: `{result['command']}`",
    "",
    "## Method",
    "",
  ]
  if gpu:
    lines += [
      f"{', '.join(a['models'])} configs from `experiments/configs/imagenet.py` (resolved by "
      f"`experiments.resolve.resolve_config`): {a['batch']} images per device, dtype "
      f"`{a['dtype']}`, sparsity {SPARSITY} for DPF/DCIL; state from "
      "`experiments.run_state.create_train_state`, step `dcil_jax.train_step` compiled once as the "
      "training loop does. One random batch lives on the devices and is fed again every step "
      "(no input pipeline).",
    ]
  else:
    lines += [
      "**Part 1** builds each method as `experiments/imagenet.py` would: the config of "
      "`experiments/configs/imagenet.py` with overrides (batch "
      f"{a['batch']}, dtype `{a['dtype']}`, sparsity {SPARSITY} for DPF/DCIL, `worker_count="
      f"{a['worker_count']}`), `experiments.run_state.create_train_state` on `make_mesh()`, the "
      "train iterator of `experiments.input_pipeline` (random-resized crop to 224 + flip + "
      "normalisation) through `sharding.shard_batch` and the `input_pipeline.prefetch` thread "
      "(as in `experiments.train`), and "
      "`dcil_jax.train_step.lower(...).compile()`. Everything runs inside "
      f"`tfds.testing.mock_data(num_examples={a['mock_examples']})`. One timed step = waiting for "
      "the next batch + the step + `block_until_ready`; images/s = batch / median step.",
      "",
      f"**Part 2** runs in one subprocess per device count with "
      "`XLA_FLAGS=--xla_force_host_platform_device_count=N`: the config of "
      f"`experiments/configs/cifar.py` with model `{a['mesh_model']}`, batch {a['mesh_batch']} "
      "(global), a synthetic batch kept on the devices; dense and DCIL on `make_mesh()` (batch "
      "split over `data`, both DCIL paths on every device) and DCIL on "
      "`make_mesh(path_parallel=True)` (`strategy='sharded'`: one path per device, the batch "
      "split over the remaining `data` factor). **The fake devices share the same CPU cores**: "
      "these numbers show the communication pattern and its overhead, not the speed-up of "
      "real chips.",
    ]
  lines += [
    "",
    f"Timing: compile, {a['warmup']} warm-up step(s) and one more round's worth to estimate, then"
    " rounds over the configs of a group (round-robin, each round in a rotated order, running "
    f"{a['steps_per_round']} step(s) of each config, then blocking), so drift and background load "
    "hit every config alike. **x dense** = median over rounds of (dense step / config step) in "
    "the same round: the config's images/s relative to dense (the ratio of the medians is "
    "shown next to it). Groups whose estimate exceeds the time budget get fewer rounds.",
    "",
    "From the compiled step: XLA's cost analysis (GFLOP per device), `memory_analysis` (temp + "
    "arguments + outputs, per device), convolutions (grouped ones in parentheses) and "
    "collectives: count and megabytes of their results per device, tuple-shaped results "
    "(XLA's combined all-reduces) included.",
    "",
  ]
  headers = (
    "| group | config | rounds | median step s | IQR s | images/s | **x dense** | x dense "
    "(medians) | input wait ms | state s | compile s | GFLOP/step/device | step memory MB | "
    "convs (grouped) | collectives |"
  )
  sections = [("Throughput", [r for r in result["records"] if not r.get("process")])]
  sections.append(
    ("Data-only vs data+path mesh", [r for r in result["records"] if r.get("process")])
  )
  for title_, rows in sections:
    if not rows:
      continue
    lines += [f"## {title_}", "", headers, "|" + "---|" * 2 + "---:|" * 11 + "---|---|"]
    for r in rows:
      mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items())
      lines.append(
        f"| {r['group']} ({mesh}) | {r['label']} | {r['rounds']} | {r['median_s']:.3f} | "
        f"{r['iqr_s']:.3f} | {r['images_per_s']:.2f} | **{_fmt(r['speed_vs_dense'])}** | "
        f"{_fmt(r['speed_of_medians'])} | {r['median_wait_s'] * 1e3:.1f} | "
        f"{r['create_state_s']:.1f} | {r['compile_s']:.1f} | {r['cost']['flops'] / 1e9:.1f} | "
        f"{r['memory']['total_bytes'] / MB:.0f} | {r['hlo']['convolutions']} "
        f"({r['hlo']['grouped_convolutions']}) | {_collectives(r)} |"
      )
    lines.append("")
  if result["targets"]:
    lines += ["## Target", "", "| target | group | measured | result |", "|---|---|---:|---|"]
    for c in result["targets"]:
      lines.append(
        f"| {c['target']} | {c['group']} | {c['value']:.2f}x | "
        f"{'PASS' if c['pass'] else '**FAIL**'} |"
      )
    lines.append("")
  if result.get("pipeline"):
    lines += ["## Input pipeline alone", ""]
    src = result.get("mock_source")
    if src:
      lines.append(
        f"Mock ImageNet records ({src['records']} per split; {src['sampled']} sampled): images "
        f"{src['height_range'][0]}-{src['height_range'][1]} x {src['width_range'][0]}-"
        f"{src['width_range'][1]} pixels, stored as `{src['stored_as']}` (already decoded, no "
        "JPEG). Real ImageNet JPEGs (~400x350 on average) cost a decode each, so real input is "
        "slower than this (see `benchmarks/input_pipeline.py` for JPEG numbers).",
      )
      lines.append("")
    lines += ["| model | batches | images/s (iterator) | images/s (+ shard_batch) | busy cores |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for model, p in result["pipeline"].items():
      busy = p["iterator"]["cpu_usage"].get("machine_busy_cores")
      lines.append(
        f"| {model} | {p['batches']} x {p['batch']} | {p['iterator']['images_per_s']:.0f} | "
        f"{p['iterator_shard_batch']['images_per_s']:.0f} | {_fmt(busy)} |"
      )
    lines.append("")
  usage = "; ".join(
    f"{k}: machine {u.get('machine_busy_cores', float('nan')):.2f} busy cores, this process "
    f"{u['process_cores']:.2f}, steal {u.get('steal_pct', float('nan')):.1f}%"
    for k, u in result["cpu_usage"].items()
  )
  if usage:
    lines += [f"CPU use while timing: {usage}.", ""]
  return "\n".join(lines)
