"""A real tracking server (``mlflow server`` on loopback, artifacts proxied through it) killed during
training (docs/reliability.md, Outages): a short outage loses nothing and the job notices within
seconds that the server is back; one longer than ``tracking.outage_limit_seconds`` stops the job
cleanly (exit code 4) and a resume afterwards completes the same run without a gap."""

import re
import subprocess
import threading
import time
from datetime import datetime

import pytest
from helpers import PYTHON, TINY, env_for, loss_history, stage_runs
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_OK, EXIT_STORAGE

JOB = [*TINY, "checkpoint.save_interval=10", "validation.interval=50"]


class Job:
    """``python -m pipeline.stages.train_adapter`` against the server, its log collected line by line."""

    def __init__(self, workdir, uri, *args):
        env = env_for(workdir)
        env["MLFLOW_TRACKING_URI"] = uri
        self.process = subprocess.Popen(
            [PYTHON, "-m", "pipeline.stages.train_adapter", *args],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in list(self.lines)):
            assert self.process.poll() is None, self.log
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.log}"
            time.sleep(0.1)

    def finish(self, timeout: float = 300.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)


def logged_at(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
def test_a_short_outage_of_the_tracking_server_loses_nothing(tracking_server, tmp_path):
    job = Job(tmp_path, tracking_server.uri, *JOB, "trainer.max_steps=150")
    job.wait_for(r"step 30/150")
    tracking_server.stop()
    time.sleep(10)
    back = tracking_server.start()
    assert job.finish() == EXIT_OK, job.log
    assert "trying again every" in job.log and "succeeded after" in job.log and "Traceback" not in job.log
    recovered = [logged_at(line) for line in job.lines if "succeeded after" in line]
    lag = max(recovered) - back  # the last of the stalled calls to get through (reported, not a target)
    client = MlflowClient(tracking_server.uri)
    run = stage_runs(client)[0]
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "150"
    assert [step for step, _ in loss_history(client, run.info.run_id)] == list(range(1, 151)), f"lag {lag:.1f} s"


@pytest.mark.slow
def test_an_outage_longer_than_the_limit_stops_the_job_cleanly_and_a_resume_completes_the_run(
    tracking_server, tmp_path
):
    job = Job(tmp_path, tracking_server.uri, *JOB, "trainer.max_steps=120", "tracking.outage_limit_seconds=4")
    job.wait_for(r"step 30/120")
    tracking_server.stop()
    assert job.finish(timeout=120) == EXIT_STORAGE, job.log
    log = job.log
    assert "failed for" in log and "(tracking.outage_limit_seconds=4)" in log and "Traceback" not in log
    assert "it shows RUNNING until a resume ends it" in log
    run_id = re.search(r"resume with: python -m pipeline.stages.train_adapter resume_run=(\w+)", log).group(1)

    tracking_server.start()
    resumed = Job(tmp_path, tracking_server.uri, f"resume_run={run_id}")
    assert resumed.finish() == EXIT_OK, resumed.log
    client = MlflowClient(tracking_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "120"
    steps = [step for step, _ in loss_history(client, run_id)]
    assert steps == list(range(1, 121)), "one value per step, no gap"
    assert len(stage_runs(client)) == 1
