"""A job stops when the process that launched it is gone (docs/reliability.md, Signals to the launcher).

What ``timeout``, ``docker stop``, Kubernetes and systemd send goes to the launcher only: ``mlflow run``
(which dies of a SIGTERM without passing it on), ``main`` (whose steps are ``mlflow run`` processes in
sessions of their own) or a test's subprocess. The job would train on, re-parented to init. So every
job watches its launcher, and when that process is gone it sends itself SIGTERM: it stops exactly as if
the signal had reached it (the step finishes, a checkpoint is committed, the run ends KILLED with the
resume command), within ``POLL_S`` of the launcher's end.

The launcher is:

- under ``mlflow run`` (``MLFLOW_RUN_ID`` is set): the nearest ``mlflow run`` process among the job's
  ancestors (past the shell an environment manager runs the command in, and past torchrun's agent);
- otherwise the job's parent (a shell, torchrun's agent, a test), unless the job was detached on
  purpose: started under ``nohup`` (SIGHUP ignored) or as the leader of a session of its own (``setsid``). A
  torchrun worker is always the leader of a session of its own (torchrun starts it so): it watches its agent, so a
  node whose agent is killed stops its ranks with a checkpoint instead of training on without one.

A process named in ``PIPELINE_WATCH_PID`` is watched as well: ``main`` names itself there for its steps,
whose ``mlflow run`` processes live in sessions of their own and would outlive a ``main`` that was killed.

It imports only the standard library and psutil (``status_guard`` uses its ``mlflow_run_ancestor``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the launcher is looked at
ALSO_WATCH_ENV = "PIPELINE_WATCH_PID"  # a process whose end stops this job too (main sets it for its steps)
_stop_requested = threading.Event()  # set by the stop handlers: a stop is on its way already


def note_stop_requested() -> None:
    """Called by the signal handlers: the watch then adds no signal of its own (a second one would abort)."""
    _stop_requested.set()


def _is_mlflow_run(proc: psutil.Process) -> bool:
    """``mlflow run ...`` (the CLI script, or ``python -m mlflow run``)."""
    words = proc.cmdline()
    return any(Path(word).name == "mlflow" and words[i + 1 : i + 2] == ["run"] for i, word in enumerate(words))


def mlflow_run_ancestor() -> psutil.Process | None:
    """The nearest ``mlflow run`` process among this process's ancestors, if any."""
    for ancestor in psutil.Process().parents():
        try:
            if ancestor.pid > 1 and _is_mlflow_run(ancestor):
                return ancestor
        except psutil.Error:  # gone, or not ours to read
            continue
    return None


def launcher() -> psutil.Process | None:
    """The process whose end stops this job, or None when there is none to watch (see the module doc)."""
    try:
        me = psutil.Process()
        if os.environ.get("MLFLOW_RUN_ID") and (found := mlflow_run_ancestor()) is not None:
            return found
        torchrun_worker = bool(os.environ.get("TORCHELASTIC_RUN_ID"))  # torchrun starts each worker in a session
        if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN or (os.getsid(0) == os.getpid() and not torchrun_worker):
            return None  # nohup or setsid: detached on purpose
        parent = me.parent()
    except (psutil.Error, OSError) as err:  # a process that vanished while we looked, no /proc
        log.debug("No launcher to watch: %s", err)
        return None
    return parent if parent is not None and parent.pid > 1 else None


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def also_watched() -> psutil.Process | None:
    """The process ``PIPELINE_WATCH_PID`` names, if it is alive."""
    try:
        pid = int(os.environ.get(ALSO_WATCH_ENV, ""))
        return psutil.Process(pid) if pid > 1 and pid != os.getpid() else None
    except (ValueError, psutil.Error):
        return None


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}, {' '.join(proc.cmdline()[:3]) or proc.name()}"
    except psutil.Error:
        return f"pid {proc.pid}"


def watch() -> list[psutil.Process]:
    """Start watching this job's launcher (and ``PIPELINE_WATCH_PID``) in a daemon thread; returns what is
    watched (empty when there is nothing to watch)."""
    procs = [p for p in (launcher(), also_watched()) if p is not None]
    if not procs:
        return []
    names = {proc.pid: _describe(proc) for proc in procs}

    def run() -> None:
        while not (gone := [proc for proc in procs if _gone(proc)]):
            time.sleep(POLL_S)
        if _stop_requested.is_set():
            return
        log.warning(
            "The process that launched this job (%s) is gone: stopping as if it had sent SIGTERM", names[gone[0].pid]
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=run, name="launcher-watch", daemon=True).start()
    return procs
