"""Training under torchrun (docs/distributed.md): 2 ranks on the CPU with gloo, real torchrun and real signals.

The reference is an uninterrupted 2-rank run started the way a user does, ``mlflow run -P nproc=2``; the
interrupted ones get SIGTERM at the torchrun launcher, or lose a rank to SIGKILL under --max-restarts.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch
from helpers import PYTHON, TINY, all_runs, env_for, loss_history, mlflow_run, read_until, stage_runs, wait_for
from mlflow import MlflowClient

from pipeline.engine.checkpointing import download_checkpoint
from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.launcher import command
from pipeline.stages.train_adapter import TrainAdapter

STEPS = ["trainer.max_steps=20", "validation.interval=5", "checkpoint.save_interval=5"]
VOCODER = [
    "ssl=tiny",
    "vocoder=tiny",
    "batch_size=2",
    "data.segment_seconds=0.5",
    "optim.lr=1e-3",
    "trainer.log_interval=1",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "tracking.stop_poll_seconds=0.5",
    "trainer.max_steps=8",
    "validation.interval=4",
    "checkpoint.save_interval=2",
]


# Every batch 0.2 s slower (no change to what it computes): a signal sent after step k lands well before the end.
SLOW_STEPS = "data.batch=sleep:0.2"


def torchrun(workdir: Path, stage: str, *args: str, options: str = "", faults: str = "") -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 --standalone [options] -m pipeline.stages.<stage> ARGS``, stderr readable;
    ``faults`` arms fault points (PIPELINE_FAULTS) in every rank."""
    env = env_for(workdir)
    if faults:
        env["PIPELINE_FAULTS"] = faults
    return subprocess.Popen(
        command(stage, 2, options, list(args)),
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker process torchrun started for ``rank``."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "pipeline." in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {launcher.pid})")


def stop_and_resume(store: Path, stage: str, args: list[str], stop_after: str, total: int):
    """A 2-rank job sent SIGTERM at the launcher after ``stop_after``, then resumed with torchrun; returns the run."""
    proc = torchrun(store, stage, *args, faults=SLOW_STEPS)
    read_until(proc, stop_after)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert "SIGTERM received" in rest, rest[-3000:]
    client = MlflowClient()
    runs = stage_runs(client, stage)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "signal", rest[-3000:]
    stopped_at = int(run.data.tags["checkpoint.latest_step"])
    assert 1 <= stopped_at < total
    assert [s for s, _ in loss_history(client, run.info.run_id)] == list(range(1, stopped_at + 1))
    resumed = torchrun(store, stage, *args, f"resume_run={run.info.run_id}")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"Resuming from step {stopped_at}" in err
    return client.get_run(run.info.run_id), stopped_at


def logged_twice_differently(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    values: dict[int, set[float]] = {}
    for m in client.get_metric_history(run_id, key):
        values.setdefault(m.step, set()).add(m.value)
    return [step for step, seen in values.items() if len(seen) > 1]


# --------------------------------------------------------------------------------------------
# Data shares (no processes)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# train_adapter on two ranks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank run, started with `mlflow run -P nproc=2`: its directory, run and losses."""
    root = tmp_path_factory.mktemp("two-ranks")
    done = mlflow_run(root, "nproc=2", "overrides=" + " ".join(TINY + STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = stage_runs(client)
    return {"root": root, "client": client, "run": run, "losses": loss_history(client, run.info.run_id)}


@pytest.mark.slow
def test_mlflow_run_with_two_processes_logs_one_run_with_the_effective_batch_and_every_ranks_random_state(reference):
    run, client = reference["run"], reference["client"]
    assert run.info.status == "FINISHED"
    assert [s for s, _ in reference["losses"]] == list(range(1, 21))
    assert run.data.params["world_size"] == "2" and run.data.params["effective_batch_size"] == "8"
    assert run.data.tags["world_size"] == "2" and run.data.tags["effective_batch_size"] == "8"
    note = run.data.tags["mlflow.note.content"]
    assert "Effective batch: 8 (4 per rank × 2 ranks)" in note and f"-P nproc=2 -P resume_run={run.info.run_id}" in note
    assert len(all_runs(client)) == 1  # rank 1 made no run of its own
    state = torch.load(
        download_checkpoint(client, run.info.run_id, 20, reference["root"] / "ckpt") / "state.pt", weights_only=True
    )
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])  # seeded per rank


@pytest.mark.slow
def test_two_ranks_stopped_by_sigterm_at_torchrun_resume_bit_identical_in_the_same_run(store, reference):
    run, stopped_at = stop_and_resume(store, "train_adapter", TINY + STEPS, "step 7/20", 20)
    client = MlflowClient()
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"
    assert loss_history(client, run.info.run_id) == reference["losses"]  # every value, bit for bit
    assert loss_history(client, run.info.run_id, "val/loss") == loss_history(
        reference["client"], reference["run"].info.run_id, "val/loss"
    )
    assert not logged_twice_differently(client, run.info.run_id)
    assert len(all_runs(client)) == 1 and stopped_at >= 7


@pytest.mark.slow
def test_an_elastic_restart_after_a_rank_is_killed_resumes_the_same_run_by_itself(store, reference):
    proc = torchrun(store, "train_adapter", *TINY, *STEPS, options="--max-restarts=1", faults=SLOW_STEPS)
    read_until(proc, "step 12/20")  # past the checkpoint at step 10
    worker(proc, 1).send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "Elastic restart 1 of at most 1: continuing run" in err
    client = MlflowClient()
    (run,) = stage_runs(client)
    assert f"continuing run {run.info.run_id}" in err
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"
    assert run.data.tags["resume.from"] in {f"step {s}" for s in (10, 15)}
    assert loss_history(client, run.info.run_id) == reference["losses"]
    assert not logged_twice_differently(client, run.info.run_id)
    assert len(all_runs(client)) == 1


@pytest.mark.slow
def test_one_rank_with_the_same_effective_batch_trains_the_same_to_within_float_rounding(store, reference):
    """batch_size=8 on one process vs 4 on each of two: the same examples per step, and DDP averages the two
    halves' gradients. Only the order of float additions differs: every loss agrees to 1e-4 relative."""
    args = [a for a in TINY if not a.startswith("batch_size=")]
    assert run_stage(TrainAdapter, [*args, "batch_size=8", *STEPS]) == EXIT_OK
    client = MlflowClient()
    (run,) = stage_runs(client)
    one = loss_history(client, run.info.run_id)
    two = reference["losses"]
    assert [s for s, _ in one] == [s for s, _ in two]
    assert max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(one, two)) < 1e-4


@pytest.mark.slow
def test_resuming_two_ranks_on_one_says_what_changes_and_goes_on_from_the_same_step(reference, capfd, monkeypatch):
    monkeypatch.chdir(reference["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{reference['root']}/mlflow.db")
    run_id = reference["run"].info.run_id
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=24"]) == EXIT_OK
    assert (
        "The checkpoint was trained on 2 rank(s), this job has 1: the effective batch is now 4 (4 per rank x 1) "
        "instead of 8"
    ) in capfd.readouterr().err
    client = reference["client"]
    assert [s for s, _ in loss_history(client, run_id)] == list(range(1, 25))
    run = client.get_run(run_id)
    assert run.data.tags["world_size"] == "1" and run.data.params["world_size"] == "2"  # the param is the first's


# --------------------------------------------------------------------------------------------
# A vocoder stage (two optimizers, three DDP modules) on two ranks
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_vocoder_on_two_ranks_resumes_bit_identical_after_sigterm(tmp_path, store):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    ref = torchrun(reference_dir, "pretrain_vocoder", *VOCODER)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    ref_client = MlflowClient(f"sqlite:///{reference_dir}/mlflow.db")
    (ref_run,) = stage_runs(ref_client, "pretrain_vocoder")
    run, _ = stop_and_resume(store, "pretrain_vocoder", VOCODER, "step 3/8", 8)
    client = MlflowClient()
    for key in ("train/loss", "train/d_loss", "train/mel"):
        assert loss_history(client, run.info.run_id, key) == loss_history(ref_client, ref_run.info.run_id, key), key
    assert [s for s, _ in loss_history(client, run.info.run_id)] == list(range(1, 9))
    assert not logged_twice_differently(client, run.info.run_id)
    assert run.info.status == "FINISHED" and len(all_runs(client)) == 1


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step_with_a_committed_checkpoint(store):
    proc = torchrun(
        store,
        "train_adapter",
        *TINY,
        "trainer.max_steps=5000",
        "validation.interval=0",
        "checkpoint.save_interval=1000",
    )
    read_until(proc, "step 3/5000")
    worker(proc, 1).send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "[rank 1] pipeline.engine.stopping: SIGTERM received" in err, err[-3000:]
    client = MlflowClient()
    (run,) = stage_runs(client)
    last = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "signal"
    assert run.data.tags["checkpoint.latest_step"] == str(last)  # rank 0 stopped at rank 1's step and saved it
    assert (
        f"Resume with: torchrun --nproc_per_node=2 -m pipeline.stages.train_adapter resume_run={run.info.run_id}" in err
    )


@pytest.mark.slow
def test_a_stop_under_an_elastic_agent_exits_zero_so_the_agent_does_not_restart_it(store):
    """The stop tag on a run trained with --max-restarts=1: the workers end it KILLED and exit 0 (an exit code 3
    would make torchrun restart the group, which would resume the run the user just stopped)."""
    proc = torchrun(
        store,
        "train_adapter",
        *TINY,
        "trainer.max_steps=5000",
        "validation.interval=0",
        "checkpoint.save_interval=1000",
        options="--max-restarts=1",
    )
    read_until(proc, "step 3/5000")
    client = MlflowClient()
    (run,) = stage_runs(client)
    client.set_tag(run.info.run_id, "stop_requested", "true")
    _, err = proc.communicate(timeout=300)  # a generous wait, not a time limit
    assert proc.returncode == 0, err[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "tag"
    assert "Elastic restart" not in err


# --------------------------------------------------------------------------------------------
# Two torchrun agents as two nodes (c10d rendezvous on loopback), found again by their job key
# --------------------------------------------------------------------------------------------


def two_nodes(workdir: Path, port: int, *args: str, faults: str = "") -> list[subprocess.Popen]:
    """Two torchrun agents with ``--nnodes=2`` and one worker each, meeting at a c10d rendezvous on loopback, as
    ``srun`` starts one per node of a Slurm job (scripts/slurm/train_adapter.sbatch); each through the launcher."""
    env = {**env_for(workdir), "OMP_NUM_THREADS": "1"}  # as torchrun sets it for the reference's 2 local workers
    if faults:
        env["PIPELINE_FAULTS"] = faults
    options = f"--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{port} --rdzv-id=two-nodes-{port}"
    return [
        subprocess.Popen(
            [PYTHON, "-m", "pipeline.launcher", "--nproc=1", f"--torchrun={options}", "train_adapter", *args],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        for log in (open(workdir / "node-0.log", "w"), open(workdir / "node-1.log", "w"))
    ]


@pytest.mark.slow
def test_two_nodes_continue_their_run_by_job_key_bit_identical_after_one_agent_is_killed(store, reference):
    """SIGKILL to one node's torchrun agent mid-run: its worker stops (it watches its agent), both ranks agree on
    the step and commit a checkpoint; the same two commands again (resume=auto, the same job key, as a requeued
    Slurm job runs them) continue the same run to the end, every loss equal to the uninterrupted 2-rank run's."""
    from pipeline.ops.localserver import free_port

    client = MlflowClient()
    args = [*TINY, *STEPS, "resume=auto", "job_key=two-nodes"]
    nodes = two_nodes(store, free_port(), *args, faults=SLOW_STEPS)
    logs = lambda: "".join((store / f"node-{i}.log").read_text() for i in (0, 1))  # noqa: E731

    def trained(step: int) -> bool:
        runs = stage_runs(client)
        return bool(runs) and len(loss_history(client, runs[0].info.run_id)) >= step

    wait_for(lambda: trained(12), timeout=300, what="step 12 of the two-node job", proc=nodes[1])
    nodes[1].send_signal(signal.SIGKILL)
    nodes[0].wait(timeout=300)
    (run,) = stage_runs(client)
    assert run.info.status == "KILLED" and run.data.tags["job.key"] == "two-nodes", logs()[-4000:]
    stopped_at = int(run.data.tags["checkpoint.latest_step"])
    assert 12 <= stopped_at < 20

    again = two_nodes(store, free_port(), *args)
    assert [node.wait(timeout=300) for node in again] == [0, 0], logs()[-4000:]
    assert f"Job key two-nodes: resuming run {run.info.run_id}" in logs()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"
    assert len(all_runs(client)) == 1
    assert loss_history(client, run.info.run_id) == reference["losses"]
    assert not logged_twice_differently(client, run.info.run_id)


# --------------------------------------------------------------------------------------------
# A sweep whose trials each train on two ranks
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_run_sweep_with_nproc_trains_every_trial_on_two_ranks_and_prunes_on_all(store):
    import optuna

    space = [
        "sweep.space.optim.lr='choice(0.0, 0.03)'",
        "sweep.space.adapter.bottleneck=none",
        "sweep.space.optim.weight_decay=none",
        "sweep.pruner_startup_trials=1",
        "sweep.sampler_seed=0",
    ]
    stage = TINY + ["trainer.max_steps=9", "validation.interval=3", "checkpoint.save_interval=9"]
    done = mlflow_run(
        store,
        "nproc=2",
        "n_trials=3",
        f"storage=sqlite:///{store}/optuna.db",
        "study=two-ranks",
        "overrides=" + " ".join(stage + space),
        entry="sweep",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="two-ranks", storage=f"sqlite:///{store}/optuna.db")
    assert {t.state.name for t in study.trials} == {"COMPLETE", "PRUNED"}, [t.state for t in study.trials]
    client = MlflowClient()
    children = stage_runs(client)
    assert len(children) == 3  # one run per trial: rank 1 made none
    for trial in study.trials:
        child = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert child.data.tags["world_size"] == "2" and child.data.tags["trial.state"] == trial.state.name
        if trial.state.name == "PRUNED":  # rank 0's pruning decision stopped both ranks at the same step
            assert child.data.tags["stopped_by"] == "pruned"
            last = max(m.step for m in client.get_metric_history(child.info.run_id, "train/loss"))
            assert int(child.data.tags["checkpoint.latest_step"]) == last < 9
        else:
            assert trial.state.name == "COMPLETE" and child.info.status == "FINISHED"


# --------------------------------------------------------------------------------------------
# The other stages start and finish on two ranks
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_asr_by_epochs_on_two_ranks_logs_its_final_model_once(store):
    proc = torchrun(
        store,
        "train_asr",
        "asr=tiny",
        "batch_size=2",
        "max_samples=8",
        "optim.warmup_steps=2",
        "trainer.log_interval=1",
        "tracking.system_metrics=false",
        "trainer.epochs=2",
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    client = MlflowClient()
    (run,) = stage_runs(client, "train_asr")
    # 8 utterances, 2 per rank: 2 global batches per epoch
    assert [s for s, _ in loss_history(client, run.info.run_id)] == [1, 2, 3, 4]
    assert run.info.status == "FINISHED" and run.data.tags["effective_batch_size"] == "4"
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(all_runs(client)) == 1


@pytest.mark.slow
def test_finetune_vocoder_on_two_ranks_trains_and_exports_the_chain_from_rank_0(store):
    from pipeline.stages.pretrain_vocoder import PretrainVocoder

    common = [
        "batch_size=2",
        "data.segment_seconds=0.5",
        "trainer.log_interval=1",
        "tracking.system_metrics=false",
        "trainer.max_steps=4",
        "validation.interval=2",
        "checkpoint.save_interval=2",
    ]
    assert run_stage(TrainAdapter, ["ssl=tiny", "adapter.bottleneck=16", *common]) == EXIT_OK
    assert run_stage(PretrainVocoder, ["ssl=tiny", "vocoder=tiny", *common]) == EXIT_OK
    client = MlflowClient()
    adapter, vocoder = stage_runs(client)[0].info.run_id, stage_runs(client, "pretrain_vocoder")[0].info.run_id
    proc = torchrun(store, "finetune_vocoder", f"adapter_run={adapter}", f"vocoder_run={vocoder}", *common)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    (run,) = stage_runs(client, "finetune_vocoder")
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [s for s, _ in loss_history(client, run.info.run_id)] == [1, 2, 3, 4]
    state = torch.load(download_checkpoint(client, run.info.run_id, 4, store / "ckpt") / "state.pt", weights_only=True)
    assert len(state["rank_rng"]) == 2
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}  # the chain, exported by rank 0
