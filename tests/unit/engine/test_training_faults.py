"""Faults while training (docs/reliability.md): real signals at named moments (validation, sample
writing, the final checkpoint), SIGHUP with and without nohup, a DataLoader worker SIGKILLed, and a
run whose job died after its last checkpoint. Each ends committed and resumable, or says why not."""

import signal

import pytest
from helpers import TINY, loss_history, one_run
from mlflow import MlflowClient

from pipeline.common import faults
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

JOB = [*TINY, "trainer.max_steps=8", "checkpoint.save_interval=100", "validation.interval=4"]


@pytest.mark.parametrize("point, sig", [("validation@1", "TERM"), ("samples@1", "INT"), ("validation@1", "HUP")])
def test_a_stop_signal_during_validation_or_samples_commits_that_step_and_resumes(
    store, armed, point, sig, capfd, request
):
    if sig == "HUP" and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        # the suite runs under nohup: the engine leaves an ignored SIGHUP ignored on purpose, which is not tested here
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        request.addfinalizer(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    armed(f"{point}=signal:{sig}")
    assert run_stage(TrainAdapter, JOB) == EXIT_STOPPED
    faults.disarm()
    client = MlflowClient()
    run = one_run(client)
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "signal"
    assert run.data.tags["checkpoint.latest_step"] == "4"  # the step validated when the signal came
    assert f"SIG{sig} received" in capfd.readouterr().err
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [4]
    if sig != "TERM":
        return  # resuming is the same after each signal

    assert run_stage(TrainAdapter, [f"resume_run={run.info.run_id}"]) == EXIT_OK
    run = one_run(client)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "8"
    assert [s for s, _ in loss_history(client, run.info.run_id)] == list(range(1, 9))


def test_a_stop_during_the_final_checkpoint_leaves_the_run_finished(store, armed):
    armed("checkpoint.snapshot@2=signal:TERM")  # the 2nd checkpoint is the last step's
    assert (
        run_stage(TrainAdapter, [*TINY, "trainer.max_steps=4", "checkpoint.save_interval=2", "validation.interval=0"])
        == EXIT_OK
    )
    run = one_run(MlflowClient())
    assert run.info.status == "FINISHED" and "stopped_by" not in run.data.tags
    assert run.data.tags["checkpoint.latest_step"] == "4"


def test_sighup_is_ignored_when_the_job_runs_under_nohup(store, armed):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup leaves the job with
    try:
        armed("validation@1=signal:HUP")
        assert run_stage(TrainAdapter, JOB) == EXIT_OK
    finally:
        signal.signal(signal.SIGHUP, previous)
    run = one_run(MlflowClient())
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "8"


def test_a_run_left_running_after_its_last_checkpoint_is_ended_by_a_resume(store, capfd):
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", "validation.interval=0"]) == EXIT_OK
    client = MlflowClient()
    run_id = one_run(client).info.run_id
    losses = loss_history(client, run_id)
    assert run_stage(TrainAdapter, [f"resume_run={run_id}"]) == EXIT_BAD_INPUT
    assert "Nothing to train" in capfd.readouterr().err

    client.update_run(run_id, status="RUNNING")  # as a job killed between its last commit and ending the run
    assert run_stage(TrainAdapter, [f"resume_run={run_id}"]) == EXIT_OK
    assert "this job only ends it" in capfd.readouterr().err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"
    assert loss_history(client, run_id) == losses  # nothing trained or logged again


def _abandoned_run(client, holder_pid: int, holder_start: float) -> str:
    """A run as a job killed before its first commit leaves it: RUNNING, its lease naming that job, no checkpoint."""
    import socket
    import time

    from pipeline.engine.tracking import experiment_id

    return client.create_run(
        experiment_id(client, "train_adapter"),
        tags={
            "stage": "train_adapter",
            "lease.token": "the-killed-job",
            "lease.host": socket.gethostname(),
            "lease.pid": str(holder_pid),
            "lease.process_start": repr(holder_start),
            "lease.heartbeat": repr(time.time()),
            "lease.holder": f"pid {holder_pid}",
        },
    ).info.run_id


def test_a_resume_of_a_run_whose_job_died_before_its_first_checkpoint_ends_it(store, capfd):
    import psutil

    client = MlflowClient()
    parent = psutil.Process().parent()  # alive: its run is still being trained, and must be left alone
    live = _abandoned_run(client, parent.pid, parent.create_time())
    assert run_stage(TrainAdapter, [f"resume_run={live}"]) == EXIT_BAD_INPUT
    assert "A job is still training it" in capfd.readouterr().err
    assert client.get_run(live).info.status == "RUNNING"

    dead = _abandoned_run(client, 2**22 + 17, 1.0)  # no such process on this machine
    assert run_stage(TrainAdapter, [f"resume_run={dead}"]) == EXIT_BAD_INPUT
    assert "it is now ended FAILED" in capfd.readouterr().err
    run = client.get_run(dead)
    assert run.info.status == "FAILED" and "nothing to resume" in run.data.tags["mlflow.note.content"]
    assert run_stage(TrainAdapter, [f"resume_run={dead}"]) == EXIT_BAD_INPUT  # said once; the run stays FAILED
    assert "ended FAILED" not in capfd.readouterr().err and client.get_run(dead).info.status == "FAILED"


def test_an_artifact_store_that_fails_at_the_end_still_ends_the_run(store, armed, capfd):
    armed("finish.record=raise:ENOSPC")  # the attempt's record (an artifact) cannot be written: a full disk
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", "validation.interval=0"]) == EXIT_OK
    assert "could not be updated ([Errno 28] No space left on device" in capfd.readouterr().err
    run = one_run(MlflowClient())
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == "2"


def test_a_missing_or_unreadable_latest_step_tag_falls_back_to_what_else_names_the_commit(store, capfd):
    from helpers import artifact_dir

    assert (
        run_stage(TrainAdapter, [*TINY, "trainer.max_steps=4", "checkpoint.save_interval=2", "validation.interval=0"])
        == EXIT_OK
    )
    client = MlflowClient()
    run_id = one_run(client).info.run_id
    client.set_tag(run_id, "checkpoint.latest_step", "four")
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=5"]) == EXIT_OK
    err = capfd.readouterr().err
    assert "The checkpoint.latest_step tag of run" in err and "'four', not a step" in err
    assert "per its checkpoint.latest tag is step 4" in err and "Resuming from step 4" in err

    client.delete_tag(run_id, "checkpoint.latest_step")
    client.delete_tag(run_id, "checkpoint.latest")
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=6"]) == EXIT_OK
    err = capfd.readouterr().err
    assert "is missing; the latest committed checkpoint per checkpoints/index.csv is step 5" in err

    client.delete_tag(run_id, "checkpoint.latest_step")
    client.delete_tag(run_id, "checkpoint.latest")
    (artifact_dir(client, run_id) / "checkpoints" / "index.csv").unlink()
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=7"]) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert "has no committed checkpoint" in err and "resume_step=<step> (stored: 4, 5, 6" in err
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "resume_step=6", "trainer.max_steps=7"]) == EXIT_OK
    assert [s for s, _ in loss_history(client, run_id)] == list(range(1, 8))
