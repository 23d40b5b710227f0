"""The prose of the step-time benchmark: ``step_time_cpu.md`` and the profiling notes, written
from the measured result (``step_time_cpu.json``) alone. ``benchmarks/step_time.py`` measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import MB

# The benchmark's settings, shared with step_time.py (which imports them from here).
SPARSITY = 0.9
UPDATE_EVERY = 16
PROBE_UPDATE_EVERY = 2
BATCH = 128
NUM_CLASSES = 10
DEVICE_FLAG = "--xla_force_host_platform_device_count=2"
MAIN, TWO_DEV = "main", "2-dev"


def find(records: list[dict[str, Any]], model: str, label: str, process: str | None = None):
  for r in records:
    if r["model"] == model and r["label"] == label and (process is None or r["process"] == process):
      return r
  return None


def row_model(record: dict[str, Any]) -> str:
  """A timed row's model, with its batch when that is not the default."""
  batch = record.get("batch", BATCH)
  return record["model"] if batch == BATCH else f"{record['model']} (batch {batch})"


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
      f"**{row_model(r)} {r['label']}** [{r['process']}] ({r['ratio_to_dense']:.2f}x dense): "
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
      f"{': a sort dominates its cost (XLA:CPU sorts slowly)' if vs_sort > 0.8 else ''}."
    )
    notes.append(text)
  return notes


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
    f"Random batch of {BATCH} unless the model column names another (ResNet-20: 32x32x3, "
    f"ResNet-50: 224x224x3, SmallCNN: 8x8x1; {NUM_CLASSES} classes). "
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
      f"| {row_model(r)} | {r['process']} | {r['label']}{' †' if 'previous_run' in r else ''} | "
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
    if "loop" in conv:  # older results have no loop row
      lines[-1] += (
        f" Loop over the paths (`lax.map`, the form of `sequential_loop`): "
        f"{conv['loop']['median_s'] * 1e3:.1f} ms, {conv['loop_over_unrolled']:.1f}x unrolled: "
        "XLA:CPU runs convolutions inside a loop body far slower than in the entry "
        "computation, so on CPU `sequential` runs its unrolled form."
      )
    if "loop_forward" in conv:
      lines[-1] += (
        f" The forward alone: unrolled {conv['unrolled_forward']['median_s'] * 1e3:.1f} ms, "
        f"loop {conv['loop_forward']['median_s'] * 1e3:.1f} ms "
        f"({conv['loop_forward_over_unrolled']:.1f}x): the slowdown is in the gradient "
        "convolutions."
      )
  pool = result.get("pool")
  if pool:
    lines += [
      "",
      f"Max-pool gradient microbenchmark ({pool['shape']}, interleaved): JAX's gradient "
      f"(`select-and-scatter`, expanded by XLA:CPU with operand-free index arrays) "
      f"{pool['jax']['median_s'] * 1e3:.1f} ms, `dcil_jax.pool_gradient` (index arrays built "
      f"from the incoming gradient; the CPU form of `sequential`) "
      f"{pool['late']['median_s'] * 1e3:.1f} ms ({pool['late_over_jax']:.2f}x); largest "
      f"difference of the two gradients {pool['max_abs_diff']:g}; temporary memory "
      f"{pool['jax']['temp_bytes'] / 2**20:.0f} vs {pool['late']['temp_bytes'] / 2**20:.0f} MB.",
    ]
  lines += sequential_section(result)
  path.write_text("\n".join(lines) + "\n")


def sequential_section(result: dict[str, Any]) -> list[str]:
  """Issue 14: DCIL "sequential" against unrolled and dense, and the compile-only tables."""
  rows = [r for r in result["records"] if r.get("strategy") == "sequential"]
  lines = []
  if rows:
    lines += [
      "",
      "## DCIL `sequential`: time and memory",
      "",
      "*x unrolled* = median over rounds of (sequential step / step of the *reference* of the "
      "same round): `dcil/unrolled`, today's default DCIL step on CPU, with distillation on or "
      "off as in the row where the run measured both. Memory as in the step-time table.",
      "",
      "| model | process | config | reference | median ms | x unrolled | x dense | "
      "step memory MB | memory x dense | temp memory x dense |",
      "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
      dense = find(result["records"], r["model"], "dense", r["process"])
      temp = r["memory"]["temp_bytes"] / dense["memory"]["temp_bytes"]
      lines.append(
        f"| {row_model(r)} | {r['process']} | {r['label']} | "
        f"{r.get('unrolled_reference', 'dcil/unrolled')} | {fmt_ms(r['median_s'])} | "
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
    failures = [(r, b, why) for r in fit for b, why in (r.get("failed_compiles") or {}).items()]
    if failures:
      lines += ["", "Compiles that failed on this host and were counted as not fitting:", ""]
      lines += [f"- {r['model']} {r['label']}, batch {b}: `{why}`" for r, b, why in failures]
  rss = result.get("rss_per_config") or []
  if rss:
    lines += [
      "",
      "### Step memory as RSS, one fresh process per config",
      "",
      f"Each config alone in a new process: compile, one warm-up step, then the peak RSS "
      f"(`VmHWM`, reset first) over {rss[0]['steps']} steps (batch in the table), minus "
      "the RSS before them (state, batch and executable are already resident): what the "
      "steps themselves allocate, as the operating system sees it.",
      "",
      "| model | batch | config | RSS before MB | peak MB | step MB | x dense |",
      "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rss:
      ratio = "-" if r["step_vs_dense"] is None else f"**{r['step_vs_dense']:.2f}**"
      lines.append(
        f"| {r['model']} | {r['batch']} | {r['label']} | {r['before_mb']:.0f} | "
        f"{r['peak_mb']:.0f} | "
        f"{r['step_mb']:.0f} | {ratio} |"
      )
  return lines
