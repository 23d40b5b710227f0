"""Checkpoints of a training run with orbax: save often, resume exactly, never trust a partial one.

A checkpoint is a step directory under ``WORKDIR/checkpoints/`` with two items:

- ``state``: every array the run needs to continue: params of both paths, BatchNorm
  statistics, the optimizer state with the masks and the refresh record, the step counter and
  the PRNG key. Saved by every process, sharded as the arrays are (orbax + tensorstore).
- ``meta`` (JSON): the step, the input pipeline's position (grain iterator state), the train
  metrics not yet logged, the resolved config, and the shape and dtype of every state leaf (so
  a checkpoint of another model is refused with a readable message before orbax reads it).

Orbax writes a step into a temporary directory and renames it when complete, so a crash in
the middle of a save never leaves a checkpoint that looks complete; saves are asynchronous (the
arrays are copied to host memory, then written while training goes on). The newest ``keep``
checkpoints are kept, plus the one with the best sparse-path eval accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CORRUPT_PREFIX = "corrupt_"
# The config group that controls how a run is executed or reported, not what it computes
# (``config.run``): it may change between a run and its resumption; every other field must match.
RUN_GROUP = "run"


class CheckpointMismatchError(ValueError):
  """A checkpoint (or workdir) belongs to another experiment or another model."""


class Restored(NamedTuple):
  """What :meth:`RunCheckpointer.restore_latest` found."""

  step: int
  state: Any  # the pytree passed to `save`, with restored arrays
  meta: dict[str, Any]


def _normalized(value: Any) -> Any:
  """JSON round trip: tuples become lists, so a saved config compares equal to a live one."""
  return json.loads(json.dumps(value, default=str))


# Config fields added after runs were already written, each with the value that computes what
# a run written before it computed: a workdir without the field continues with that value.
ADDED_FIELDS: dict[str, Any] = {"max_step_norm": 0.0, "filter_allocation": "global"}


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """``"field: saved -> current"`` for every field that changes what a run computes: all but
  the ``run`` group, compared field by field (nested groups as ``group.field``). A field of
  :data:`ADDED_FIELDS` missing from ``saved`` counts as its old-behaviour value."""
  saved, current = _normalized(dict(saved)), _normalized(dict(current))
  saved.pop(RUN_GROUP, None)
  current.pop(RUN_GROUP, None)
  for key, value in ADDED_FIELDS.items():
    if key in current:
      saved.setdefault(key, value)
  return _diff(saved, current, prefix="")


def _diff(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str) -> list[str]:
  lines = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      lines += _diff(a, b, prefix=f"{prefix}{key}.")
    elif a != b:
      lines.append(f"{prefix}{key}: {a!r} (workdir) -> {b!r} (this run)")
  return lines


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], *, force: bool, what: str):
  """Raises :class:`CheckpointMismatchError` unless ``current`` continues ``saved``'s experiment.

  With ``force`` the differences are only logged (the user asked to continue anyway).
  """
  diff = config_diff(saved, current)
  if not diff:
    return
  text = "\n  - ".join(diff)
  if force:
    logging.warning("Continuing %s with a changed config (force_resume):\n  - %s", what, text)
    return
  raise CheckpointMismatchError(
    f"{what} holds another experiment; these fields differ:\n  - {text}\n"
    "Use a new --workdir, or --config.run.force_resume=True to continue it with this config."
  )


def leaf_specs(tree: Any) -> dict[str, list]:
  """``{keystr(path): [shape, dtype]}`` of every array leaf, to compare trees cheaply."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in flat}


def _spec_mismatch(saved: Mapping[str, list], current: Mapping[str, list]) -> list[str]:
  lines = []
  for key in saved.keys() - current.keys():
    lines.append(f"{key}: in the checkpoint only")
  for key in current.keys() - saved.keys():
    lines.append(f"{key}: in this model only")
  for key in saved.keys() & current.keys():
    if list(saved[key]) != list(current[key]):
      lines.append(f"{key}: checkpoint {saved[key]} vs model {current[key]}")
  return sorted(lines)


class RunCheckpointer:
  """Saves and restores one run's checkpoints (an ``orbax.checkpoint.CheckpointManager``).

  Args:
    directory: where step directories go (``WORKDIR/checkpoints``).
    keep: how many of the newest checkpoints to keep (the best-by-accuracy one is kept too).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str | epath.Path, *, keep: int = 2, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}.")
    self.directory = epath.Path(directory)
    self._options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
        [
          ocp.checkpoint_managers.LatestN(n=keep),
          ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics["top1"],
            n=1,
            keep_checkpoints_without_metrics=False,
          ),
        ]
      ),
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._open()

  def _open(self) -> None:
    self.manager = ocp.CheckpointManager(
      self.directory, options=self._options, item_names=("state", "meta")
    )

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    meta: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None = None,
  ) -> None:
    """Starts saving ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``.

    ``metrics`` (``{"top1": ...}``) ranks it for keeping the best checkpoint.
    """
    meta = dict(meta) | {"step": int(step), "leaves": leaf_specs(state)}
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=None if metrics is None else dict(metrics),
      force=True,
    )

  def wait(self) -> None:
    """Blocks until the last save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore_latest(self, target: Any) -> Restored | None:
    """The newest readable checkpoint, restored into ``target``'s structure and shardings.

    A checkpoint that cannot be read (truncated or corrupt files) is reported, moved aside to
    ``corrupt_<step>`` (kept for inspection) and the next older one is tried.

    Raises:
      CheckpointMismatchError: the newest checkpoint holds arrays of another model or method.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    expected = leaf_specs(target)
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          "meta"
        ]
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
        self._set_aside(step, e)
        continue
      mismatch = _spec_mismatch(meta.get("leaves", {}), expected)
      if mismatch:
        shown = "\n  - ".join(mismatch[:10])
        more = f"\n  (and {len(mismatch) - 10} more)" if len(mismatch) > 10 else ""
        raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self.directory} does not match this model: its "
          f"params, masks or optimizer state differ:\n  - {shown}{more}\n"
          "Use a new --workdir for a different model, method or optimizer."
        )
      try:
        restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
      except Exception as e:  # noqa: BLE001
        self._set_aside(step, e)
        continue
      return Restored(step, restored, meta)
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    logging.warning(
      "The checkpoint at step %d in %s cannot be read (%s); it is moved to %s%d and the previous "
      "one is tried.",
      step,
      self.directory,
      first_line[:300],
      CORRUPT_PREFIX,
      step,
    )
    self.manager.close()
    if jax.process_index() == 0:
      source = self.directory / str(step)
      target = self.directory / f"{CORRUPT_PREFIX}{step}"
      if target.exists():
        target.rmtree()
      source.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self._open()


def to_jsonable(tree: Any) -> Any:
  """Host values (numpy scalars and arrays) as JSON types, exactly (float32 -> float64)."""
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)
