"""engine/launcher_watch.py with real processes: a job whose launcher is gone sends itself SIGTERM, unless it
was detached on purpose (nohup); a process named in PIPELINE_WATCH_PID is watched as well."""

import os
import signal
import subprocess
import sys
import time

import psutil
from helpers import wait_for

# A stand-in job: it watches its launcher as a stage does and, on SIGTERM, writes a marker and exits.
JOB = """
import signal, sys, time
from pathlib import Path
from pipeline.engine import launcher_watch
marker = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *a: (marker.write_text("SIGTERM"), sys.exit(3)))
watched = launcher_watch.watch()
Path(str(marker) + ".ready").write_text(" ".join(str(p.pid) for p in watched))
time.sleep(120)
"""

# A launcher that starts the job and waits (as `mlflow run` or a test does); ``nohup`` ignores SIGHUP first, a plain
# one takes SIGHUP's default whatever the test run inherited (pytest itself may have been started under nohup).
LAUNCHER = """
import signal, subprocess, sys
signal.signal(signal.SIGHUP, signal.SIG_IGN if sys.argv[1] == "nohup" else signal.SIG_DFL)
job = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[3]])
print(job.pid, flush=True)
sys.exit(job.wait())
"""


def start(tmp_path, mode: str = "plain", env: dict | None = None) -> tuple[subprocess.Popen, psutil.Process, object]:
    marker = tmp_path / f"stopped-{mode}"
    base = {key: value for key, value in os.environ.items() if key != "PIPELINE_WATCH_PID"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, mode, JOB, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
        env={**base, **(env or {})},
    )
    job = psutil.Process(int(launcher.stdout.readline()))
    wait_for(lambda: (tmp_path / f"stopped-{mode}.ready").exists(), timeout=120, what="the job to start watching")
    return launcher, job, marker


def test_a_job_whose_launcher_is_killed_stops_as_if_sent_sigterm(tmp_path):
    launcher, job, marker = start(tmp_path)
    assert (tmp_path / "stopped-plain.ready").read_text() == str(launcher.pid)  # it watches its launcher
    launcher.kill()  # SIGKILL: the launcher cannot pass anything on
    launcher.wait()
    wait_for(marker.exists, timeout=60, what="the job to stop")
    assert marker.read_text() == "SIGTERM"
    job.wait(timeout=60)


def test_a_job_started_under_nohup_outlives_its_launcher(tmp_path):
    launcher, job, marker = start(tmp_path, "nohup")
    assert (tmp_path / "stopped-nohup.ready").read_text() == ""  # detached on purpose: nothing watched
    launcher.kill()
    launcher.wait()
    time.sleep(3)  # three watch periods: a watched job would have stopped by now
    assert job.is_running() and not marker.exists()
    job.kill()


def test_a_process_named_in_pipeline_watch_pid_is_watched_too(tmp_path):
    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands for `main`
    try:
        launcher, job, marker = start(tmp_path, env={"PIPELINE_WATCH_PID": str(main.pid)})
        assert (tmp_path / "stopped-plain.ready").read_text().split() == [str(launcher.pid), str(main.pid)]
        main.send_signal(signal.SIGKILL)
        main.wait()
        wait_for(marker.exists, timeout=60, what="the job to stop")
        assert launcher.wait(timeout=60) == 3  # the job's own exit code, after its SIGTERM handler ran
    finally:
        main.kill()
