"""Sweeps as processes: killed, crashed workers, a shared PostgreSQL study."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import REPO, SWEEP_STAGE, env_for, loss_history
from mlflow import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow


def _sweep_cmd(storage: str, n_trials: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.sweep",
        "stage=train_adapter",
        f"n_trials={n_trials}",
        f"storage={storage}",
        "study=shared",
        *SWEEP_STAGE,
        "sweep.pruner=none",
        *extra,
    ]


def test_two_workers_share_one_study_in_postgresql(tmp_path, postgres):
    url, createdb = postgres
    createdb("optuna")
    createdb("mlflow")
    env = env_for(tmp_path)
    # MLflow gets the plain URL form users type (SQLAlchemy 2.1 reads it as psycopg 3), Optuna psycopg2's.
    tracking_uri = url.replace("postgresql+psycopg2://", "postgresql://") + "/mlflow"
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    subprocess.run(
        [sys.executable, "-c", "from mlflow import MlflowClient; MlflowClient().search_experiments()"],
        env=env,
        check=True,
        capture_output=True,
    )  # create MLflow's tables once, as an admin would
    storage = f"{url}/optuna"
    workers = [
        subprocess.Popen(
            _sweep_cmd(storage, 6), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=400)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 6 and len(study.trials) == 6
    assert sorted(t.number for t in study.trials) == list(range(6))
    client = MlflowClient(tracking_uri=tracking_uri)
    children = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()], "")
        if "trial.number" in r.data.tags
    ]
    assert sorted(int(r.data.tags["trial.number"]) for r in children) == list(range(6))  # none twice
    assert all(r.info.status == "FINISHED" for r in children)
    # both workers really ran trials
    ran = [sum("Trial " in line and ": optim.lr=" in line for line in out.splitlines()) for out in outputs]
    assert all(n >= 1 for n in ran) and sum(ran) == 6, ran


def test_killed_sweep_continues_and_the_killed_trial_resumes_in_its_own_run(tmp_path):
    """SIGTERM to `mlflow run -e sweep` only (the launcher, as `timeout` sends it) stops the trial with a
    checkpoint and leaves no process behind; the same command again continues the study."""
    import psutil

    env = env_for(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    long_stage = ["trainer.max_steps=60", "validation.interval=20", "checkpoint.save_interval=60"]
    cmd = _sweep_cmd(storage, 3, *long_stage)
    launcher = [
        str(Path(sys.executable).parent / "mlflow"),
        "run",
        str(REPO),
        "-e",
        "sweep",
        "--env-manager",
        "local",
        "--experiment-name",
        "sweep",
        "-P",
        "stage=train_adapter",
        "-P",
        "n_trials=3",
        "-P",
        f"storage={storage}",
        "-P",
        "study=shared",
        "-P",
        "overrides=" + " ".join([*SWEEP_STAGE, "sweep.pruner=none", *long_stage]),
    ]
    proc = subprocess.Popen(
        launcher, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "Trial 1:" in "".join(seen[-40:]) and "step 5/60" in line:
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()  # to its end: every process that holds the log has ended
    proc.wait(timeout=120)
    log = "".join(seen) + rest
    assert "is gone: stopping as if it had sent SIGTERM" in log, log[-3000:]
    assert family and not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    study = optuna.load_study(study_name="shared", storage=storage)
    killed = study.trials[1]
    assert killed.state == TrialState.FAIL
    child_id = killed.user_attrs["mlflow_run_id"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    child = client.get_run(child_id)
    assert child.info.status == "KILLED" and child.data.tags["trial.state"] == "INTERRUPTED"
    stopped_at = int(child.data.tags["checkpoint.latest_step"])

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumes trial 1 in its child run {child_id}" in again.stderr
    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    retry = next(t for t in study.trials if t.user_attrs.get("resume_of") == 1)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["mlflow_run_id"] == child_id
    assert retry.params == killed.params
    child = client.get_run(child_id)
    assert child.info.status == "FINISHED" and child.data.tags["trial.state"] == "COMPLETE"
    assert child.data.tags["resume.count"] == "1" and child.data.tags["resume.from"] == f"step {stopped_at}"
    assert [s for s, _ in loss_history(client, child_id)] == list(range(1, 61))
    parent = client.get_run(study.user_attrs["mlflow_parent_run"])
    assert parent.info.status == "FINISHED"


def test_crashed_worker_trial_is_found_stale_and_resumed_in_its_own_run(tmp_path):
    """SIGKILL (no chance to clean up): Optuna's heartbeat marks the trial stale, the next worker
    re-queues it, and it resumes from its last committed checkpoint. The steps logged after that
    checkpoint are logged again with identical values, so the charts stay one line."""
    env = env_for(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cmd = _sweep_cmd(
        storage,
        2,
        "trainer.max_steps=40",
        "validation.interval=20",
        "checkpoint.save_interval=10",
        "sweep.heartbeat_seconds=10",
    )
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, child_id = [], None
    for line in proc.stderr:
        seen.append(line)
        # Kill trial 1 once its run holds a committed checkpoint and metrics logged after it.
        if "Trial 1:" in "".join(seen) and "step" in line and "/40" in line:
            child_id = optuna.load_study(study_name="shared", storage=storage).trials[1].user_attrs.get("mlflow_run_id")
            latest = child_id and client.get_run(child_id).data.tags.get("checkpoint.latest_step")
            if latest and loss_history(client, child_id)[-1][0] > int(latest):
                proc.kill()
                break
    assert proc.wait(timeout=60) == -signal.SIGKILL, "trial 1 ended before it could be killed: " + "".join(seen)[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    crashed = study.trials[1]
    assert crashed.state == TrialState.RUNNING  # nobody could tell Optuna
    assert crashed.user_attrs["mlflow_run_id"] == child_id
    latest = int(client.get_run(child_id).data.tags["checkpoint.latest_step"])
    before = loss_history(client, child_id)
    assert latest < 40 and before[-1][0] > latest
    assert [s for s, _ in before][:latest] == list(range(1, latest + 1))  # no gap before the checkpoint

    # Run again at once, within the heartbeat grace period (4 x 10 s, long enough for the second worker's start-up
    # on a loaded machine): the worker waits it out, then resumes.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Trials [1] were running before this worker started; waiting up to" in again.stderr
    assert f"resumes trial 1 in its child run {child_id}" in again.stderr
    study = optuna.load_study(study_name="shared", storage=storage)
    assert study.trials[1].state == TrialState.FAIL
    retry = study.trials[2]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["mlflow_run_id"] == child_id
    history = loss_history(client, child_id)
    assert sorted({s for s, _ in history}) == list(range(1, 41))
    by_step = {}
    for step, value in history:
        by_step.setdefault(step, set()).add(value)
    assert all(len(values) == 1 for values in by_step.values())  # re-logged steps are identical
    assert client.get_run(child_id).info.status == "FINISHED"
