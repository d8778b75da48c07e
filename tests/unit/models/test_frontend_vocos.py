"""The log-mel front end with its feature cleaner, and the Vocos-style generator (pipeline/models/frontend.py,
pipeline/models/vocos.py): geometry, exactness on padded batches, the inverse STFT, and refused presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, compose_config
from pipeline.models.adapters import build_adapted_encoder
from pipeline.models.encoder import create_encoder, encoder_features, encoder_geometry
from pipeline.models.frontend import CleanedLogMel
from pipeline.models.hifigan import VocoderConfigError, build_generator, generator_hop, validate_preset
from pipeline.models.vocos import VocosGenerator, istft_same, overlap_add_envelope


def logmel_stage(*overrides: str):
    return compose_config("train_adapter", ["ssl=logmel", *overrides])


def vocos_preset(*overrides: str):
    return compose_config("pretrain_vocoder", ["ssl=logmel", "vocoder=vocos_tiny", *overrides]).vocoder


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn anew (a zero-initialised output layer or LayerNorm at 1/0 would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def test_log_mel_frames_follow_the_encoder_geometry():
    cfg = logmel_stage("ssl.hop_length=160", "ssl.n_fft=640").ssl
    hop, receptive = encoder_geometry(cfg)
    assert (hop, receptive) == (160, 640)
    front = create_encoder(cfg)
    for frames in (1, 7, 50):
        features = encoder_features(front, torch.randn(2, frames * hop + receptive - hop), cfg.layer)
        assert features.shape == (2, frames, cfg.embed_dim)
    assert front.frames(torch.tensor([639, 640, 799, 800])).tolist() == [0, 1, 1, 2]
    assert sum(p.numel() for p in front.parameters()) == 0  # nothing to train, nothing to load


def test_the_cleaner_starts_as_the_identity_and_only_it_trains():
    stage = logmel_stage()
    model = build_adapted_encoder(stage.ssl, stage.adapter)
    assert isinstance(model, CleanedLogMel)
    wave = 0.1 * torch.randn(2, 16000)
    assert torch.equal(model(wave), model.target_features(wave))
    assert set(model.trainable_modules()) == {"cleaner"}
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters()}
    randomise(model.cleaner)
    assert (model(wave) - model.target_features(wave)).abs().mean() > 0.01


def test_a_log_mel_front_end_refuses_weights():
    stage = logmel_stage("ssl.weights=/somewhere/hubert.pt")
    with pytest.raises(ValueError, match="nothing to load: unset ssl.weights"):
        build_adapted_encoder(stage.ssl, stage.adapter)


def test_inverse_stft_inverts_a_same_padded_stft():
    hop, n_fft = 160, 640
    window = torch.hann_window(n_fft)
    wave = torch.randn(2, 30 * hop, generator=torch.Generator().manual_seed(3))
    pad = (n_fft - hop) // 2
    spec = torch.stft(F.pad(wave, (pad, pad)), n_fft, hop, window=window, center=False, return_complex=True)
    assert spec.shape[-1] == 30
    restored = istft_same(spec, window, hop, overlap_add_envelope(window, hop))
    assert restored.shape == wave.shape
    inner = slice(n_fft, -n_fft)  # the first and last windows have no overlapping neighbours
    torch.testing.assert_close(restored[:, inner], wave[:, inner], atol=1e-5, rtol=0)


def test_a_padded_batch_gives_each_item_its_own_output():
    stage = logmel_stage("adapter.cleaner_blocks=2", "adapter.cleaner_dim=32")
    cleaned = build_adapted_encoder(stage.ssl, stage.adapter)
    generator = build_generator(stage.ssl.embed_dim, vocos_preset("vocoder.vocos_layers=2", "vocoder.vocos_dim=32"))
    assert isinstance(generator, VocosGenerator)
    randomise(cleaned)
    randomise(generator, seed=1)
    hop, receptive = encoder_geometry(stage.ssl)
    lengths = torch.tensor([40 * hop + receptive, 33 * hop + receptive + 17, 12 * hop + receptive])
    waves = [0.2 * torch.randn(int(n), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    with torch.no_grad():
        features = cleaned(batch, lengths)
        frames = cleaned.encoder.frames(lengths)
        out = generator(features, frames)
        for i, wave in enumerate(waves):
            alone = generator(cleaned(wave[None]))[0]
            assert alone.numel() == int(frames[i]) * hop
            torch.testing.assert_close(out[i, : alone.numel()], alone, atol=1e-5, rtol=1e-4)
            assert not out[i, alone.numel() :].any()


def test_vocos_output_is_frames_times_hop_and_its_gradient_reaches_every_parameter():
    generator = build_generator(80, vocos_preset())
    randomise(generator)
    out = generator(torch.randn(2, 25, 80))
    assert out.shape == (2, 25 * generator_hop(vocos_preset()))
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["vocoder.vocos_hop=160"], "vocos_hop=160, but the features' frame rate needs 320"),
        (["vocoder.vocos_n_fft=1279"], "differ from it by an even number"),
        (["vocoder.vocos_n_fft=100"], "must be at least vocos_hop"),
        (["vocoder.generator=wavenet"], "vocoder.generator='wavenet'; choose one of hifigan, vocos"),
    ],
)
def test_a_vocos_preset_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(VocoderConfigError, match=message):
        validate_preset(vocos_preset(*overrides), 50)


def test_a_hifigan_preset_at_another_frame_rate_is_refused_by_name():
    cfg = compose_config("pretrain_vocoder", ["ssl=logmel", "vocoder=tiny"]).vocoder
    with pytest.raises(VocoderConfigError, match=r"upsample_rates \[8, 5, 4, 2\] is 320, but features at 100"):
        validate_preset(cfg, 100)


def test_a_vocoder_trained_on_another_framing_of_the_same_front_end_is_refused():
    from omegaconf import OmegaConf

    from pipeline.stages.finetune_vocoder import check_same_encoder

    ssl = OmegaConf.to_container(logmel_stage().ssl)
    check_same_encoder("a" * 32, ssl, "v" * 32, dict(ssl, weights="elsewhere"))  # where weights live is not framing
    with pytest.raises(ConfigError, match="with other settings: ssl.hop_length=320 vs 160, ssl.n_fft=1024 vs 640"):
        check_same_encoder("a" * 32, ssl, "v" * 32, dict(ssl, hop_length=160, n_fft=640))
