"""Storage faults during a checkpoint (real OSErrors raised at the fault points of engine/faults.py):
the previous checkpoint stays the latest and intact, a transient upload failure is retried, anything
else stops the job cleanly with exit code 4, a message saying what failed, what is kept and how to
resume, and nothing half-written left behind."""

import pytest
from helpers import TINY, artifact_dir, stage_runs
from mlflow import MlflowClient

from pipeline.common import faults
from pipeline.engine.checkpoint_files import verify
from pipeline.engine.checkpointing import list_checkpoints
from pipeline.engine.cli import EXIT_OK, EXIT_STORAGE
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

JOB = [*TINY, "trainer.max_steps=8", "checkpoint.save_interval=2", "validation.interval=0"]


@pytest.fixture(autouse=True)
def unarmed():
    yield
    faults.disarm()


@pytest.mark.parametrize(
    "point, error, says",
    [
        ("checkpoint.serialize", "ENOSPC", "No space left on device"),
        ("checkpoint.fsync", "EIO", "Input/output error"),
        ("checkpoint.sha256", "EROFS", "Read-only file system"),
        ("checkpoint.serialize", "EACCES", "Permission denied"),
    ],
)
def test_a_write_that_fails_stops_the_job_cleanly_and_keeps_the_previous_checkpoint(store, capfd, point, error, says):
    faults.arm(f"{point}@2=raise:{error}")  # the second checkpoint (step 4) cannot be written
    assert run_stage(TrainAdapter, JOB) == EXIT_STORAGE
    client = MlflowClient()
    run = stage_runs(client)[0]
    run_id = run.info.run_id
    err = capfd.readouterr().err
    assert f"writing checkpoint step-00000004 into .checkpoints/{run_id} failed: {says}" in err
    assert "Kept: the committed checkpoint at step 2 (still the latest)" in err
    assert f"resume with: python -m pipeline.stages.train_adapter resume_run={run_id}" in err
    assert run.info.status == "FAILED" and run.data.tags["checkpoint.latest_step"] == "2"
    assert list_checkpoints(client, run_id) == [2]
    verify(artifact_dir(client, run_id) / "checkpoints" / "step-00000002")
    assert not list((store / ".checkpoints" / run_id).glob(".tmp-*"))

    faults.disarm()  # the disk is fixed
    assert run_stage(TrainAdapter, [f"resume_run={run_id}"]) == EXIT_OK
    assert MlflowClient().get_run(run_id).data.tags["checkpoint.latest_step"] == "8"


def test_a_transient_upload_failure_is_retried(store, capfd):
    faults.arm("checkpoint.upload@1=raise:ECONNRESET")
    assert run_stage(TrainAdapter, JOB) == EXIT_OK
    err = capfd.readouterr().err
    assert "Uploading checkpoint step-00000002 to the artifact store of run" in err and "trying again every" in err
    assert "succeeded after" in err
    client = MlflowClient()
    run = stage_runs(client)[0]
    assert run.info.status == "FINISHED" and list_checkpoints(client, run.info.run_id) == [4, 6, 8]


def test_an_upload_that_keeps_failing_stops_the_job_with_nothing_committed(store, capfd):
    faults.arm("checkpoint.upload=raise:EIO")
    assert run_stage(TrainAdapter, [*JOB, "tracking.outage_limit_seconds=2"]) == EXIT_STORAGE
    err = capfd.readouterr().err
    assert "Uploading checkpoint step-00000002 to the artifact store of run" in err
    assert "failed for 2 s (tracking.outage_limit_seconds=2)" in err
    assert "Kept: no checkpoint was committed yet" in err
    client = MlflowClient()
    run = stage_runs(client)[0]
    assert "checkpoint.latest_step" not in run.data.tags and list_checkpoints(client, run.info.run_id) == []


def test_a_failed_retention_delete_does_not_fail_the_job_and_the_next_commit_catches_up(store, capfd):
    faults.arm("checkpoint.retention@1=raise:EIO")  # the first delete (step 2, at the commit of step 6)
    assert run_stage(TrainAdapter, [*JOB, "checkpoint.keep_last_n=2", "checkpoint.keep_best_k=0"]) == EXIT_OK
    assert "Retention could not delete checkpoint step-00000002" in capfd.readouterr().err
    client = MlflowClient()
    assert list_checkpoints(client, stage_runs(client)[0].info.run_id) == [6, 8]
