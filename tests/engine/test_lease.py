"""One job per run (engine/lease.py): a live holder refuses a second job, naming it; a dead or silent
one is taken over and the takeover recorded; a job whose lease was taken over stops writing."""

import os
import subprocess
import time

import pytest
from mlflow import MlflowClient

from conftest import PYTHON, TINY, env_for, stage_runs
from pipeline.engine.session import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, TrainingHooks, run_stage
from pipeline.stages.train_adapter import TrainAdapter

JOB = [*TINY, "trainer.max_steps=2", "checkpoint.save_interval=2", "validation.interval=0"]


def first_run(client: MlflowClient) -> str:
    assert run_stage(TrainAdapter, JOB) == EXIT_OK
    run_id = stage_runs(client)[0].info.run_id
    assert not any(key.startswith("lease.") for key in client.get_run(run_id).data.tags)  # released at the end
    return run_id


def hold(client: MlflowClient, run_id: str, *, host: str, pid: int, heartbeat_age: float, start: float = 0.0) -> None:
    """The lease tags another job writes."""
    for key, value in {"lease.token": "other-job", "lease.holder": f"{host} pid {pid} since 2026-11-27T10:00:00+00:00",
                       "lease.host": host, "lease.pid": str(pid), "lease.process_start": repr(start),
                       "lease.heartbeat": repr(time.time() - heartbeat_age)}.items():
        client.set_tag(run_id, key, value)


def attempt_files(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, "config") if "attempt-" in a.path)


def test_a_live_holder_refuses_a_second_job_naming_it_and_nothing_is_written(store, capfd):
    client = MlflowClient()
    run_id = first_run(client)
    hold(client, run_id, host="gpu-node-7", pid=4242, heartbeat_age=5)
    before = client.get_run(run_id)
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=4"]) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert f"Run {run_id} is being trained by another job: gpu-node-7 pid 4242 since 2026-11-27T10:00:00+00:00" in err
    assert "Stop that job first" in err
    after = client.get_run(run_id)
    assert after.data.tags == before.data.tags and after.info.status == before.info.status
    assert attempt_files(client, run_id) == ["config/attempt-1.yaml"]


@pytest.mark.parametrize("host, pid, age, why", [
    ("gpu-node-7", 4242, 600, "heartbeat stopped"),  # another machine, silent for 10 minutes
    (None, None, 1, "process is gone"),  # this machine, a process that has exited
])
def test_a_dead_holder_is_taken_over_and_the_takeover_is_recorded(store, capfd, host, pid, age, why):
    import socket

    client = MlflowClient()
    run_id = first_run(client)
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
    code = run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2000", "checkpoint.save_interval=1000",
                                    "validation.interval=0", "tracking.lease_heartbeat_seconds=0.2"], hooks)
    assert code == EXIT_FAILED
    assert "Another job took over the lease of run" in capfd.readouterr().err
    run = client.get_run(hooks.run_id)
    assert run.info.status == "RUNNING" and "checkpoint.latest_step" not in run.data.tags
    assert run.data.tags["lease.token"] == "the-new-holder"
    assert max(m.step for m in client.get_metric_history(hooks.run_id, "train/loss")) < 2000


@pytest.mark.slow
def test_two_resumes_started_together_one_trains_the_other_is_refused(store):
    client = MlflowClient()
    run_id = first_run(client)
    procs = [subprocess.Popen([PYTHON, "-m", "pipeline.train_adapter", f"resume_run={run_id}", "trainer.max_steps=6"],
                              cwd=store, env=env_for(store), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [EXIT_OK, EXIT_BAD_INPUT], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == EXIT_BAD_INPUT)
    winner = next(p.pid for p, (code, _) in zip(procs, results) if code == EXIT_OK)
    assert f"is being trained by another job: {os.uname().nodename} pid {winner}" in refused
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "6"
    assert attempt_files(client, run_id) == ["config/attempt-1.yaml", "config/attempt-2.yaml"]
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 7))  # no step trained by both
