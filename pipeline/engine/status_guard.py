"""Keep a run's KILLED status after ``mlflow run`` exits.

``mlflow run`` sets the run it created to FAILED whenever the entry point exits non-zero. It means
to skip runs the entry point already ended, but (MLflow 3.17) it compares the status string with
integer codes, so it always overwrites, and a gracefully stopped run would read FAILED in the UI.
When a job under ``mlflow run`` ends KILLED, it starts this small detached process, which waits
for the ``mlflow run`` process to exit and then puts the status back.

    python -m pipeline.engine.status_guard <run_id> <status> <launcher pid>
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import psutil
from mlflow import MlflowClient

from pipeline.engine.launcher_watch import mlflow_run_ancestor

log = logging.getLogger(__name__)

WAIT_SECONDS = 120


def find_launcher_pid() -> int | None:
    """The nearest ancestor process that is ``mlflow run``."""
    proc = mlflow_run_ancestor()
    return proc.pid if proc is not None else None


def spawn(run_id: str, status: str) -> None:
    """Start the guard, detached, if this job runs under ``mlflow run``."""
    pid = find_launcher_pid()
    if pid is None:
        return
    subprocess.Popen(
        [sys.executable, "-m", "pipeline.engine.status_guard", run_id, status, str(pid)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )


def main(run_id: str, status: str, launcher_pid: int) -> None:
    try:
        psutil.Process(launcher_pid).wait(timeout=WAIT_SECONDS)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return
    client = MlflowClient()
    if client.get_run(run_id).info.status != status:
        client.set_terminated(run_id, status)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
