"""A team's tracking server (pipeline/teamserver.py, docs/team-server.md): real PostgreSQL, a moto S3
server over HTTP and ``mlflow server`` with basic auth and proxied artifacts on loopback. A job killed
with SIGKILL resumes from another working directory into the same run, bit-identical to an
uninterrupted one; retention really deletes the bucket's objects; wrong credentials and missing
permissions get one message before anything is written; no secret ends up in a run."""

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from conftest import PYTHON, TINY, loss_history, read_until
from pipeline.engine.session import EXIT_BAD_INPUT, EXIT_OK

pytestmark = pytest.mark.slow

USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}
JOB = [*TINY, "tracking.flush_seconds=1", "trainer.max_steps=12", "checkpoint.save_interval=2", "validation.interval=6",
       "checkpoint.keep_last_n=1", "checkpoint.keep_best_k=1"]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    from pipeline.teamserver import TeamServer

    server = TeamServer(tmp_path_factory.mktemp("team"), USERS)
    try:
        server.start_all()
        yield server
    finally:
        server.stop_all()


def job(team, user: str, workdir: Path, *args: str, password: str | None = None) -> subprocess.Popen:
    """``python -m pipeline.train_adapter`` as ``user``, with only the tracking variables a trainer exports."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "AWS_"))}
    env.update(team.trainer_env(user), PYTHONUNBUFFERED="1")
    if password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = password
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([PYTHON, "-m", "pipeline.train_adapter", *args], cwd=workdir, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def finished(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def client_as(team, user: str) -> MlflowClient:
    os.environ.update(team.trainer_env(user))
    return MlflowClient(team.uri)


@pytest.fixture(autouse=True)
def no_credentials_leak():
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_a_job_killed_on_the_team_server_resumes_from_another_machine_bit_identical(team, tmp_path):
    code, err = finished(job(team, "alice", tmp_path / "reference", *JOB, "tracking.experiment=reference"))
    assert code == EXIT_OK, err

    first = job(team, "alice", tmp_path / "machine-a", *JOB)
    read_until(first, "Committed checkpoint step-00000006")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    client = client_as(team, "alice")
    run = client.search_runs([client.get_experiment_by_name("train_adapter").experiment_id])[0]
    run_id = run.info.run_id

    # two resumes started together, each on a fresh machine: one trains, the other is refused naming it
    both = [job(team, "alice", tmp_path / name, f"resume_run={run_id}") for name in ("machine-b", "machine-c")]
    results = sorted(finished(process) for process in both)
    (code, err), (refused, why) = results
    assert code == EXIT_OK, err
    assert refused == EXIT_BAD_INPUT and f"Run {run_id} is being trained by another job" in why, why
    reference = client.search_runs([client.get_experiment_by_name("reference").experiment_id])[0]
    assert loss_history(client, run_id) == loss_history(client, reference.info.run_id)
    assert client.get_run(run_id).info.status == "FINISHED"

    # retention deleted the objects in the bucket: the last checkpoint and the best one are left
    s3 = boto3.client("s3", endpoint_url=team.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=team.aws["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=team.aws["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=team.bucket).get("Contents", [])]
    stored = {key.split("/checkpoints/")[1].split("/")[0] for key in keys
              if f"/{run_id}/artifacts/checkpoints/step-" in key}
    best = min(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.value).step
    assert stored == {"step-00000012", f"step-{best:08d}"}

    # bob may read alice's run but not train it
    code, err = finished(job(team, "bob", tmp_path / "bob", f"resume_run={run_id}", "trainer.max_steps=14"))
    assert code == EXIT_BAD_INPUT and "User 'bob' may not write to run" in err and "Traceback" not in err
    assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "12"

    # no secret of the deployment in any param, tag, description, metric name or artifact of the runs
    texts = []
    for found in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        texts += [str(found.data.params), str(found.data.tags), str(list(found.data.metrics))]
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(found.info.run_id, "", tmp))
            texts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    for secret in team.secrets():
        assert not any(secret in text for text in texts)


def test_wrong_credentials_get_one_message_before_anything_is_written(team, tmp_path):
    runs_before = len(client_as(team, "alice").search_runs(
        [e.experiment_id for e in client_as(team, "alice").search_experiments()]))
    code, err = finished(job(team, "alice", tmp_path, *JOB, password="not-the-password"))
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert f"The tracking server {team.uri} refused the credentials of 'alice'" in err
    client = client_as(team, "alice")
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before


def test_the_bucket_and_then_the_server_down_during_training_lose_nothing(team, tmp_path):
    """S3 stops answering (the server is up), then the tracking server itself: uploads and metrics are
    retried, training finishes, the run has one value per step and its last checkpoint committed."""
    import time

    process = job(team, "alice", tmp_path, *JOB, "trainer.max_steps=60", "tracking.experiment=outages")
    lines = read_until(process, "step 20/60")
    team.s3.stop()
    time.sleep(8)
    team.s3.start()
    lines += read_until(process, "step 40/60")
    team.stop()
    time.sleep(8)
    team.start()
    code, err = finished(process)
    log = "".join(lines) + err
    assert code == EXIT_OK, log
    assert "trying again every" in log and "succeeded after" in log and "Traceback" not in log
    client = client_as(team, "alice")
    run = client.search_runs([client.get_experiment_by_name("outages").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "60"
    assert [step for step, _ in loss_history(client, run.info.run_id)] == list(range(1, 61))
