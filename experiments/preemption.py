"""Graceful stops: SIGTERM (what TPU VMs and schedulers send before preemption) or Ctrl-C.

The first SIGTERM or SIGINT only sets a flag: the loop finishes its step, writes a checkpoint
and exits with :data:`PREEMPTED_EXIT_CODE`. A second one exits at once with ``128 + signal``
(orbax writes into temporary directories, so a save cut short is never taken for a checkpoint).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from absl import logging

# EX_TEMPFAIL from sysexits.h: "temporary failure, retry": a checkpoint was written, run the
# same command again to continue.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal (``signum``), or where asked (``signum=None``:
  ``config.run.stop_after_step``), after writing a checkpoint at ``step``."""

  def __init__(self, step: int, signum: int | None):
    self.step, self.signum = step, signum
    by = "as asked (run.stop_after_step)" if signum is None else f"by {signal.Signals(signum).name}"
    super().__init__(
      f"Stopped {by} after step {step}; a checkpoint of step {step} was written. Run the same "
      "command again to continue (on any number of processes or devices: the global batch "
      "does not depend on them)."
    )


class PreemptionGuard:
  """Context manager that turns the first SIGTERM/SIGINT into ``requested``.

  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self) -> None:
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if self.requested:
      logging.error("Second signal (%s): exiting now, without a checkpoint.", name)
      os._exit(128 + signum)
    self.signum = signum
    logging.warning(
      "%s received: finishing this step, writing a checkpoint, then exiting with code %d "
      "(send it again to exit at once).",
      name,
      PREEMPTED_EXIT_CODE,
    )

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
