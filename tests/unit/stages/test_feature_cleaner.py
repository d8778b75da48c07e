"""The log-mel feature cleaner learns: trained by train_adapter on a few voices, it brings the degraded features of
voices and sentences it never heard closer to their clean features than the degraded features are."""

from __future__ import annotations

import shutil

import pytest
from helpers import loss_history, only_run, untrained_val_loss
from mlflow import MlflowClient

from pipeline.data.synth import COMMANDS
from pipeline.data.voices import VoicesSpec, ensure_voices_corpus, heldout_row_count
from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

# 8 training voices of both sexes and the three synthesisers speaking 54 sentences; 2 other voices speak 6 other
# sentences, held out (12 utterances)
SPEC = VoicesSpec(
    sentences=60,
    heldout_fraction=0.1,
    voices_per_sentence=2,
    voices=(
        "flite-awb",
        "flite-slt",
        "flite-kal16",
        "festival-ked",
        "espeak-en-us-f2",
        "espeak-en-m3",
        "espeak-en-gb-x-gbcwmd-f1",
        "espeak-en-us-nyc-f3",
        "flite-rms",
        "espeak-en-gb-x-rp-f2",
    ),
    heldout_voices=("flite-rms", "espeak-en-gb-x-rp-f2"),
)

pytestmark = pytest.mark.skipif(
    any(shutil.which(command) is None for command in set(COMMANDS.values())),
    reason="Debian's speech synthesisers are not installed (scripts/setup.sh installs them)",
)


def test_the_cleaner_brings_held_out_voices_features_towards_the_clean_ones(store, tmp_path_factory):
    root = ensure_voices_corpus(tmp_path_factory.mktemp("voices") / "cleaner", SPEC, workers=2)
    args = [
        "ssl=logmel",
        "data=voices",
        f"data.root={root}",
        f"data.val_size={heldout_row_count(SPEC)}",  # exactly the held-out voices' rows
        "data.num_workers=0",
        "data.segment_seconds=1.0",
        "adapter.cleaner_blocks=2",
        "adapter.cleaner_dim=64",
        "batch_size=8",
        "optim.lr=2e-3",
        "trainer.max_steps=300",
        "validation.interval=300",
        "validation.num_samples=0",
        "checkpoint.save_interval=300",
        "tracking.system_metrics=false",
    ]
    # the cleaner starts as the identity: this is the degraded features' distance to the clean ones
    degraded, _ = untrained_val_loss(TrainAdapter, args)
    assert run_stage(TrainAdapter, args) == EXIT_OK
    client = MlflowClient()
    ((step, cleaned),) = loss_history(client, only_run(client, "train_adapter"), "val/loss")
    # measured: 4.94 -> 3.47 on these 12 held-out utterances (default degradation)
    assert step == 300 and cleaned < 0.85 * degraded, (degraded, cleaned)
