"""Named fault-injection points, armed from the environment for crash and storage-fault tests.

The engine calls ``point("checkpoint.serialize")`` at the moments where a crash or an I/O error can
hit a checkpoint. Unarmed (the normal case) a point is one dictionary lookup. Tests arm points with
``PIPELINE_FAULTS`` (read at import) or ``arm()``; the spec is a comma-separated list of
``<point>[@<n>]=<action>``:

- ``kill``: SIGKILL this process (a crash at exactly that moment);
- ``sleep:<seconds>``: a slow disk or network;
- ``raise:<ERRNO>``: an ``OSError`` with that errno (``ENOSPC``, ``EIO``, ``EACCES``, ``EROFS``, ...);
- ``signal:<NAME>``: send this process a real signal (``TERM``, ``INT``, ``HUP``) at exactly that moment;
- ``stop``: SIGSTOP this process (a job paused there, every thread with it, until someone sends SIGCONT).

``@n`` fires only the n-th time the point is reached in this process (1-based); without it, every
time. Example: ``PIPELINE_FAULTS="checkpoint.fsync@2=kill"`` kills the job inside its second
checkpoint's fsync.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "PIPELINE_FAULTS"


@dataclass(frozen=True)
class Fault:
    action: str  # kill | sleep | raise | signal | stop
    arg: str | None
    nth: int | None  # fire only on this visit (1-based); None = every visit


_armed: dict[str, Fault] = {}
_visits: Counter = Counter()


def parse(spec: str) -> dict[str, Fault]:
    """``point[@n]=action`` items, comma-separated; ValueError names a malformed item."""
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, sep, what = item.partition("=")
        name, _, nth = where.partition("@")
        action, _, arg = what.partition(":")
        ok = sep and name and action in ("kill", "sleep", "raise", "signal", "stop") and (not nth or nth.isdigit())
        if ok and action == "sleep":
            try:
                float(arg)
            except ValueError:
                ok = False
        if ok and action == "raise" and not isinstance(getattr(errno, arg, None), int):
            ok = False
        if ok and action == "signal" and not isinstance(getattr(signal, f"SIG{arg}", None), int):
            ok = False
        if not ok:
            raise ValueError(
                f"{ENV}: cannot read {item!r}; write <point>[@<n>]=kill|sleep:<s>|raise:<ERRNO>|signal:<NAME>|stop"
            )
        faults[name] = Fault(action, arg or None, int(nth) if nth else None)
    return faults


def arm(spec: str) -> None:
    """Arm the points of ``spec`` (replacing what was armed) and start counting visits anew."""
    global _armed
    _armed = parse(spec)
    _visits.clear()


def disarm() -> None:
    arm("")


def point(name: str) -> None:
    """A place where a fault can be injected; does nothing unless ``name`` is armed."""
    if not _armed or name not in _armed:
        return
    _visits[name] += 1
    fault = _armed[name]
    if fault.nth is not None and _visits[name] != fault.nth:
        return
    log.warning(
        "Fault injection at %s (visit %d): %s%s",
        name,
        _visits[name],
        fault.action,
        f":{fault.arg}" if fault.arg else "",
    )
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "stop":  # sent to this thread, so that it stops here and not a few lines on
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    elif fault.action == "sleep":
        time.sleep(float(fault.arg))
    elif fault.action == "signal":
        os.kill(os.getpid(), getattr(signal, f"SIG{fault.arg}"))
    else:
        code = getattr(errno, fault.arg)
        raise OSError(code, f"{os.strerror(code)} (injected at {name})")


arm(os.environ.get(ENV, ""))
