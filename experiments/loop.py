"""The periodic parts of the training loop, one owner each (``experiments.train`` wires them).

- :func:`itstime`: every periodic decision (log, evaluate, checkpoint) asks it.
- :class:`MetricBuffer`: the train metrics of the steps not yet logged. They stay on the devices
  until the loop logs (no host sync per step); a checkpoint carries them over, so a resumed run
  logs exactly the means an uninterrupted one would.
- :class:`RefreshLog`: one ``refresh`` record per mask refresh (flip rates, revived weights).
- :class:`NonfiniteMonitor`: acts on the steps' ``finite`` flags when they reach the host.
- :class:`Throughput`: images per second, without the first step (compilation).
- :class:`StopPolicy`: when a SIGTERM/SIGINT stops the run; on several hosts, all at one step.

None of them touches the library's state; they are unit-tested in ``tests/test_loop.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging


def itstime(step: int, every: int | None, last: int | None = None) -> bool:
  """Whether ``step`` (counted from 1) is a multiple of ``every`` or the ``last`` step.

  ``every=None`` never fires (except at ``last``).
  """
  return bool(every) and step % every == 0 or step == last


def mean_metrics(history: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Averages a window of step metrics over its applied (finite) steps; the flip rate only over
  steps that refreshed masks. In float64, so host values restored from a checkpoint's JSON give
  the same numbers as the live float32 ones."""
  stacked = {k: np.stack([np.asarray(h[k]) for h in history]) for k in history[0]}
  finite = stacked.pop("finite").astype(bool)
  refreshed = stacked.pop("mask_refreshed", np.zeros_like(finite)).astype(bool) & finite
  flips = stacked.pop("flip_rate", None)
  out = {
    k: float(v[finite].astype(np.float64).mean()) if finite.any() else float("nan")
    for k, v in stacked.items()
  }
  if refreshed.any():
    out["flip_rate"] = float(flips[refreshed].astype(np.float64).mean())
  out["nonfinite_steps"] = float((~finite).sum())
  return out


class NonfiniteMonitor:
  """Acts on the ``finite`` metric of each step (the step itself already skipped the update).

  ``"stop"``: raise at the first non-finite step; ``"skip"``: go on, but stop after
  ``max_consecutive`` non-finite steps in a row (the run is not recovering). ``total`` and
  ``consecutive`` are saved in checkpoints.
  """

  def __init__(self, mode: str, max_consecutive: int, counts: Sequence[int] = (0, 0)):
    self.mode, self.max_consecutive = mode, max_consecutive
    self.total, self.consecutive = (int(c) for c in counts)

  def counts(self) -> tuple[int, int]:
    return self.total, self.consecutive

  def check(self, window: Sequence[dict[str, Any]], first_step: int) -> None:
    for i, metrics in enumerate(window):
      step = first_step + i
      if bool(metrics["finite"]):
        self.consecutive = 0
        continue
      if not bool(metrics.get("labels_in_range", True)):  # a data error: never skipped on
        raise ValueError(
          f"Step {step}: the batch has a class index outside [0, num_classes) (e.g. -1 or "
          "num_classes); the step was not applied. Check the dataset's labels and the model's "
          "num_classes."
        )
      self.total += 1
      self.consecutive += 1
      loss = float(metrics["loss"])
      if self.mode == "stop":
        raise FloatingPointError(
          f"Step {step}: the loss ({loss}) or a gradient or parameter is NaN/Inf. The step was "
          "not applied and the run stops; the checkpoints in the workdir hold only good steps. "
          "Lower the learning rate, check the data, or set --config.run.on_nonfinite=skip."
        )
      logging.warning(
        "Step %d: non-finite loss (%s) or gradients; the step was skipped.", step, loss
      )
      if self.consecutive >= self.max_consecutive:
        raise FloatingPointError(
          f"Steps {step - self.consecutive + 1}..{step}: {self.consecutive} non-finite steps "
          "in a row (all skipped); the run is not recovering and stops. The checkpoints in the "
          "workdir hold only good steps."
        )


class MetricBuffer:
  """The train metrics of the steps since the last log, oldest first.

  ``append`` keeps a step's metrics on the devices. ``fetch(step)`` (at a log or a checkpoint)
  brings them to the host and shows the new ones to the :class:`NonfiniteMonitor` once each.
  ``pop_mean`` averages and empties the buffer; ``pending`` is what a checkpoint saves, and a
  buffer built from it (``MetricBuffer(monitor, pending)``) continues where that one stopped.
  """

  def __init__(self, monitor: NonfiniteMonitor, pending: Sequence[dict[str, Any]] = ()):
    self.monitor = monitor
    self._items: list[Any] = list(pending)
    self._checked = len(self._items)  # items[:checked] are on the host, checked for NaN/Inf

  def __len__(self) -> int:
    return len(self._items)

  def append(self, metrics: dict[str, Any]) -> None:
    self._items.append(metrics)

  def fetch(self, step: int) -> None:
    """Brings the metrics up to ``step`` (the newest) to the host and checks the new ones."""
    self._items = jax.device_get(self._items)
    first = step - len(self._items) + 1 + self._checked
    self.monitor.check(self._items[self._checked :], first_step=first)
    self._checked = len(self._items)

  def pending(self) -> list[dict[str, Any]]:
    """The fetched metrics as JSON values, exactly (float32 -> float64)."""
    if self._checked != len(self._items):
      raise RuntimeError("MetricBuffer.pending() before fetch(): the newest metrics are on device")
    return jax.tree.map(lambda x: np.asarray(x).tolist(), self._items)

  def pop_mean(self) -> dict[str, float]:
    """The mean of the fetched metrics (:func:`mean_metrics`); the buffer is emptied."""
    if self._checked != len(self._items):
      raise RuntimeError("MetricBuffer.pop_mean() before fetch(): the newest metrics are on device")
    out = mean_metrics(self._items)
    self._items, self._checked = [], 0
    return out


def layer_name(keystr: str) -> str:
  """``"['BasicBlock_0']['Conv_1']['kernel']"`` -> ``"BasicBlock_0/Conv_1/kernel"``."""
  return "/".join(part.strip("'\"") for part in keystr.strip("[]").split("]["))


def refresh_scalars(result: dict[str, Any]) -> dict[str, float]:
  """A refresh measurement as flat scalars (``flip_rate/<layer>`` per layer)."""
  out = {k: float(v) for k, v in result.items() if k != "layer_flip_rate"}
  out |= {f"flip_rate/{layer_name(k)}": float(v) for k, v in result["layer_flip_rate"].items()}
  return out


class RefreshLog:
  """Mask-refresh measurements of each step (on the devices), written as ``refresh`` records
  for the steps that refreshed when :meth:`flush` is called; ``records`` holds all of the run.

  Args:
    write: ``write(step, record)``, e.g. the metric writer's ``refresh`` split.
    records: the records of the steps before a resume (from ``metrics.jsonl``).
  """

  def __init__(self, write: Callable[[int, dict[str, float]], None], records=()):
    self._write = write
    self.records: list[dict[str, Any]] = list(records)
    self._pending: list[tuple[int, Any]] = []

  def append(self, step: int, result: dict[str, Any]) -> None:
    self._pending.append((step, result))

  def flush(self) -> None:
    for step, result in jax.device_get(self._pending):
      if not result.pop("refreshed"):
        continue
      record = refresh_scalars(result)
      self.records.append({"step": step, **record})
      self._write(step, record)
    self._pending = []


class Throughput:
  """Images per second from the end of the first step (compilation) on.

  ``step(metrics, images)`` after every step; the first one waits for its metrics (one sync).
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._start: float | None = None
    self.images = 0

  def step(self, metrics: Any, images: int) -> None:
    if self._start is None:
      jax.block_until_ready(metrics)
      self._start = self._clock()
    else:
      self.images += images

  def seconds(self) -> float:
    return self._clock() - self._start if self._start is not None else 0.0

  def rate(self) -> float | None:
    seconds = self.seconds()
    return self.images / seconds if self.images and seconds else None


class StopPolicy:
  """Whether a requested stop (``requested()``, e.g. a signal) ends the run after ``step``.

  One process checks after every step. Several agree (an all-gather) every ``agree_every``
  steps, when they sync to log anyway, so every host stops after the same step.
  """

  def __init__(self, requested: Callable[[], bool], agree_every: int, processes: int = 1):
    self._requested, self._every, self._processes = requested, agree_every, processes

  def __call__(self, step: int) -> bool:
    if self._processes == 1:
      return self._requested()
    if not itstime(step, self._every):
      return False
    from jax.experimental import multihost_utils

    flag = np.bool_(self._requested())
    return bool(np.any(multihost_utils.process_allgather(flag)))
