"""The throughput benchmark's analysis and report on a fake result (no model is run)."""

from __future__ import annotations

from typing import Any

from benchmarks import common, throughput, throughput_report


def _record(label: str, group: str, times: list[float], **extra: Any) -> dict[str, Any]:
  method = label.split("/")[0]
  median = sorted(times)[len(times) // 2]
  return {
    "label": label,
    "group": group,
    "model": group.split("/")[0],
    "method": method,
    "dtype": "float32",
    "batch": 8,
    "mesh": {"data": 1},
    "devices": 1,
    "rounds": len(times),
    "times_s": times,
    "median_s": median,
    "iqr_s": 0.0,
    "median_wait_s": 0.001,
    "images_per_s": 8 / median,
    "create_state_s": 1.0,
    "compile_s": 2.0,
    "cost": {"flops": 1e9},
    "memory": {"total_bytes": 2**20},
    "hlo": {"convolutions": 4, "grouped_convolutions": 0},
    "collectives": {"counts": {}, "megabytes": {}},
    "input": "pipeline",
  } | extra


def _result() -> dict[str, Any]:
  group = "resnet50/pipeline"
  records = [
    _record("dense", group, [1.0, 2.0, 1.0]),
    _record("dpf", group, [1.0, 2.0, 1.0]),
    # Round 2 is slow for every method: per-round ratios cancel it.
    _record("dcil/unrolled", group, [2.0, 4.0, 2.4]),
  ]
  mesh = {"process": "2-dev", "input": "synthetic", "devices": 2, "mesh": {"data": 2}}
  records += [
    _record("dense/data", "resnet20/2-dev", [1.0, 1.0], **mesh),
    _record("dcil/data", "resnet20/2-dev", [2.0, 2.0], **mesh),
    _record("dcil/data+path", "resnet20/2-dev", [4.0, 4.0], **mesh),
  ]
  records[-1]["collectives"] = {"counts": {"all-reduce": 2}, "megabytes": {"all-reduce": 1.5}}
  machine = {
    "backend": "cpu",
    "cpu_model": "fake",
    "cpu_count": 2,
    "cpus_usable": 2,
    "memory_gb": 24.0,
    "platform": "linux",
    "python": "3.11",
    "jax": "0",
    "jaxlib": "0",
    "flax": "0",
    "optax": "0",
    "date_utc": "today",
  }
  return {
    "mode": "cpu",
    "machine": machine,
    "versions": {},
    "device_kind": "cpu",
    "device_count": 1,
    "args": vars(throughput.parse_args([])),
    "command": "python -m benchmarks.throughput",
    "records": records,
    "pipeline": {
      "resnet50": {
        "batches": 10,
        "batch": 8,
        "iterator": {"images_per_s": 400.0, "cpu_usage": {}},
        "iterator_shard_batch": {"images_per_s": 390.0},
      }
    },
    "cpu_usage": {},
    "notes": [],
    "code": {
      "start": {
        "commit": "abc",
        "dcil_jax": {"tree": "d1", "uncommitted": []},
        "experiments": {"tree": "e1", "uncommitted": []},
      }
    },
    "wall_s": 60.0,
  }


def test_ratios_targets_and_report():
  result = _result()
  throughput.analyse(result)
  by_label = {r["label"]: r for r in result["records"]}
  assert by_label["dpf"]["speed_vs_dense"] == 1.0
  # Per-round ratios 0.5, 0.5, 1/2.4: median 0.5; the ratio of medians is 1/2.4.
  assert by_label["dcil/unrolled"]["speed_vs_dense"] == 0.5
  assert by_label["dcil/data+path"]["speed_vs_dense"] == 0.25
  targets = {(t["group"], t["target"].split()[0]): t["pass"] for t in result["targets"]}
  assert targets[("resnet50/pipeline", "dcil/unrolled")] is True
  assert targets[("resnet20/2-dev", "dcil/data+path")] is False
  text = throughput_report.render_markdown(result)
  assert text.startswith("# Training throughput on CPU")
  assert by_label["dcil/unrolled"]["speed_of_medians"] == 1 / 2.4
  assert "dcil/unrolled 3.33 images/s (0.50x dense)" in text
  assert "all-reduce x2 (1.50 MB)" in text
  assert "input is not the bottleneck" in text


def test_collective_stats_counts_tuple_results():
  hlo = "\n".join(
    [
      "  %ar = (f32[32]{0}, f32[32]{0}) all-reduce(%a, %b), channel_id=2",
      "  %cp = bf16[2,8]{1,0} collective-permute(%c), source_target_pairs={{1,0}}",
      "  %ags = f32[4]{0} all-gather-start(%d)",
      "  %agd = f32[4]{0} all-gather-done(%ags)",
      "  %conv = f32[1,8]{1,0} convolution(%e, %f)",
    ]
  )
  stats = common.collective_stats(hlo)
  assert stats["counts"] == {"all-reduce": 1, "collective-permute": 1, "all-gather": 1}
  assert stats["megabytes"]["all-reduce"] == 2 * 32 * 4 / 2**20
  assert stats["megabytes"]["collective-permute"] == 16 * 2 / 2**20


def test_largest_batch_brackets_and_bisects():
  from benchmarks import step_time

  for limit in (8, 100, 1000, 4096):
    for guess in (8, 64, 800, 9000):
      fits = lambda b, limit=limit: b <= limit  # noqa: E731
      batch, checked = step_time.largest_batch(fits, guess, 8)
      assert batch == limit // 8 * 8, (limit, guess, batch, checked)
  assert step_time.largest_batch(lambda b: b <= 3, 64, 8)[0] == 0


def test_batch_fit_counts_a_failed_compile_as_not_fitting_and_goes_on(monkeypatch):
  """A compile that fails on the host (XLA:CPU's LLVM out of host memory) used to end the whole
  benchmark: now that batch counts as not fitting, the failure is recorded and the search and
  the other configurations go on."""
  import argparse

  from benchmarks import step_time, step_time_report

  def fake_memory(state, model_name, batch):
    if batch >= 200:
      raise RuntimeError("INTERNAL: LLVM compilation error: Cannot allocate memory\nmore")
    return {"total_bytes": 1000 + 100 * batch}

  monkeypatch.setattr(step_time, "create_state", lambda *a, **k: (None, None))
  monkeypatch.setattr(step_time, "step_memory", fake_memory)
  monkeypatch.setattr(step_time.gc, "collect", lambda: 0)  # a full collection per failure
  budget = 1000 + 100 * 400  # bytes: batch 400 would fit, but from 200 on nothing compiles
  args = argparse.Namespace(fit_models=["resnet20"], fit_budget_gib=budget / 2**30, fit_step=8)
  records = step_time.batch_fit(args)
  assert len(records) == len(step_time.MEMORY_CONFIGS)  # every configuration, not just one
  for r in records:
    assert r["batch"] == 192  # the largest multiple of 8 below the failures
    assert r["failed_compiles"] and min(r["failed_compiles"]) >= 200
    assert all("Cannot allocate memory" in why for why in r["failed_compiles"].values())
  lines = step_time_report.sequential_section(
    {"records": [], "batch_fit": records, "args": {"fit_step": 8}}
  )
  assert any("counted as not fitting" in line for line in lines)


def test_fresh_process_rss_rows_become_targets_and_a_table():
  from benchmarks import step_time, step_time_report

  rss = [
    {"model": "resnet20", "label": label, "steps": 3, "batch": 128, "before_mb": 900.0,
     "peak_mb": 900.0 + step, "step_mb": step, "step_vs_dense": step / 325.0}
    for label, step in [("dense", 325.0), ("dcil/unrolled", 626.0), ("dcil/sequential", 380.0)]
  ]  # fmt: skip
  result = {"records": [], "refresh": {}, "rss_per_config": rss}
  checks = step_time.evaluate(result)
  assert [(c["target"].split(" ")[0], c["pass"]) for c in checks] == [("dcil/sequential", False)]
  lines = step_time_report.sequential_section(result)
  assert "| resnet20 | 128 | dcil/unrolled | 900 | 1526 | 626 | **1.93** |" in lines


def test_a_rerun_of_the_sweep_benchmark_keeps_the_hand_written_reading(tmp_path):
  from benchmarks import sweep_throughput

  path = tmp_path / "report.md"
  assert sweep_throughput.kept_reading(str(path)) == ""  # no report yet
  path.write_text("# Tables\n\n| a |\n\n## Reading (by hand)\n\n- what the tables mean\n")
  assert (
    sweep_throughput.kept_reading(str(path)) == "\n## Reading (by hand)\n\n- what the tables mean\n"
  )
  path.write_text("# Tables only\n")
  assert sweep_throughput.kept_reading(str(path)) == ""
