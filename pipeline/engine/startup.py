"""Where a job's start-up time goes, from process start to its first step (logged once, at that step).

Each ``mark(phase)`` ends a phase; the log line at the first step reads, for example::

    Startup: first step 101 at 6.84 s after process start (imports 3.91 s, download 0.21 s, ...)

The first job of a process counts from the process's start (interpreter and imports included); a
later job in the same process (a sweep's trials) counts from its own start.
"""

from __future__ import annotations

import logging
import time

import psutil

log = logging.getLogger(__name__)

_started: float | None = None  # wall-clock time the current job started
_last: float = 0.0
_phases: list[tuple[str, float]] = []
_reported = False


def begin() -> None:
    """A job starts: the process's own start for the first job, now for later ones."""
    global _started, _last, _reported
    first = _started is None
    _started = psutil.Process().create_time() if first else time.time()
    _last, _reported = _started, False
    _phases.clear()
    if first:
        mark("imports")


def mark(phase: str) -> None:
    """The phase that just ended."""
    global _last
    if _started is None or _reported:
        return
    now = time.time()
    _phases.append((phase, now - _last))
    _last = now


def first_step(step: int) -> None:
    """Log the breakdown once, after the job's first step."""
    global _reported
    if _started is None or _reported:
        return
    mark("first step")
    _reported = True
    log.info(
        "Startup: first step %d at %.2f s after process start (%s)",
        step,
        _last - _started,
        ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in _phases),
    )
