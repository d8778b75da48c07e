"""One job per run (engine/lease.py): a live holder refuses a second job, naming it; a dead or silent
one is taken over and the takeover recorded; a job whose lease was taken over stops writing."""

import subprocess
import time

import pytest
from helpers import PYTHON, TINY, attempt_files, finished_run
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from pipeline.engine.session import TrainingHooks, run_stage
from pipeline.stages.train_adapter import TrainAdapter

JOB = [*TINY, "trainer.max_steps=2", "checkpoint.save_interval=2", "validation.interval=0"]


def hold(client: MlflowClient, run_id: str, *, host: str, pid: int, heartbeat_age: float, start: float = 0.0) -> None:
    """The lease tags another job writes."""
    for key, value in {
        "lease.token": "other-job",
        "lease.holder": f"{host} pid {pid} since 2026-11-27T10:00:00+00:00",
        "lease.host": host,
        "lease.pid": str(pid),
        "lease.process_start": repr(start),
        "lease.heartbeat": repr(time.time() - heartbeat_age),
    }.items():
        client.set_tag(run_id, key, value)


def test_a_live_holder_refuses_a_second_job_naming_it_and_nothing_is_written(store, capfd):
    client = MlflowClient()
    run_id = finished_run(client)
    hold(client, run_id, host="gpu-node-7", pid=4242, heartbeat_age=5)
    before = client.get_run(run_id)
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=4"]) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert f"Run {run_id} is being trained by another job: gpu-node-7 pid 4242 since 2026-11-27T10:00:00+00:00" in err
    assert "Stop that job first" in err
    after = client.get_run(run_id)
    assert after.data.tags == before.data.tags and after.info.status == before.info.status
    assert attempt_files(client, run_id) == ["config/attempt-1.yaml"]


@pytest.mark.parametrize(
    "host, pid, age, why",
    [
        ("gpu-node-7", 4242, 600, "heartbeat stopped"),  # another machine, silent for 10 minutes
        (None, None, 1, "process is gone"),  # this machine, a process that has exited
    ],
)
def test_a_dead_holder_is_taken_over_and_the_takeover_is_recorded(store, capfd, host, pid, age, why):
    import socket

    client = MlflowClient()
    run_id = finished_run(client)
    if host is None:
        gone = subprocess.Popen([PYTHON, "-c", "pass"])
        gone.wait()
        host, pid = socket.gethostname(), gone.pid
    hold(client, run_id, host=host, pid=pid, heartbeat_age=age)
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=4"]) == EXIT_OK
    assert f"Taking over the lease of run {run_id} from {host} pid {pid}" in capfd.readouterr().err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "4"
    assert f"took over the run from {host} pid {pid}" in run.data.tags["mlflow.note.content"]
    assert why in run.data.tags["mlflow.note.content"]
    assert not any(key.startswith("lease.") for key in run.data.tags)


def test_a_job_whose_lease_is_taken_over_stops_and_leaves_the_run_to_the_new_holder(store, capfd):
    client = MlflowClient()

    class TakenOver(TrainingHooks):
        def on_run_started(self, run_id):
            self.run_id = run_id
            client.set_tag(run_id, "lease.token", "the-new-holder")  # as a job that took the lease over would

    hooks = TakenOver()
    code = run_stage(
        TrainAdapter,
        [
            *TINY,
            "trainer.max_steps=2000",
            "checkpoint.save_interval=1000",
            "validation.interval=0",
            "tracking.lease_heartbeat_seconds=0.2",
        ],
        hooks,
    )
    assert code == EXIT_FAILED
    assert "Another job took over the lease of run" in capfd.readouterr().err
    run = client.get_run(hooks.run_id)
    assert run.info.status == "RUNNING" and "checkpoint.latest_step" not in run.data.tags
    assert run.data.tags["lease.token"] == "the-new-holder"
    # it stopped long before the end, and wrote (at most) what it logged before its heartbeat saw the takeover
    assert max((m.step for m in client.get_metric_history(hooks.run_id, "train/loss")), default=0) < 2000
