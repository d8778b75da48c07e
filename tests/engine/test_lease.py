"""One job per run (engine/lease.py): a live holder refuses a second job, naming it; a dead or silent
one is taken over and the takeover recorded; a job whose lease was taken over stops writing."""

import os
import signal
import subprocess
import time

import pytest
from helpers import PYTHON, TINY, env_for, stage_runs
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from pipeline.engine.session import TrainingHooks, run_stage
from pipeline.stages.train_adapter import TrainAdapter

JOB = [*TINY, "trainer.max_steps=2", "checkpoint.save_interval=2", "validation.interval=0"]


def first_run(client: MlflowClient) -> str:
    assert run_stage(TrainAdapter, JOB) == EXIT_OK
    run_id = stage_runs(client)[0].info.run_id
    assert not any(key.startswith("lease.") for key in client.get_run(run_id).data.tags)  # released at the end
    return run_id


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


@pytest.mark.slow
def test_two_resumes_started_together_one_trains_the_other_is_refused(store):
    client = MlflowClient()
    run_id = first_run(client)
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "pipeline.stages.train_adapter", f"resume_run={run_id}", "trainer.max_steps=6"],
            cwd=store,
            env=env_for(store),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
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


def _wait_for(predicate, what: str, limit: float = 300.0):
    deadline = time.monotonic() + limit  # generous: a loaded machine is slow, and no test asserts a duration
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def _store_state(client: MlflowClient, run_id: str, workdir) -> dict:
    """What a paused job could overwrite: every stored checkpoint file's bytes, the metrics, the commit tags."""
    from pipeline.engine.checkpointing import list_checkpoints

    files = {}
    for step in list_checkpoints(client, run_id):
        for name in ("state.pt", "meta.json"):
            path = client.download_artifacts(run_id, f"checkpoints/step-{step:08d}/{name}", str(workdir))
            files[f"{step}/{name}"] = open(path, "rb").read()
    run = client.get_run(run_id)
    return {
        "files": files,
        "status": run.info.status,
        "latest": (run.data.tags.get("checkpoint.latest"), run.data.tags.get("checkpoint.latest_step")),
        "loss": sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train/loss")),
    }


@pytest.mark.slow
def test_a_paused_holder_taken_over_writes_nothing_when_it_continues(tracking_server, tmp_path, monkeypatch):
    """SIGSTOP a job past its lease timeout, let a resume with another LR take the run over and finish it, then
    SIGCONT the first job: it must not commit its pending checkpoint, log a metric or touch the run. (Through a
    tracking server: a job paused inside a SQLite transaction would lock a SQLite store for everyone.)"""
    import psutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    store = tmp_path
    client = MlflowClient()
    settings = [
        *TINY,
        "trainer.max_steps=15",
        "checkpoint.save_interval=5",
        "checkpoint.keep_last_n=10",
        "validation.interval=0",
        "tracking.flush_seconds=600",
        "tracking.lease_timeout_seconds=4",
        "tracking.lease_heartbeat_seconds=0.5",
    ]
    server = dict(env_for(store), MLFLOW_TRACKING_URI=tracking_server.uri)
    env = dict(server, PIPELINE_FAULTS="checkpoint.commit@2=stop")  # step 10 uploaded, not committed
    paused = subprocess.Popen(
        [PYTHON, "-m", "pipeline.stages.train_adapter", *settings],
        cwd=store,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: psutil.Process(paused.pid).status() == psutil.STATUS_STOPPED, "the job to pause itself")
        run_id = stage_runs(client)[0].info.run_id
        assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "5"
        # the lease runs out (4 s without a heartbeat), then another job takes the run over with another LR
        _wait_for(lambda: time.time() - float(client.get_run(run_id).data.tags["lease.heartbeat"]) > 5, "the lease")
        taker = subprocess.run(
            [PYTHON, "-m", "pipeline.stages.train_adapter", f"resume_run={run_id}", "optim.lr=0.003"],
            cwd=store,
            env=server,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
        assert taker.returncode == EXIT_OK, taker.stderr[-3000:]
        assert "Taking over the lease of run" in taker.stderr
        before = _store_state(client, run_id, tmp_path / "before")
        assert before["status"] == "FINISHED" and before["latest"] == ("checkpoints/step-00000015", "15")
        paused.send_signal(signal.SIGCONT)
        err = paused.communicate(timeout=300)[1]
    finally:
        if paused.poll() is None:
            paused.kill()
    assert paused.returncode == EXIT_FAILED, err[-3000:]
    assert "Another job took over the lease of run" in err
    assert _store_state(client, run_id, tmp_path / "after") == before, err[
        -5000:
    ]  # not one byte, metric or tag changed
