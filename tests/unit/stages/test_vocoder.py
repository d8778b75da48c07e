"""HiFi-GAN: models, losses, pretrain_vocoder and finetune_vocoder end to end, exact resume with two optimizers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import (
    REPO,
    TINY_VOCODER,
    VOCODER_COMMON,
    VOCODER_TRAIN_KEYS,
    all_runs,
    artifact_dir,
    copied_store,
    loss_history,
    only_run,
    snapshot,
    stage_runs,
    untrained_val_loss,
)
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.config import VocoderConfig
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.models.hifigan import VocoderConfigError, build_vocoder, validate_preset
from pipeline.models.losses import discriminator_loss, generator_loss
from pipeline.stages.finetune_vocoder import FinetuneVocoder
from pipeline.stages.pretrain_vocoder import PretrainVocoder
from pipeline.stages.train_adapter import TrainAdapter


def preset(name: str, **changes) -> VocoderConfig:
    cfg = OmegaConf.merge(
        OmegaConf.structured(VocoderConfig), OmegaConf.load(REPO / "configs" / "vocoder" / f"{name}.yaml")
    )
    return OmegaConf.merge(cfg, changes)


def pretrain(*args: str) -> int:
    return run_stage(PretrainVocoder, [*TINY_VOCODER, *args])


def finetune(*args: str) -> int:
    # no ssl=/vocoder= here: they come from the adapter and vocoder runs
    return run_stage(FinetuneVocoder, [*VOCODER_COMMON, *args])


def adapter(*args: str) -> int:
    return run_stage(TrainAdapter, ["ssl=tiny", *VOCODER_COMMON, "adapter.bottleneck=16", *args])


# --------------------------------------------------------------------------------------------
# Models and losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, rate, hop",
    [("tiny", 16000, 320), ("v2", 16000, 320), ("v1_22k", 22050, 441), ("conformer_v1_22k", 22050, 441)],
)
def test_generator_turns_50_frames_per_second_into_the_output_rate(name, rate, hop):
    cfg = preset(
        name,
        upsample_initial_channel=16,
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1]],
        conformer_dim=16,
        conformer_heads=2,
        conformer_ffn_dim=16,
    )
    generator, mpd, msd = build_vocoder(8, cfg)
    wave = generator(torch.randn(2, 7, 8))
    assert cfg.sample_rate == rate and wave.shape == (2, 7 * hop) and wave.abs().max() <= 1
    scores, maps = mpd(wave)
    assert len(scores) == len(cfg.mpd_periods) and all(len(m) == 6 for m in maps)
    scores, maps = msd(wave)
    assert len(scores) == cfg.msd_scales and all(len(m) == 8 for m in maps)


def test_v1_and_v2_presets_are_valid_and_a_wrong_upsampling_is_refused_by_name():
    for name in ("v1", "v2", "tiny", "v1_22k", "conformer_v1_22k"):
        validate_preset(preset(name))
    with pytest.raises(VocoderConfigError, match=r"conformer_kernel \(30\) must be odd"):
        validate_preset(preset("conformer_v1_22k", conformer_kernel=30))
    with pytest.raises(VocoderConfigError, match=r"upsample_rates \[8, 8, 2, 2\] is 256.*need 320.*sample_rate=16000"):
        validate_preset(preset("v1", upsample_rates=[8, 8, 2, 2]))
    with pytest.raises(VocoderConfigError, match="need 441"):
        validate_preset(preset("v1", sample_rate=22050))


def test_gan_losses_are_pure_functions_returning_their_parts():
    ones, zeros = [torch.ones(2, 5)], [torch.zeros(2, 5)]
    total, parts = discriminator_loss(ones, zeros)  # a perfect discriminator
    assert float(total) == 0 and set(parts) == {"real", "fake"}
    total, parts = discriminator_loss(zeros, ones)
    assert float(parts["real"]) == 1 and float(parts["fake"]) == 1 and float(total) == 2
    maps = [[torch.ones(2, 3), torch.zeros(2, 4)]]
    mel = torch.tensor(0.5)
    total, parts = generator_loss(
        zeros, maps, [[torch.zeros(2, 3), torch.zeros(2, 4)]], mel, adv_weight=1.0, fm_weight=2.0, mel_weight=45.0
    )
    assert set(parts) == {"adv", "fm", "mel"}
    assert (float(parts["adv"]), float(parts["fm"]), float(parts["mel"])) == (1.0, 1.0, 0.5)
    assert float(total) == pytest.approx(1.0 + 2.0 + 22.5)


def test_vocoder_entry_points_in_mlproject():
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    assert set(spec["pretrain_vocoder"]["parameters"]) == {
        "overrides",
        "resume_run",
        "resume_step",
        "nproc",
        "torchrun",
    }
    assert set(spec["finetune_vocoder"]["parameters"]) == {
        "overrides",
        "resume_run",
        "resume_step",
        "adapter_run",
        "vocoder_run",
        "nproc",
        "torchrun",
    }
    assert set(spec["main"]["parameters"]) == {"overrides"}


# --------------------------------------------------------------------------------------------
# pretrain_vocoder
# --------------------------------------------------------------------------------------------


def test_mel_loss_falls_over_a_short_pretraining(store):
    args = [
        *TINY_VOCODER,
        "trainer.max_steps=30",
        "validation.interval=30",
        "validation.num_samples=1",
        "checkpoint.save_interval=30",
    ]
    before, _ = untrained_val_loss(PretrainVocoder, args)
    assert run_stage(PretrainVocoder, args) == EXIT_OK
    client = MlflowClient()
    run_id = only_run(client, "pretrain_vocoder")
    (after,) = [v for _, v in loss_history(client, run_id, "val/mel")]
    # measured: 5.9 -> 1.4 (tiny presets, 30 steps of 4 half-second crops)
    assert after < 0.5 * before, (before, after)
    train_mel = [v for _, v in loss_history(client, run_id, "train/mel")]
    assert sum(train_mel[-5:]) < 0.5 * sum(train_mel[:5])


def test_pretrain_run_tracks_both_optimizers_and_keeps_only_trainable_weights(store):
    assert pretrain("trainer.max_steps=4", "validation.interval=4", "checkpoint.save_interval=4") == EXIT_OK
    client = MlflowClient()
    run = client.get_run(only_run(client, "pretrain_vocoder"))
    tags, run_id = run.data.tags, run.info.run_id
    assert (tags["model"], tags["model.preset"], tags["dataset"], tags["encoder"], tags["encoder.layer"]) == (
        "hifigan",
        "tiny",
        "demo",
        "tiny",
        "2",
    )
    (trained_on,) = run.inputs.dataset_inputs  # the runs table's Dataset column
    assert trained_on.dataset.name == "demo" and trained_on.tags[0].value == "training"
    for key in (
        *VOCODER_TRAIN_KEYS,
        "grad_norm/generator",
        "grad_norm/discriminator",
        "lr/generator",
        "lr/discriminator",
    ):
        assert [s for s, _ in loss_history(client, run_id, key)] == [1, 2, 3, 4], key
    assert [s for s, _ in loss_history(client, run_id, "val/mel")] == [4]
    state = torch.load(artifact_dir(client, run_id) / "checkpoints/step-00000004/state.pt", weights_only=True)
    assert set(state["modules"]) == {"generator", "mpd", "msd"}  # no frozen encoder
    assert set(state["optimizers"]) == set(state["schedulers"]) == {"generator", "discriminator"}
    samples = artifact_dir(client, run_id) / "samples" / "step-00000004"
    assert (samples / "index.html").is_file()
    assert {p.name.split("_", 1)[1] for p in samples.glob("DEMO-*")} == {
        "clean.wav",
        "generated.wav",
        "mel.png",
        "spectrogram.png",
    }


def test_bad_vocoder_preset_is_refused_before_anything_is_written(store, capfd):
    assert pretrain("vocoder.upsample_rates=[8,8,2,2]") == EXIT_BAD_INPUT
    assert "need 320 to reach vocoder.sample_rate=16000" in capfd.readouterr().err
    assert all_runs(MlflowClient()) == []


# --------------------------------------------------------------------------------------------
# finetune_vocoder
# --------------------------------------------------------------------------------------------


SHORT = ["trainer.max_steps=2", "checkpoint.save_interval=2", "validation.interval=0"]


def train_chain_runs() -> dict:
    assert adapter(*SHORT) == EXIT_OK
    assert adapter(*SHORT, "ssl.layer=1") == EXIT_OK
    assert pretrain(*SHORT) == EXIT_OK
    client = MlflowClient()
    layer2, layer1 = [r.info.run_id for r in stage_runs(client, "train_adapter")]
    return {"adapter": layer2, "adapter_layer1": layer1, "vocoder": only_run(client, "pretrain_vocoder")}


@pytest.fixture
def chain_runs(store, tmp_path_factory):
    """A finished tiny adapter run (encoder layer 2), one at layer 1, and a tiny vocoder run (layer 2): trained once
    per test session, copied into each test's store."""
    return copied_store(tmp_path_factory, store, "vocoder-chain-runs", [*TINY_VOCODER, *SHORT], train_chain_runs)


def test_finetune_builds_on_the_adapter_and_vocoder_runs_and_resumes(chain_runs, capfd):
    ids = chain_runs
    assert (
        finetune(
            f"adapter_run={ids['adapter']}",
            f"vocoder_run={ids['vocoder']}",
            "trainer.max_steps=3",
            "checkpoint.save_interval=3",
            "validation.interval=3",
        )
        == EXIT_OK
    )
    err = capfd.readouterr().err
    assert f"Adapters rebuilt from run {ids['adapter']} checkpoint step-00000002" in err
    assert f"initialised from run {ids['vocoder']} checkpoint step-00000002" in err
    client = MlflowClient()
    run = client.get_run(only_run(client, "finetune_vocoder"))
    assert run.data.tags["chain.adapter_run"] == ids["adapter"] and run.data.tags["chain.vocoder_run"] == ids["vocoder"]
    assert run.data.params["adapter_run"] == ids["adapter"] and run.data.params["vocoder_run"] == ids["vocoder"]
    assert run.data.params["ssl.layer"] == "2" and run.data.params["vocoder.name"] == "tiny"
    samples = artifact_dir(client, run.info.run_id) / "samples" / "step-00000003"
    assert list(samples.glob("*_degraded.wav")) and list(samples.glob("*_generated.wav"))
    state = torch.load(artifact_dir(client, run.info.run_id) / "checkpoints/step-00000003/state.pt", weights_only=True)
    assert set(state["modules"]) == {"generator", "mpd", "msd"}  # the adapters stay in their own run

    meta = json.loads((artifact_dir(client, run.info.run_id) / "checkpoints/step-00000003/meta.json").read_text())
    assert meta["inputs"] == {"adapter_run": ids["adapter"], "vocoder_run": ids["vocoder"], "adapter_step": "2"}
    assert "adapter_run" not in meta["config"]  # a launch argument, not a config key
    # naming another adapter run on resume is refused: the vocoder was fine-tuned on this one's features
    capfd.readouterr()
    assert (
        finetune(f"resume_run={run.info.run_id}", f"adapter_run={ids['adapter_layer1']}", "trainer.max_steps=5")
        == EXIT_BAD_INPUT
    )
    assert f"trained on other runs than adapter_run={ids['adapter_layer1']}" in capfd.readouterr().err
    # resume needs only the run ID: adapter and vocoder runs come from the checkpoint
    assert finetune(f"resume_run={run.info.run_id}", "trainer.max_steps=5") == EXIT_OK
    assert [s for s, _ in loss_history(client, run.info.run_id)] == [1, 2, 3, 4, 5]


def test_finetune_refuses_incompatible_or_unusable_runs_before_training(chain_runs, capfd):
    ids = chain_runs
    client = MlflowClient()
    empty = client.create_run(client.create_experiment("other"), tags={"stage": "train_adapter"}).info.run_id
    before = snapshot(client)
    cases = [
        (
            [f"adapter_run={ids['adapter_layer1']}", f"vocoder_run={ids['vocoder']}"],
            f"adapter run {ids['adapter_layer1']} uses encoder preset 'tiny' layer 1, but vocoder run "
            f"{ids['vocoder']} was trained on encoder preset 'tiny' layer 2",
        ),
        (
            [f"adapter_run={ids['vocoder']}", f"vocoder_run={ids['vocoder']}"],
            f"adapter_run={ids['vocoder']} is a pretrain_vocoder run, not a train_adapter run",
        ),
        (
            [f"adapter_run={ids['adapter']}", f"vocoder_run={ids['adapter']}"],
            "is a train_adapter run, not a pretrain_vocoder or finetune_vocoder run",
        ),
        (
            [f"adapter_run={empty}", f"vocoder_run={ids['vocoder']}"],
            f"adapter_run={empty} (train_adapter) has no committed checkpoint",
        ),
        ([f"adapter_run={'0' * 32}", f"vocoder_run={ids['vocoder']}"], f"adapter_run={'0' * 32}: run not found"),
        ([f"vocoder_run={ids['vocoder']}"], "finetune_vocoder needs adapter_run="),
    ]
    for args, message in cases:
        capfd.readouterr()
        assert finetune(*args) == EXIT_BAD_INPUT, args
        assert message in capfd.readouterr().err, message
    assert snapshot(client) == before


@pytest.mark.parametrize("left, right", [(0, 5), (7, 3), (0, 0), (512, 512)])
def test_deterministic_reflect_pad_equals_torch_reflect_padding_in_values_and_gradients(left, right):
    import torch.nn.functional as F

    from pipeline.models.hifigan import reflect_pad

    x = torch.randn(3, 1, 1001, requires_grad=True)
    ours, torchs = reflect_pad(x, left, right), F.pad(x, (left, right), mode="reflect")
    assert torch.equal(ours, torchs)
    g = torch.randn_like(torchs)
    assert torch.allclose(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(torchs, x, g)[0], atol=1e-6)


def test_the_mel_of_the_losses_is_torchaudios_centred_mel_bit_for_bit():
    import torchaudio

    from pipeline.models.hifigan import CenteredMelSpectrogram

    kwargs = dict(
        sample_rate=22050, win_length=1024, hop_length=256, n_mels=80, power=1.0, norm="slaney", mel_scale="slaney"
    )
    wave = torch.randn(2, 11025)
    assert torch.equal(
        CenteredMelSpectrogram(n_fft=1024, **kwargs)(wave),
        torchaudio.transforms.MelSpectrogram(n_fft=1024, **kwargs)(wave),
    )
