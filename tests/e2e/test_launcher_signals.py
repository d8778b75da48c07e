"""A stop signal sent to the launcher only (what `timeout`, `docker stop`, Kubernetes and systemd do) reaches
the job (engine/launcher_watch.py, main's StopForwarder): the job commits a checkpoint, its run ends KILLED,
no process of it is left, and resume_run continues it bit-identically."""

import signal
import subprocess

import psutil
import pytest
from helpers import TINY, env_for, loss_history, mlflow_command, read_until, stage_runs, wait_for
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

SLOW_STEPS = "data.batch=sleep:0.3"  # fault point: each batch a little slower, so the signal lands mid-run


def start_mlflow_run(workdir, entry: str, **params: str) -> subprocess.Popen:
    cmd = mlflow_command(entry, *(f"{key}={value}" for key, value in params.items()))
    env = dict(env_for(workdir), PIPELINE_FAULTS=SLOW_STEPS)
    return subprocess.Popen(cmd, cwd=workdir, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def terminate_launcher_only(proc: subprocess.Popen, needle: str) -> tuple[list[psutil.Process], str]:
    """Wait for ``needle`` in the job's log, SIGTERM the launcher alone, then read the log to its end (every
    process that holds it has ended). Returns the launcher's descendants as they were, and the log."""
    seen = read_until(proc, needle, timeout=300)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "the launcher started no job"
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()  # EOF: the launcher and every process that inherited its stderr are gone
    proc.wait(timeout=60)
    return family, "".join(seen) + rest


def assert_none_left(family: list[psutil.Process]) -> None:
    def gone() -> bool:
        return not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(gone, timeout=60, what="every process of the job to end")


@pytest.mark.slow
def test_sigterm_to_mlflow_run_stops_the_job_which_resumes_bit_identically(store):
    steps = ["trainer.max_steps=12", "checkpoint.save_interval=100", "validation.interval=0"]
    proc = start_mlflow_run(store, "train_adapter", overrides=" ".join([*TINY, *steps]))
    family, log = terminate_launcher_only(proc, "step 3/12")
    assert_none_left(family)
    assert "The process that launched this job" in log and "is gone: stopping as if it had sent SIGTERM" in log
    assert '`mlflow run` reports every exit code but 0 as "failed"; this job exits 3' in log  # not a failure
    client = MlflowClient()
    (run,) = stage_runs(client)
    run_id = run.info.run_id
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "signal", log[-3000:]
    stopped_at = int(run.data.tags["checkpoint.latest_step"])
    assert 3 <= stopped_at < 12
    assert [s for s, _ in loss_history(client, run_id)] == list(range(1, stopped_at + 1))

    assert run_stage(TrainAdapter, [f"resume_run={run_id}"]) == EXIT_OK
    assert run_stage(TrainAdapter, [*TINY, *steps]) == EXIT_OK  # the reference: a job that never stopped
    reference = [r for r in stage_runs(client) if r.info.run_id != run_id][0].info.run_id
    assert loss_history(client, run_id) == loss_history(client, reference)
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sigterm_to_mlflow_run_main_stops_the_running_step_and_main(store):
    words = [
        "train_adapter.trainer.max_steps=12",
        "train_adapter.trainer.log_interval=1",
        "train_adapter.checkpoint.save_interval=100",
        "train_adapter.validation.interval=0",
    ]
    proc = start_mlflow_run(store, "main", overrides=" ".join(words))
    family, log = terminate_launcher_only(proc, "step 3/12")
    assert_none_left(family)
    assert "passing it to the running step" in log, log[-3000:]
    client = MlflowClient()
    (main,) = stage_runs(client, "main")
    assert main.info.status == "KILLED"
    # `mlflow run` of the step sets its run FAILED on exit; the job's status guard puts KILLED back right after
    wait_for(lambda: stage_runs(client, "train_adapter")[0].info.status == "KILLED", timeout=60, what="KILLED")
    (step,) = stage_runs(client, "train_adapter")
    assert step.data.tags["stopped_by"] == "signal", log[-3000:]
    assert not stage_runs(client, "pretrain_vocoder")  # the chain went no further
    stopped_at = int(step.data.tags["checkpoint.latest_step"])
    assert 3 <= stopped_at < 12

    run_id = step.info.run_id
    assert run_stage(TrainAdapter, [f"resume_run={run_id}"]) == EXIT_OK
    overrides = main.data.params["train_adapter.overrides"].split()  # what main gave the step
    assert run_stage(TrainAdapter, overrides) == EXIT_OK
    reference = [r for r in stage_runs(client) if r.info.run_id != run_id][0].info.run_id
    assert [s for s, _ in loss_history(client, run_id)] == list(range(1, 13))
    assert loss_history(client, run_id) == loss_history(client, reference)
