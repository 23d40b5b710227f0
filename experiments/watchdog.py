"""A watchdog for runs that may hang: no progress for ``seconds``: every stack dumped, then exit.

Why: a process of a multi-process run that waits for a peer (a coordinator that never answers, a
collective another process never joins, a peer that died) sits idle in a futex wait for ever,
and says nothing about where. The watchdog turns that into a bounded wait, a stack dump of
every thread (Python frames, from :mod:`faulthandler`) and exit code :data:`EXIT_STALLED`.

Every process runs its own watchdog. Training is lock-step (each step ends in a collective), so
when one process stops, the others stop at the next collective and their watchdogs fire too,
within about one step of each other: each process dumps its own stacks. ``SIGUSR1`` dumps a
process's stacks at any time without stopping it (``kill -USR1 PID``), so a launcher can ask
every peer for its stacks (``tests/two_process_starts.py`` does, on its own timeout).

Progress is whatever the code reports with :func:`beat` (the launcher at each start-up stage,
the training loop after every step, every eval batch and every checkpoint wait). Between two
beats there is one compilation, one eval batch or one checkpoint write: ``seconds`` must be
longer than the longest of those, on the slowest host.

The watch is a Python thread; a thread that holds the GIL for ever would stop it, so
``faulthandler.dump_traceback_later`` (a C thread that needs no GIL) backs it up, ``GRACE``
seconds later, re-armed whenever the Python thread sees a beat.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import TextIO

# After 0-3 (done, bug, bad input, non-finite) and before 75 (preempted): see experiments.launch.
EXIT_STALLED = 4
GRACE = 30.0  # the faulthandler backstop fires this long after the Python watch should have

_current: Watchdog | None = None


class Watchdog:
  """Exits the process with :data:`EXIT_STALLED` after ``seconds`` without a :meth:`beat`.

  Args:
    seconds: the longest allowed time between two beats (> 0).
    name: says which process this is in the message (e.g. ``"process 1 of 2"``).
    file: where the message and the stacks go (a real file: faulthandler writes to its fd).
  """

  def __init__(self, seconds: float, *, name: str = "", file: TextIO | None = None):
    if seconds <= 0:
      raise ValueError(f"watchdog seconds must be > 0, got {seconds}")
    self.seconds, self.name = float(seconds), name
    self.file = sys.stderr if file is None else file
    self.what = "start"
    self._last = time.monotonic()
    self._beats = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")

  def beat(self, what: str) -> None:
    """Progress: ``what`` was reached (kept for the message, e.g. ``"step 12"``)."""
    self.what, self._last = what, time.monotonic()
    self._beats += 1

  def start(self) -> Watchdog:
    self._arm_backstop()
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread.is_alive() and self._thread is not threading.current_thread():
      self._thread.join()
    faulthandler.cancel_dump_traceback_later()

  def _arm_backstop(self) -> None:
    faulthandler.dump_traceback_later(self.seconds + GRACE, exit=True, file=self.file)

  def _watch(self) -> None:
    seen = self._beats
    while not self._stop.wait(min(1.0, self.seconds / 4)):
      if self._beats != seen:
        seen = self._beats
        self._arm_backstop()
      idle = time.monotonic() - self._last
      if idle > self.seconds:
        self._fire(idle)

  def _fire(self, idle: float) -> None:
    who = f" ({self.name}, pid {os.getpid()})" if self.name else f" (pid {os.getpid()})"
    self.file.write(
      f"\nerror: watchdog{who}: no progress for {idle:.0f} s (limit {self.seconds:g} s); the "
      f"last progress was: {self.what}. The run is stalled: in a multi-process run, a peer "
      "died, hangs or never joined the same collective. The stacks of every thread follow; "
      f"exiting with code {EXIT_STALLED}. Raise the limit with --watchdog_seconds (0 turns "
      "the watchdog off) if a compilation, an evaluation or a checkpoint legitimately takes "
      "longer.\n"
    )
    self.file.flush()
    faulthandler.dump_traceback(file=self.file, all_threads=True)
    self.file.write(f"error: watchdog{who}: stalled after {self.what}; exit {EXIT_STALLED}.\n")
    self.file.flush()
    os._exit(EXIT_STALLED)


def start(seconds: float, *, name: str = "") -> Watchdog | None:
  """Starts the process's watchdog (``seconds`` <= 0: none), and ``SIGUSR1`` stack dumps."""
  global _current
  if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
  stop()
  if seconds <= 0:
    return None
  _current = Watchdog(seconds, name=name).start()
  return _current


def stop() -> None:
  """Stops the process's watchdog, if one runs (a finished run has nothing left to watch)."""
  global _current
  if _current is not None:
    _current.stop()
    _current = None


def name(text: str) -> None:
  """Names this process in the watchdog's message (once the process index is known)."""
  if _current is not None:
    _current.name = text


def beat(what: str) -> None:
  """Reports progress to the process's watchdog (nothing if none runs): cheap, call freely."""
  if _current is not None:
    _current.beat(what)
