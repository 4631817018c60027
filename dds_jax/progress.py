"""A progress line with rate and ETA for long work (training, certification)."""

from __future__ import annotations

import datetime
import sys
import time
from typing import Callable, Optional


def _hms(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
  """Prints `desc: done/total (pct), rate unit/s, elapsed, ETA` now and then.

  Args:
    total: amount of work (examples, steps, samples).
    desc: what is being done.
    unit: name of one unit of work.
    every_s: at most one line per this many seconds (the last one always).
    write: where lines go (default: stderr).
    enabled: False to stay quiet (e.g. on every process but the first).
  """

  def __init__(self, total: int, desc: str, unit: str = "it",
               every_s: float = 10.0,
               write: Optional[Callable[[str], None]] = None,
               enabled: bool = True):
    self.enabled = enabled
    self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
    self._write = write or (lambda s: print(s, file=sys.stderr, flush=True))
    self.start = time.time()
    self._last = -float("inf")
    self.done = 0
    self._offset = 0

  def resume_from(self, done: int) -> None:
    """Counts `done` units as finished before this run (not in the rate)."""
    self.done = self._offset = done

  def line(self) -> str:
    elapsed = time.time() - self.start
    rate = (self.done - self._offset) / elapsed if elapsed > 0 else 0.0
    left = (self.total - self.done) / rate if rate > 0 else float("nan")
    pct = 100.0 * self.done / max(self.total, 1)
    eta = _hms(left) if left == left else "?"
    return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
            f"{rate:.4g} {self.unit}/s, elapsed {_hms(elapsed)}, ETA {eta}")

  def update(self, done: int, force: bool = False) -> None:
    self.done = done
    now = time.time()
    if not self.enabled:
      return
    if force or done >= self.total or now - self._last >= self.every_s:
      self._last = now
      self._write(self.line())
