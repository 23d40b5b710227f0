"""Export a finished run's best checkpoint as ONNX or StableHLO (files that need no ``dcil_jax``).

  python -m experiments.export --workdir=runs/digits --format=onnx
  python -m experiments.export --workdir=runs/digits --format=stablehlo --out=model.stablehlo

The run's own ``config.json`` rebuilds its model and state; the checkpoint with the best
sparse-path eval accuracy (the one the checkpointer keeps besides the newest) is restored, or
the newest where none has a metric. The deployable sparse path is exported
(:func:`dcil_jax.export_variables`): with filter masks (``granularity="filter"``) it is
compacted first (:func:`dcil_jax.deploy.compact`: fewer channels, equal logits), otherwise the
masked model is exported as it is. The file's logits are checked against the masked model's on
a random batch before the command returns; ``report.json`` goes next to it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

import dcil_jax
from experiments import checkpoints, run_state, train

FORMATS = ("onnx", "stablehlo")


def best_step(checkpointer: checkpoints.RunCheckpointer) -> int:
  """The step of the best-by-accuracy checkpoint, or the newest where none has a metric."""
  step = checkpointer.manager.best_step()
  steps = checkpointer.all_steps()
  if step is None:
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}; train the run first.")
    step = max(steps)
  return int(step)


def restore_best(
  workdir: str | Path, final: bool = False
) -> tuple[Any, ml_collections.ConfigDict, int]:
  """``(state, config, step)``: the run's best checkpoint (``final``: its newest, the one the
  run's final numbers are measured on) restored into a fresh state."""
  workpath = Path(workdir)
  config_file = workpath / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} is missing: is {workdir} a run directory?")
  config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  mesh = dcil_jax.make_mesh(path_parallel=config.path_parallel)
  plan = train.Plan.from_config(config)
  fresh = run_state.create_train_state(config, mesh, plan.steps_per_epoch)
  checkpointer = checkpoints.RunCheckpointer(
    workpath / checkpoints.CHECKPOINT_DIR, async_save=False
  )
  try:
    step = max(checkpointer.all_steps(), default=-1) if final else best_step(checkpointer)
    if step < 0:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}; train the run first.")
    target = run_state.checkpoint_tree(fresh)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = checkpointer.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
  finally:
    checkpointer.close()
  state = run_state.from_checkpoint_tree(fresh, restored)
  return state, config, step


def export_run(
  workdir: str | Path, fmt: str, out: str | Path | None = None, align: int = 1
) -> dict[str, Any]:
  """Exports ``workdir``'s best checkpoint as ``fmt``; returns what ``report.json`` holds.

  Args:
    workdir: a finished (or checkpointed) run directory.
    fmt: ``"onnx"`` or ``"stablehlo"``.
    out: the file to write (default ``WORKDIR/export/model.<fmt>``).
    align: for filter masks, keep widths multiples of ``align`` (see ``compact``).
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}.")
  state, config, step = restore_best(workdir)
  variables = jax.device_get(dcil_jax.export_variables(state))
  masks = jax.device_get(state.trained_masks) if state.method.uses_masks else None
  model = state.model.module
  x = run_state.example_input(config)
  shape = tuple(x.shape[1:])
  masked = dcil_jax.masked_function(model, variables, masks)
  compacted = None
  if config.get("granularity") == "filter" and masks is not None:
    compacted = dcil_jax.deploy.compact(model, variables, masks, shape, align=align)
  path = Path(out) if out else Path(workdir) / "export" / f"model.{fmt}"
  path.parent.mkdir(parents=True, exist_ok=True)
  size = dcil_jax.export(compacted or masked, path, fmt, input_shape=shape, dtype=x.dtype)

  batch = np.random.default_rng(0).normal(size=(4, *shape)).astype(x.dtype)
  want = np.asarray(jax.jit(masked)(batch))
  if fmt == "onnx":
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": batch})[0]
  else:
    got = np.asarray(jax.export.deserialize(bytearray(path.read_bytes())).call(batch))
  diff = float(np.max(np.abs(got - want)))
  if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(want))))):
    raise AssertionError(f"The exported model's logits differ from the masked model's by {diff}.")
  stats = dcil_jax.deploy.deploy_stats(model, variables, shape, masks)
  report = {
    "workdir": str(workdir),
    "step": step,
    "format": fmt,
    "file": str(path),
    "bytes": size,
    "input_shape": list(shape),
    "compacted": compacted is not None,
    "max_abs_logit_diff_vs_masked": diff,
    "masked_model": stats,
  }
  if compacted is not None:
    report["compact"] = compacted.report
    report["compact_macs"] = dcil_jax.deploy.deploy_stats(
      compacted.module, compacted.variables, shape
    )["macs"]
  path.with_name(path.name + ".report.json").write_text(json.dumps(report, indent=1))
  return report


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  del argv
  report = export_run(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.align)
  kind = "compact" if report["compacted"] else "masked"
  print(
    f"{report['file']}: the {kind} model of step {report['step']} ({report['bytes']:,} bytes), "
    f"logits within {report['max_abs_logit_diff_vs_masked']:.1e} of the masked model's"
  )


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A run directory (config.json, checkpoints/).")
  flags.DEFINE_enum("format", "onnx", list(FORMATS), "The file format.")
  flags.DEFINE_string("out", None, "The file to write (default WORKDIR/export/model.FORMAT).")
  flags.DEFINE_integer("align", 1, "Filter masks: widths rounded up to multiples of this.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
