"""The vocoder stages as processes: started, signalled and resumed."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import (
    REPO,
    TINY_VOCODER,
    VENV_BIN,
    VOCODER_TRAIN_KEYS,
    env_for,
    loss_history,
    only_run,
    read_until,
    stage_runs,
    start_stage,
)
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_OK, EXIT_STOPPED

pytestmark = pytest.mark.slow


def test_sigterm_then_resume_gives_bit_identical_gan_losses(store):
    steps = ["trainer.max_steps=16", "checkpoint.save_interval=5", "validation.interval=6", "validation.num_samples=1"]
    reference = start_stage(store, "pretrain_vocoder", *TINY_VOCODER, *steps)
    err = reference.stderr.read()
    assert reference.wait(timeout=300) == EXIT_OK, err[-3000:]
    client = MlflowClient()
    ref_id = only_run(client, "pretrain_vocoder")

    proc = start_stage(store, "pretrain_vocoder", *TINY_VOCODER, *steps)
    read_until(proc, "step 3/16")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_STOPPED, rest[-3000:]
    run = [r for r in stage_runs(client, "pretrain_vocoder") if r.info.run_id != ref_id][0]
    stopped_at = int(run.data.tags["checkpoint.latest_step"])
    assert run.info.status == "KILLED" and 3 <= stopped_at < 16

    cmd = [
        os.path.join(VENV_BIN, "mlflow"),
        "run",
        str(REPO),
        "-e",
        "pretrain_vocoder",
        "--env-manager",
        "local",
        "--experiment-name",
        "pretrain_vocoder",
        "-P",
        f"resume_run={run.info.run_id}",
    ]
    resumed = subprocess.run(cmd, cwd=store, env=env_for(store), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in (*VOCODER_TRAIN_KEYS, "val/mel"):
        expected = loss_history(client, ref_id, key)
        assert loss_history(client, run.info.run_id, key) == expected, key  # both optimizers restored exactly
    assert [s for s, _ in loss_history(client, run.info.run_id, "train/d_loss")] == list(range(1, 17))
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED" and final.data.tags["resume.count"] == "1"
