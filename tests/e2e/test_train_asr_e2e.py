"""train_asr as a process: started with `mlflow run`, signalled, resumed."""

from __future__ import annotations

import signal
import subprocess

import pytest
from helpers import (
    DEMO_WAV,
    FAKE_RUN_ID,
    PYTHON,
    TINY_ASR,
    artifact_dir,
    env_for,
    loss_history,
    mlflow_run,
    read_until,
    stage_runs,
    start_stage,
)
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_STOPPED

pytestmark = pytest.mark.slow


def test_sigterm_then_mlflow_run_resume_is_bit_identical_and_transcribe_runs(store):
    steps = ["trainer.epochs=10", "validation.interval=5", "checkpoint.save_interval=3"]
    reference = subprocess.run(
        [PYTHON, "-m", "pipeline.stages.train_asr", *TINY_ASR, *steps],
        cwd=store,
        env=env_for(store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    client = MlflowClient()
    (ref_run,) = stage_runs(client, "train_asr")
    expected = loss_history(client, ref_run.info.run_id, "train/loss")
    assert [s for s, _ in expected] == list(range(1, 21))

    proc = start_stage(store, "train_asr", *TINY_ASR, *steps)
    read_until(proc, "step 3/20")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_STOPPED, rest[-3000:]
    run = [r for r in stage_runs(client, "train_asr") if r.info.run_id != ref_run.info.run_id][0]
    stopped_at = int(run.data.tags["checkpoint.latest_step"])
    assert run.info.status == "KILLED" and 3 <= stopped_at < 18  # at least one epoch boundary is left
    assert not (artifact_dir(client, run.info.run_id) / "model").exists()  # only a finished run has its model

    resumed = mlflow_run(store, f"resume_run={run.info.run_id}", entry="train_asr")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert loss_history(client, run.info.run_id, "train/loss") == expected
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED"
    assert final.data.tags["progress"].startswith("Epoch 10/10 · Step 2/2 · resumed from epoch ")
    model = artifact_dir(client, run.info.run_id) / "model"
    assert (model / "MLmodel").exists() and (model / "artifacts" / "step-00000020" / "state.pt").exists()

    done = mlflow_run(
        store, f"run_id={run.info.run_id}", f"input={DEMO_WAV}", entry="transcribe", experiment="train_asr"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{DEMO_WAV}\t" in done.stdout
    unknown = mlflow_run(
        store, f"run_id={FAKE_RUN_ID}", f"input={DEMO_WAV}", entry="transcribe", experiment="train_asr"
    )
    assert unknown.returncode != 0 and "Run 0123456789abcdef0123456789abcdef not found" in unknown.stderr
