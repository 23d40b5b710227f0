"""Training metrics as TensorBoard event files and a JSONL file in the workdir.

tensorboardX writes event files without TensorFlow; ``metrics.jsonl`` (one JSON object per
write: ``{"step": ..., "split": ..., <name>: <value>}``) is for scripts and reports. Only one
process of a multi-host run writes (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from etils import epath


class MetricWriter:
  """Writes scalars under ``<split>/<name>`` to TensorBoard and as JSON lines."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter

      path = epath.Path(workdir)
      path.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(logdir=str(path / "tensorboard"))
      self._jsonl = (path / "metrics.jsonl").open("a")

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    record = {"step": int(step), "split": split}
    record |= {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` file."""
  with epath.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]
