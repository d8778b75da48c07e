"""A team's tracking server (pipeline/ops/teamserver.py, docs/team-server.md): real PostgreSQL, a moto S3
server over HTTP and ``mlflow server`` with basic auth on loopback, with artifacts proxied by the server
or read and written by the trainers themselves. A job killed with SIGKILL resumes from another working
directory into the same run, bit-identical to an uninterrupted one; retention really deletes the
bucket's objects; large checkpoints go up in parts; wrong credentials and missing permissions get one
message before anything is written; a dead job's lease is taken over once it expires; outages of the
bucket, the server and the database lose nothing; no secret ends up in a run."""

import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import boto3
import pytest
from helpers import PYTHON, TINY, loss_history, read_until
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK

pytestmark = pytest.mark.slow

USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}
JOB = [
    *TINY,
    "tracking.flush_seconds=1",
    "trainer.max_steps=12",
    "checkpoint.save_interval=2",
    "validation.interval=6",
    "checkpoint.keep_last_n=1",
    "checkpoint.keep_best_k=1",
]
LARGE = "adapter.bottleneck=4096"  # a 12.7 MB state.pt: several parts of 5 MB (proxied) or 8 MB (boto3)
PART = str(5 * 1024**2)  # S3's smallest part


def serve(tmp_path_factory, direct: bool):
    from pipeline.ops.teamserver import TeamServer

    server = TeamServer(tmp_path_factory.mktemp("team"), USERS, direct=direct)
    try:
        server.start_all()
        yield server
    finally:
        server.stop_all()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Artifacts proxied by the server: trainers hold no AWS keys."""
    yield from serve(tmp_path_factory, direct=False)


@pytest.fixture(scope="module")
def direct_team(tmp_path_factory):
    """Artifacts read and written by the trainers themselves (``--no-serve-artifacts``)."""
    yield from serve(tmp_path_factory, direct=True)


def job(
    team, user: str, workdir: Path, *args: str, password: str | None = None, env_extra: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python -m pipeline.stages.train_adapter`` as ``user``, with only the tracking variables a trainer exports."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "AWS_"))}
    env.update(team.trainer_env(user), PYTHONUNBUFFERED="1", **(env_extra or {}))
    if password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = password
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [PYTHON, "-m", "pipeline.stages.train_adapter", *args],
        cwd=workdir,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def finished(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def client_as(team, user: str) -> MlflowClient:
    os.environ.update(team.trainer_env(user))
    return MlflowClient(team.uri)


def killed_after_step_6(team, workdir: Path, *args: str, experiment: str = "train_adapter"):
    """A job as alice, SIGKILLed once it committed step 6; returns alice's client and the job's run."""
    first = job(team, "alice", workdir, *JOB, *args)
    read_until(first, "Committed checkpoint step-00000006")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    client = client_as(team, "alice")
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]


def bucket(team):
    return boto3.client(
        "s3",
        endpoint_url=team.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=team.aws["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=team.aws["AWS_SECRET_ACCESS_KEY"],
    )


def stored_checkpoints(team, run_id: str) -> dict[str, dict]:
    """The run's checkpoint objects in the bucket: ``{"step-00000012/state.pt": head_object(...)}``."""
    s3 = bucket(team)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=team.bucket).get("Contents", [])]
    return {
        key.split("/checkpoints/")[1]: s3.head_object(Bucket=team.bucket, Key=key)
        for key in keys
        if f"/{run_id}/artifacts/checkpoints/step-" in key
    }


def assert_no_secret_in_runs(team, client: MlflowClient) -> None:
    """No secret of the deployment in any param, tag, description, metric name or artifact of the runs."""
    texts = []
    for found in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        texts += [str(found.data.params), str(found.data.tags), str(list(found.data.metrics))]
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(found.info.run_id, "", tmp))
            texts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    assert texts
    for secret in team.secrets():
        assert not any(secret in text for text in texts)


@pytest.fixture(autouse=True)
def no_environment_leak():
    """``client_as`` exports a trainer's tracking variables in this process (as a trainer's shell would); put the
    environment back afterwards, or a later test in this worker would talk to a server that is gone."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_a_job_killed_on_the_team_server_resumes_from_another_machine_bit_identical(team, tmp_path):
    code, err = finished(job(team, "alice", tmp_path / "reference", *JOB, "tracking.experiment=reference"))
    assert code == EXIT_OK, err

    client, run = killed_after_step_6(team, tmp_path / "machine-a")
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
    stored = {key.split("/")[0] for key in stored_checkpoints(team, run_id)}
    best = min(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.value).step
    assert stored == {"step-00000012", f"step-{best:08d}"}

    # bob may read alice's run but not train it
    code, err = finished(job(team, "bob", tmp_path / "bob", f"resume_run={run_id}", "trainer.max_steps=14"))
    assert code == EXIT_BAD_INPUT and "User 'bob' may not write to run" in err and "Traceback" not in err
    assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "12"

    assert_no_secret_in_runs(team, client)


def test_wrong_credentials_get_one_message_before_anything_is_written(team, tmp_path):
    runs_before = len(
        client_as(team, "alice").search_runs([e.experiment_id for e in client_as(team, "alice").search_experiments()])
    )
    code, err = finished(job(team, "alice", tmp_path, *JOB, password="not-the-password"))
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert f"The tracking server {team.uri} refused the credentials of 'alice'" in err
    client = client_as(team, "alice")
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before


def test_the_bucket_then_the_server_then_the_database_down_during_training_lose_nothing(team, tmp_path):
    """S3 stops answering (the server is up), then the tracking server itself, then PostgreSQL alone (the
    server answers with errors): uploads and metrics are retried, training finishes, the run has one value
    per step and its last checkpoint committed."""
    process = job(team, "alice", tmp_path, *JOB, "trainer.max_steps=80", "tracking.experiment=outages")
    lines = read_until(process, "step 20/80")
    team.s3.stop()
    time.sleep(8)
    team.s3.start()
    lines += read_until(process, "step 40/80")
    team.stop()
    time.sleep(8)
    team.start()
    lines += read_until(process, "step 60/80")
    team.postgres.pause()
    time.sleep(8)
    team.postgres.resume()
    code, err = finished(process)
    log = "".join(lines) + err
    assert code == EXIT_OK, log
    assert "trying again every" in log and "succeeded after" in log and "Traceback" not in log
    # the database's outage, after step 60: which requests fall in it depends on timing (a metric batch or a
    # commit is retried until it succeeds; a tag, retention or samples upload is put off with a warning)
    assert "trying again every" in err or "could not" in err.lower(), log
    client = client_as(team, "alice")
    run = client.search_runs([client.get_experiment_by_name("outages").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "80"
    assert [step for step, _ in loss_history(client, run.info.run_id)] == list(range(1, 81))


def test_a_large_checkpoint_goes_through_the_server_in_parts_and_resumes_verified(team, tmp_path):
    """MLflow's proxied multipart upload, as a trainer switches it on: the server hands out presigned URLs
    and the parts go straight to the bucket (an object uploaded in N parts has an ETag ending in -N)."""
    multipart = {
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
        "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": PART,
        "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": PART,
    }
    args = [*JOB, LARGE, "trainer.max_steps=4", "validation.interval=4", "tracking.experiment=multipart"]
    code, err = finished(job(team, "alice", tmp_path / "a", *args, env_extra=multipart))
    assert code == EXIT_OK, err
    client = client_as(team, "alice")
    run_id = client.search_runs([client.get_experiment_by_name("multipart").experiment_id])[0].info.run_id
    state = stored_checkpoints(team, run_id)["step-00000004/state.pt"]
    assert state["ContentLength"] > 12 * 1024**2 and state["ETag"].strip('"').endswith("-3"), state

    # a resume on another machine downloads it, checks its sha256 and trains on
    code, err = finished(job(team, "alice", tmp_path / "b", f"resume_run={run_id}", "trainer.max_steps=6"))
    assert code == EXIT_OK and "Resuming from step" in err, err
    assert [step for step, _ in loss_history(client, run_id)] == list(range(1, 7))


def test_a_crashed_job_on_another_machine_is_taken_over_once_its_lease_expires(team, tmp_path):
    """The killed job's lease names another host (as if it had run there; this test has one machine), so
    its death cannot be seen: while that host's heartbeat goes on, a resume is refused naming it; once the
    heartbeat is older than the timeout, a resume takes the run over and says so in the run's description."""
    client, run = killed_after_step_6(
        team,
        tmp_path / "a",
        "tracking.lease_timeout_seconds=15",
        "tracking.lease_heartbeat_seconds=2",
        "tracking.experiment=expiry",
        experiment="expiry",
    )
    run_id = run.info.run_id
    client.set_tag(run_id, "lease.host", "gpu-node-7")
    client.set_tag(run_id, "lease.holder", "gpu-node-7 pid 4242 since 2026-11-27T09:00:00Z")

    # gpu-node-7 is alive while the first resume starts (however long its imports take on a loaded machine)
    alive = threading.Event()
    alive.set()

    def beat_as_gpu_node_7():
        while alive.is_set():
            client.set_tag(run_id, "lease.heartbeat", f"{time.time():.3f}")
            time.sleep(2)

    beating = threading.Thread(target=beat_as_gpu_node_7, daemon=True)
    beating.start()
    try:
        code, err = finished(job(team, "alice", tmp_path / "b", f"resume_run={run_id}"))
    finally:
        alive.clear()
        beating.join(timeout=30)
    assert code == EXIT_BAD_INPUT and "is being trained by another job: gpu-node-7 pid 4242" in err, err
    beat = float(client.get_run(run_id).data.tags["lease.heartbeat"])  # gpu-node-7 has died now
    time.sleep(max(0.0, beat + 15.5 - time.time()))
    code, err = finished(job(team, "alice", tmp_path / "c", f"resume_run={run_id}"))
    assert code == EXIT_OK and "Taking over the lease" in err, err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "12"
    assert "took over the run from gpu-node-7 pid 4242" in run.data.tags["mlflow.note.content"]
    assert not any(key.startswith("lease.") for key in run.data.tags)  # released at the end


def test_trainers_with_direct_access_to_the_bucket_resume_and_retention_deletes_objects(direct_team, tmp_path):
    """``--no-serve-artifacts``: each trainer reads and writes the bucket with its own keys; MLflow's S3
    repository uploads a large file with boto3's transfer manager, in 8 MB parts."""
    team = direct_team
    client, run = killed_after_step_6(team, tmp_path / "a", LARGE)
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith(f"s3://{team.bucket}/")

    code, err = finished(job(team, "alice", tmp_path / "b", f"resume_run={run_id}"))
    assert code == EXIT_OK and "Resuming from step" in err, err
    assert [step for step, _ in loss_history(client, run_id)] == list(range(1, 13))
    stored = stored_checkpoints(team, run_id)
    best = min(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.value).step
    assert {key.split("/")[0] for key in stored} == {"step-00000012", f"step-{best:08d}"}
    assert stored["step-00000012/state.pt"]["ETag"].strip('"').endswith("-2")
    assert_no_secret_in_runs(team, client)
