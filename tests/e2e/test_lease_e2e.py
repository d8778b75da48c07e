"""One job per run, end to end: a second process refused while the first holds the lease; a paused holder taken
over writes nothing when it continues."""

import os
import signal
import subprocess
import time

import pytest
from helpers import PYTHON, TINY, attempt_files, env_for, finished_run, stage_runs
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK

pytestmark = pytest.mark.slow


def test_two_resumes_started_together_one_trains_the_other_is_refused(store):
    client = MlflowClient()
    run_id = finished_run(client)
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
