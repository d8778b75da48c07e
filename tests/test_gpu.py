"""CUDA paths: mixed precision with the grad scaler, bf16, and exact resume on the GPU (skipped without CUDA)."""

import pytest
import torch
from helpers import TINY, loss_history, stage_runs
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import run_stage

pytestmark = pytest.mark.gpu

CUDA = [*TINY, "trainer.device=cuda", "optim.schedule=constant", "validation.interval=4", "checkpoint.save_interval=4"]


def train_adapter(*args):
    from pipeline.stages.train_adapter import TrainAdapter

    return run_stage(TrainAdapter, [*CUDA, *args])


def latest_state(client, run_id):
    from pathlib import Path

    import mlflow

    from pipeline.engine.checkpoint_files import load_state

    step = client.get_run(run_id).data.tags["checkpoint.latest_step"]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/step-{int(step):08d}")
    return load_state(Path(local))


def test_16_mixed_trains_with_a_grad_scaler_that_is_checkpointed(store):
    assert train_adapter("trainer.precision=16-mixed", "trainer.max_steps=4") == EXIT_OK
    client = MlflowClient()
    (run,) = stage_runs(client)
    losses = [v for _, v in loss_history(client, run.info.run_id)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    scaler = latest_state(client, run.info.run_id)["scaler"]
    assert scaler and scaler["scale"] > 0  # the scaler ran and its state is in the checkpoint
    assert "cuda" in latest_state(client, run.info.run_id)["rng"]


def test_bf16_trains_on_cuda(store):
    assert train_adapter("trainer.precision=bf16", "trainer.max_steps=4") == EXIT_OK
    client = MlflowClient()
    (run,) = stage_runs(client)
    assert len(loss_history(client, run.info.run_id)) == 4


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_resume_on_cuda_is_bit_identical(store, precision):
    client = MlflowClient()
    assert train_adapter(f"trainer.precision={precision}", "trainer.max_steps=8", "tracking.run_name=whole") == EXIT_OK
    assert train_adapter(f"trainer.precision={precision}", "trainer.max_steps=4", "tracking.run_name=parts") == EXIT_OK
    runs = {r.info.run_name: r.info.run_id for r in stage_runs(client)}
    assert train_adapter(f"resume_run={runs['parts']}", "trainer.max_steps=8") == EXIT_OK
    assert loss_history(client, runs["parts"]) == loss_history(client, runs["whole"])


def test_vocoder_stages_run_on_cuda_in_mixed_precision(store):
    from pipeline.stages.pretrain_vocoder import PretrainVocoder

    args = [
        "ssl=tiny",
        "vocoder=tiny",
        "batch_size=4",
        "data.segment_seconds=0.5",
        "trainer.device=cuda",
        "trainer.precision=16-mixed",
        "trainer.max_steps=3",
        "validation.interval=3",
        "tracking.system_metrics=false",
        "tracking.flush_seconds=0.2",
    ]
    assert run_stage(PretrainVocoder, args) == EXIT_OK
    client = MlflowClient()
    (run,) = stage_runs(client, "pretrain_vocoder")
    assert len(loss_history(client, run.info.run_id)) == 3
    assert latest_state(client, run.info.run_id)["scaler"]["scale"] > 0


def test_conformer_vocoder_generates_finite_audio_under_autocast_on_cuda():
    from pipeline.config import compose_config
    from pipeline.models.hifigan import build_vocoder

    cfg = compose_config("pretrain_vocoder", ["vocoder=conformer_v1_22k"]).vocoder
    generator = build_vocoder(768, cfg)[0].to("cuda").eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        wave = generator(torch.randn(2, 50, 768, device="cuda"))
    assert wave.shape == (2, 50 * 441) and torch.isfinite(wave).all()


def test_resume_of_a_base_size_encoder_on_cuda_is_bit_identical(store):
    """Attention backward passes through a real-width encoder (hubert_base shape, 3 layers, 2 s crops)."""
    client = MlflowClient()
    big = ["ssl=hubert_base", "ssl.layer=3", "data.segment_seconds=2.0", "adapter.bottleneck=64"]
    assert train_adapter(*big, "trainer.max_steps=6", "tracking.run_name=whole") == EXIT_OK
    assert train_adapter(*big, "trainer.max_steps=3", "tracking.run_name=parts") == EXIT_OK
    runs = {r.info.run_name: r.info.run_id for r in stage_runs(client)}
    assert train_adapter(*big, f"resume_run={runs['parts']}", "trainer.max_steps=6") == EXIT_OK
    assert loss_history(client, runs["parts"]) == loss_history(client, runs["whole"])


def test_vocoder_resume_on_cuda_is_bit_identical(store):
    from pipeline.stages.pretrain_vocoder import PretrainVocoder

    args = [
        "ssl=tiny",
        "vocoder=tiny",
        "batch_size=4",
        "data.segment_seconds=0.5",
        "trainer.device=cuda",
        "optim.schedule=constant",
        "validation.interval=3",
        "tracking.system_metrics=false",
        "tracking.flush_seconds=0.2",
    ]
    client = MlflowClient()
    assert run_stage(PretrainVocoder, [*args, "trainer.max_steps=6", "tracking.run_name=whole"]) == EXIT_OK
    assert run_stage(PretrainVocoder, [*args, "trainer.max_steps=3", "tracking.run_name=parts"]) == EXIT_OK
    runs = {r.info.run_name: r.info.run_id for r in stage_runs(client, "pretrain_vocoder")}
    assert run_stage(PretrainVocoder, [f"resume_run={runs['parts']}", "trainer.max_steps=6"]) == EXIT_OK
    for key in ("train/loss", "train/d_loss"):
        assert loss_history(client, runs["parts"], key) == loss_history(client, runs["whole"], key)


def test_torchrun_with_one_rank_trains_through_nccl_and_resumes_bit_identical(store):
    """One GPU cannot hold two nccl ranks: torchrun with one rank still runs the process group (nccl for
    CUDA tensors), DDP and the rank-aware checkpoint; 4 + 4 steps equal 8 uninterrupted ones."""
    import subprocess

    from helpers import env_for

    from pipeline.launcher import command

    def torchrun(*args):
        done = subprocess.run(
            command("train_adapter", 1, "--max-restarts=0", [*CUDA, *args]),
            cwd=store,
            env=env_for(store),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    err = torchrun("trainer.max_steps=8", "tracking.run_name=whole")
    assert "joined the process group (cpu:gloo,cuda:nccl)" in err
    torchrun("trainer.max_steps=4", "tracking.run_name=parts")
    client = MlflowClient()
    runs = {r.info.run_name: r.info.run_id for r in stage_runs(client)}
    torchrun(f"resume_run={runs['parts']}", "trainer.max_steps=8")
    assert loss_history(client, runs["parts"]) == loss_history(client, runs["whole"])
    assert client.get_run(runs["whole"]).data.tags["world_size"] == "1"
