"""A job stopped by a signal and resumed trains on exactly as one that never stopped, with the log-mel front end's
cleaner and with the Vocos-style generator (its GAN steps included): every step's losses equal to the last bit."""

from __future__ import annotations

import pytest
from helpers import VOCODER_COMMON, loss_history, stage_runs
from mlflow import MlflowClient

from pipeline.common import faults
from pipeline.engine.cli import EXIT_OK, EXIT_STOPPED
from pipeline.engine.session import run_stage
from pipeline.stages.pretrain_vocoder import PretrainVocoder
from pipeline.stages.train_adapter import TrainAdapter

STEPS = ["trainer.max_steps=6", "validation.interval=3", "checkpoint.save_interval=100"]
CASES = {
    "logmel_cleaner": (
        TrainAdapter,
        ["ssl=logmel", "adapter.cleaner_blocks=2", "adapter.cleaner_dim=32"],
        ("train/loss", "train/l1", "grad_norm"),
    ),
    "vocos_with_gan": (
        PretrainVocoder,
        ["ssl=logmel", "vocoder=vocos_tiny", "vocoder.vocos_dim=32", "loss.gan_start_step=2"],
        ("train/loss", "train/mel", "train/d_loss", "grad_norm/generator"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stopped_and_resumed_job_equals_one_that_never_stopped(store, armed, case):
    stage, args, keys = CASES[case]
    job = [*VOCODER_COMMON, *args, *STEPS]
    assert run_stage(stage, job) == EXIT_OK
    armed("validation@1=signal:TERM")  # the first validation, at step 3: committed there, then stopped
    assert run_stage(stage, job) == EXIT_STOPPED
    faults.disarm()
    client = MlflowClient()
    uninterrupted, stopped = (r.info.run_id for r in stage_runs(client, stage.name))
    tags = client.get_run(stopped).data.tags
    assert tags["checkpoint.latest_step"] == "3"
    if stage is PretrainVocoder:  # the runs table's model column names the generator
        assert (tags["model"], tags["model.preset"], tags["encoder"]) == ("vocos", "vocos_tiny", "logmel")
    assert run_stage(stage, [f"resume_run={stopped}"]) == EXIT_OK
    assert [s for s, _ in loss_history(client, stopped)] == list(range(1, 7))
    for key in keys:  # (the discriminators' losses from the GAN's first step, 3)
        resumed = loss_history(client, stopped, key)
        assert resumed and resumed == loss_history(client, uninterrupted, key), key
