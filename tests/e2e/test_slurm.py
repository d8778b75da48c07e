"""Training on a real Slurm (slurmctld + slurmd + munge on loopback, tests/slurm_cluster.py) through
scripts/slurm/train_adapter.sbatch: a job requeued mid-run, or sent SIGUSR1, continues its MLflow run by its job
key, one value per step, every loss equal to an uninterrupted job's, and the run ends FINISHED once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import PYTHON, REPO, TINY, all_runs, loss_history, wait_for
from mlflow import MlflowClient
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "slurm" / "train_adapter.sbatch"
STEPS = ["trainer.max_steps=16", "checkpoint.save_interval=4", "validation.interval=8"]
# Every batch a second slower: the interruption, sent once the test has seen step 6, lands about 10 s before the end
# even on a loaded machine (0.3 s a batch left 3 s, and the SIGUSR1 test failed once under load; its log was lost)
SLOW_STEPS = "data.batch=sleep:1.0"


def submit(cluster: SlurmCluster, workdir: Path, faults: str = "") -> int:
    """sbatch the project's script in ``workdir`` with its own SQLite tracking store; the job ID."""
    workdir.mkdir(parents=True, exist_ok=True)
    MlflowClient(f"sqlite:///{workdir}/mlflow.db").search_experiments()  # the store's tables made before the job and
    # the test's polls open it: two processes creating a new SQLite store at once can fail its schema migration
    exports = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
        "PYTHON": PYTHON,
        "PIPELINE_FAULTS": faults,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_RUN_ID": "",
    }
    export = "ALL," + ",".join(f"{key}={value}" for key, value in exports.items())
    return cluster.sbatch(SCRIPT, *TINY, *STEPS, options=[f"--chdir={workdir}", f"--export={export}"])


def keyed_run(client: MlflowClient, job_id: int):
    """The run the job opened: its job key is slurm:<cluster>:<job id>."""
    runs = [r for r in all_runs(client) if r.data.tags.get("job.key", "").endswith(f":{job_id}")]
    assert len(runs) <= 1, [r.info.run_id for r in runs]
    return runs[0] if runs else None


def job_output(workdir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(workdir.glob("slurm-*.out")))


def finished(cluster: SlurmCluster, job_id: int, workdir: Path) -> dict:
    try:
        return cluster.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{job_output(workdir)[-4000:]}") from None


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):  # noqa: F811
    """The uninterrupted job, submitted at once so that it runs beside the interrupted ones."""
    workdir = tmp_path_factory.mktemp("reference")
    job_id = submit(slurm_cluster, workdir)

    def losses() -> list[tuple[int, float]]:
        info = finished(slurm_cluster, job_id, workdir)
        assert info["JobState"] == "COMPLETED", job_output(workdir)[-4000:]
        client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
        run = keyed_run(client, job_id)
        assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "0"
        return loss_history(client, run.info.run_id)

    return losses


def interrupted(cluster: SlurmCluster, workdir: Path, interrupt, reference) -> tuple:
    """Submit, ``interrupt(job_id)`` once the run has logged step 6, wait for the job to end; the run and its
    attempt records."""
    job_id = submit(cluster, workdir, faults=SLOW_STEPS)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")

    def at_step_6():
        run = keyed_run(client, job_id)
        return run is not None and len(loss_history(client, run.info.run_id)) >= 6

    wait_for(at_step_6, timeout=300, what=f"step 6 of job {job_id}:\n{job_output(workdir)[-3000:]}")
    interrupt(job_id)
    info = finished(cluster, job_id, workdir)
    out = job_output(workdir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-4000:]
    run = keyed_run(client, job_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1", out[-4000:]
    assert "requeue" not in run.data.tags  # waiting no more
    losses = loss_history(client, run.info.run_id)
    assert [step for step, _ in losses] == list(range(1, 17))  # one value per step
    assert losses == reference()  # bit for bit
    assert len(all_runs(client)) == 1
    history = [
        yaml.safe_load((Path(run.info.artifact_uri.removeprefix("file://")) / "config" / name).read_text())
        for name in ("attempt-1.yaml", "attempt-2.yaml")
    ]
    assert history[1]["status"] == "FINISHED" and f"job key slurm:pytest:{job_id}" in history[1]["from"]
    return run, history, out


def test_a_job_requeued_mid_run_continues_its_run_exactly(slurm_cluster, reference, tmp_path):  # noqa: F811
    """`scontrol requeue`: Slurm sends SIGTERM; the job commits a checkpoint and ends the run KILLED; the requeued
    job (same SLURM_JOB_ID) finds the run by its key and trains it to the end."""
    run, history, out = interrupted(
        slurm_cluster, tmp_path, lambda job: slurm_cluster.run("scontrol", "requeue", str(job)), reference
    )
    assert history[0]["status"] == "KILLED (signal)"
    assert "SIGTERM received" in out and "Job key slurm:" in out and "resuming run" in out


def test_sigusr1_to_the_batch_shell_checkpoints_requeues_and_continues_exactly(
    slurm_cluster,
    reference,  # noqa: F811
    tmp_path,
):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@<s> sends before the time limit): the script passes it
    to the training processes, which stop with a checkpoint and run `scontrol requeue` (requeue=scontrol)."""
    run, history, out = interrupted(
        slurm_cluster,
        tmp_path,
        lambda job: slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job)),
        reference,
    )
    assert history[0]["status"] == "KILLED (requeue)"
    assert "SIGUSR1: asking the training processes" in out and "Asked Slurm to requeue job" in out
