"""Auto-resume by job key (``resume=auto job_key=...``) and the SIGUSR1 stop that asks to be requeued, in-process
with a real SQLite tracking store and real signals (the real Slurm is in tests/test_slurm.py)."""

import signal

import pytest
from helpers import TINY, loss_history, snapshot, stage_runs
from mlflow import MlflowClient

from pipeline.common import faults
from pipeline.config import ConfigError
from pipeline.engine import tags as tag
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_REQUEUE
from pipeline.engine.launch import default_job_key, parse_launch
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

ARGS = [*TINY, "trainer.max_steps=6", "checkpoint.save_interval=2", "validation.interval=0"]


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CLUSTER_NAME"):
        monkeypatch.delenv(name, raising=False)


def test_sigusr1_stops_to_be_requeued_and_the_same_key_continues_the_run_exactly(store, capfd):
    """The first launch starts a run tagged with the key; SIGUSR1 (at the second checkpoint) stops it with a
    checkpoint, KILLED and waiting to be requeued, exit 75; the same launch again continues that run to the end,
    bit-identical to a run that never stopped (another key: a new run); a third launch trains nothing."""
    client = MlflowClient()
    faults.arm("checkpoint.snapshot@2=signal:USR1")
    try:
        assert run_stage(TrainAdapter, [*ARGS, "resume=auto", "job_key=exp-1"]) == EXIT_REQUEUE
    finally:
        faults.disarm()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is the engine's only while it trains
    (run,) = stage_runs(client)
    run_id, tags = run.info.run_id, run.data.tags
    assert run.info.status == "KILLED"
    assert tags[tag.JOB_KEY] == "exp-1" and tags[tag.STOPPED_BY] == "requeue" and tags[tag.REQUEUE] == "waiting"
    stopped_at = int(tags[tag.CHECKPOINT_LATEST_STEP])
    assert 4 <= stopped_at < 6
    assert tags[tag.NOTE].startswith("**KILLED · waiting to be requeued**")
    assert "Job key `exp-1`" in tags[tag.NOTE]

    assert run_stage(TrainAdapter, [*ARGS, "resume=auto", "job_key=exp-1"]) == EXIT_OK
    (run,) = stage_runs(client)  # the same run, no other
    assert run.info.status == "FINISHED" and tag.REQUEUE not in run.data.tags and tag.STOPPED_BY not in run.data.tags
    assert "resume=auto, job key exp-1" in run.data.tags[tag.NOTE]

    capfd.readouterr()
    assert run_stage(TrainAdapter, [*ARGS, "resume=auto", "job_key=exp-1"]) == EXIT_OK
    assert f"run {run_id} of train_adapter is already FINISHED" in capfd.readouterr().err
    assert len(stage_runs(client)) == 1 and client.get_run(run_id).data.tags[tag.RESUME_COUNT] == "1"

    assert run_stage(TrainAdapter, [*ARGS, "resume=auto", "job_key=exp-2"]) == EXIT_OK
    reference = stage_runs(client)[-1]
    assert reference.info.run_id != run_id and reference.data.tags[tag.JOB_KEY] == "exp-2"
    resumed = loss_history(client, run_id)
    assert [step for step, _ in resumed] == list(range(1, 7))  # one value per step
    assert resumed == loss_history(client, reference.info.run_id)


def test_a_key_that_names_two_runs_is_refused_naming_both(store, capfd):
    client = MlflowClient()
    experiment = client.create_experiment("train_adapter")
    runs = [
        client.create_run(experiment, tags={tag.STAGE: "train_adapter", tag.JOB_KEY: "twice"}).info.run_id
        for _ in range(2)
    ]
    client.create_run(experiment, tags={tag.STAGE: "train_asr", tag.JOB_KEY: "twice"})  # another stage's: not counted
    before = snapshot(client)
    assert run_stage(TrainAdapter, [*ARGS, "resume=auto", "job_key=twice"]) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert "names 2 runs of train_adapter" in err and all(run_id in err for run_id in runs)
    assert snapshot(client) == before


def test_a_keyed_run_without_a_checkpoint_is_replaced_when_its_job_is_gone_and_refused_while_it_lives(store, capfd):
    import time

    client = MlflowClient()
    experiment = client.create_experiment("train_adapter")
    keyed = {tag.STAGE: "train_adapter", tag.JOB_KEY: "early"}
    alive = client.create_run(
        experiment,
        tags={
            **keyed,
            "lease.token": "x",
            "lease.host": "another-host",
            "lease.holder": "another-host pid 7",
            "lease.heartbeat": repr(time.time()),
        },
    )
    before = snapshot(client)
    assert run_stage(TrainAdapter, [*ARGS, "resume=auto", "job_key=early"]) == EXIT_BAD_INPUT
    assert "is being trained by another job (another-host pid 7) and has no checkpoint yet" in capfd.readouterr().err
    assert snapshot(client) == before

    client.set_tag(alive.info.run_id, "lease.heartbeat", "0")  # its job died long ago
    assert run_stage(TrainAdapter, [*ARGS, "trainer.max_steps=2", "resume=auto", "job_key=early"]) == EXIT_OK
    old = client.get_run(alive.info.run_id)
    assert old.info.status == "FAILED" and tag.JOB_KEY not in old.data.tags
    assert old.data.tags["job.key.abandoned"] == "early"
    new = [r for r in stage_runs(client) if r.info.run_id != alive.info.run_id]
    assert len(new) == 1 and new[0].data.tags[tag.JOB_KEY] == "early" and new[0].info.status == "FINISHED"


def test_requeue_scontrol_outside_slurm_exits_with_the_requeue_code_and_says_why(store, capfd):
    faults.arm("checkpoint.snapshot@1=signal:USR1")
    try:
        code = run_stage(TrainAdapter, [*ARGS, "resume=auto", "job_key=k", "requeue=scontrol"])
    finally:
        faults.disarm()
    assert code == EXIT_REQUEUE
    assert "requeue=scontrol, but this job is not a Slurm job (SLURM_JOB_ID is not set)" in capfd.readouterr().err


@pytest.mark.parametrize(
    "words, message",
    [
        (["resume=yes"], "the only value is resume=auto"),
        (["job_key=a"], "job_key= is read only with resume=auto"),
        (["resume=auto"], "resume=auto needs job_key=<name>"),
        (["resume=auto", "job_key=a", "resume_run=0123"], "leave out resume_run"),
        (["resume=auto", "job_key=a b"], "job_key='a b'"),
        (["requeue=later"], "requeue='later'; choose one of exit, scontrol"),
    ],
)
def test_malformed_auto_resume_words_are_refused_with_what_to_do(words, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_launch(words)


def test_the_default_key_is_the_slurm_job_and_stays_out_of_the_config(monkeypatch):
    assert default_job_key({}) is None
    assert default_job_key({"SLURM_JOB_ID": "41"}) == "slurm:41"
    assert default_job_key({"SLURM_JOB_ID": "41", "SLURM_CLUSTER_NAME": "c"}) == "slurm:c:41"
    array = {"SLURM_JOB_ID": "45", "SLURM_ARRAY_JOB_ID": "44", "SLURM_ARRAY_TASK_ID": "1", "SLURM_CLUSTER_NAME": "c"}
    assert default_job_key(array) == "slurm:c:44_1"  # the task's key, the same when Slurm requeues it
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    launch = parse_launch(["resume=auto", "requeue=scontrol", "batch_size=4"])
    assert (launch.auto_resume, launch.job_key, launch.requeue) == (True, "slurm:41", "scontrol")
    assert launch.overrides == ["batch_size=4"]
    plain = parse_launch(["batch_size=4"])
    assert (plain.auto_resume, plain.job_key, plain.requeue) == (False, None, "exit")
