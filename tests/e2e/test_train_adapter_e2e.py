"""train_adapter as a process: `mlflow run`, SIGTERM, SIGINT and the stop tag, each resumed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess

import pytest
import torch
from helpers import (
    REPO,
    TINY,
    all_runs,
    artifact_dir,
    env_for,
    loss_history,
    mlflow_run,
    read_until,
    run_module,
    stage_runs,
    start_stage,
    wait_for,
)
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_STOPPED

pytestmark = pytest.mark.slow


def checkpoint_dirs(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(p.name for p in (artifact_dir(client, run_id) / "checkpoints").glob("step-*"))


def test_mlflow_run_produces_one_tracked_run_with_committed_checkpoints(store):
    overrides = " ".join(
        TINY
        + [
            "trainer.max_steps=12",
            "checkpoint.save_interval=4",
            "validation.interval=6",
            "checkpoint.keep_last_n=2",
            "checkpoint.keep_best_k=0",
        ]
    )
    proc = mlflow_run(store, f"overrides={overrides}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = all_runs(client)
    assert len(runs) == 1
    run = runs[0]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert (tags["stage"], tags["model"], tags["dataset"]) == ("train_adapter", "tiny", "demo")
    assert tags["checkpoint.latest"] == "checkpoints/step-00000012" and tags["checkpoint.latest_step"] == "12"
    assert tags["progress"].startswith("step 12/12")
    assert tags["resume.count"] == "0" and tags["stop_requested"] == "false"
    assert f"resume_run={run.info.run_id}" in tags["mlflow.note.content"]
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["ssl.name"] == "tiny"
    # metrics by step
    assert [s for s, _ in loss_history(client, run.info.run_id)] == list(range(1, 13))
    for key in ("train/l1", "train/l2", "train/sc", "lr", "grad_norm", "epoch"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 12, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [6, 12]
    assert client.get_metric_history(run.info.run_id, "throughput/samples_per_s")
    # retention keeps the last 2 of 4, 8, 12; the index lists exactly what is kept
    assert checkpoint_dirs(client, run.info.run_id) == ["step-00000008", "step-00000012"]
    art = artifact_dir(client, run.info.run_id)
    with open(art / "checkpoints" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["step-00000008", "step-00000012"]
    assert {"model", "dataset", "epoch", "step", "size", "created", "val/loss"} <= set(rows[0])
    meta = json.loads((art / "checkpoints/step-00000012/meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256((art / "checkpoints/step-00000012/state.pt").read_bytes()).hexdigest()
    assert meta["stage"] == "train_adapter" and meta["step"] == 12 and meta["model_args"]["ssl"]["name"] == "tiny"
    state = torch.load(art / "checkpoints/step-00000012/state.pt", weights_only=True)
    assert set(state["modules"]) == {"adapters"}  # only trainable weights, no frozen encoder
    assert all(".adapter" not in k and k.split(".")[0].isdigit() for k in state["modules"]["adapters"])
    assert (art / "config" / "config.yaml").is_file() and (art / "config" / "attempt-1.yaml").is_file()
    samples = art / "samples" / "step-00000012"
    assert (samples / "index.html").is_file() and list(samples.glob("*_degraded.wav"))
    assert list(samples.glob("*_features.png"))


def test_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(store):
    steps = ["trainer.max_steps=40", "checkpoint.save_interval=15", "validation.interval=10"]
    reference = run_module(store, *TINY, *steps)
    assert reference.returncode == 0, reference.stderr[-3000:]
    client = MlflowClient()
    (ref_run,) = stage_runs(client)
    expected = loss_history(client, ref_run.info.run_id)
    assert [s for s, _ in expected] == list(range(1, 41))

    proc = start_stage(store, "train_adapter", *TINY, *steps)
    read_until(proc, "step 7/40")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_STOPPED, rest[-3000:]
    assert "SIGTERM received" in rest
    run = [r for r in stage_runs(client) if r.info.run_id != ref_run.info.run_id][0]
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "signal"
    stopped_at = int(run.data.tags["checkpoint.latest_step"])
    assert 7 <= stopped_at < 40
    assert [s for s, _ in loss_history(client, run.info.run_id)] == list(range(1, stopped_at + 1))

    resumed = mlflow_run(store, f"resume_run={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = loss_history(client, run.info.run_id)
    assert [s for s, _ in got] == list(range(1, 41))  # one continuous series
    assert got == expected  # bit-identical at every step
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED" and final.data.tags["resume.count"] == "1"
    # the run `mlflow run` created is the attempt record, nested and finished, not a stray
    attempts = [r for r in all_runs(client) if r.data.tags.get("attempt.of") == run.info.run_id]
    assert len(attempts) == 1
    record = attempts[0]
    assert record.info.status == "FINISHED"
    assert record.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert record.data.tags["attempt.checkpoint"] == f"run {run.info.run_id} checkpoint step-{stopped_at:08d}"
    assert "stage" not in record.data.tags  # not counted as a training run
    assert not [r for r in all_runs(client) if r.info.status == "RUNNING"]


def test_stop_tag_stops_mlflow_run_at_a_step_boundary_and_the_run_resumes(store):
    cmd = [
        os.path.join(os.path.dirname(os.sys.executable), "mlflow"),
        "run",
        str(REPO),
        "-e",
        "train_adapter",
        "--env-manager",
        "local",
        "--experiment-name",
        "train_adapter",
        "-P",
        "overrides="
        + " ".join(TINY + ["trainer.max_steps=5000", "checkpoint.save_interval=1000", "validation.interval=1000"]),
    ]
    # stderr goes to a file, not a pipe nobody reads: one log line per step would fill a pipe and block the job
    log = store / "job.log"
    client = MlflowClient()
    client.search_experiments()  # the store's tables first: two processes creating them at once collide
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=store, env=env_for(store), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        run = wait_for(
            lambda: next(iter(r for r in stage_runs(client) if r.data.metrics.get("train/loss")), None),
            timeout=300,
            what="first metrics",
            proc=proc,
            log=log,
        )
        client.set_tag(run.info.run_id, "stop_requested", "true")
        proc.wait(timeout=300)  # a generous wait: how fast a stop is belongs to a benchmark, not a test
    finally:
        proc.kill()
    # `mlflow run` marks its run FAILED on a non-zero exit; the job's status guard restores KILLED
    run = wait_for(
        lambda: (r := client.get_run(run.info.run_id)).info.status == "KILLED" and r, timeout=60, what="KILLED status"
    )
    assert run.data.tags["stopped_by"] == "tag"
    stopped_at = int(run.data.tags["checkpoint.latest_step"])
    assert stopped_at < 5000
    assert len(stage_runs(client)) == 1

    resumed = run_module(store, *TINY, f"resume_run={run.info.run_id}", f"trainer.max_steps={stopped_at + 3}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_requested"] == "false"
    assert [s for s, _ in loss_history(client, run.info.run_id)] == list(range(1, stopped_at + 4))


def test_sigint_stops_gracefully_with_a_committed_checkpoint(store):
    proc = start_stage(
        store,
        "train_adapter",
        *TINY,
        "trainer.max_steps=5000",
        "checkpoint.save_interval=1000",
        "validation.interval=0",
    )
    read_until(proc, "step 3/5000")
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_STOPPED, rest[-3000:]
    client = MlflowClient()
    (run,) = stage_runs(client)
    last_step = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "signal"
    assert run.data.tags["checkpoint.latest_step"] == str(last_step)
    assert f"resume_run={run.info.run_id}" in rest
