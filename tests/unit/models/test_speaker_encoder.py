"""GE2E speaker encoder: Resemblyzer reference with random parameters, packaged weights, NaN cases."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import REPO

from pipeline.models import speaker_encoder as se
from pipeline.models.speaker_encoder import (
    MIN_SAMPLES,
    SpeakerEncoder,
    SpeakerEncoderError,
    embed,
    embed_many,
    load_speaker_encoder,
    mel_spectrogram,
    normalize_volume,
    speaker_similarity,
)

DEMO = REPO / "pipeline" / "data" / "demo" / "wavs"
SR = 16000


def demo_wave(index: int) -> np.ndarray:
    """A demo utterance; scripts/make_demo_corpus.py speaks DEMO-i with espeak-ng voice (i - 1) % 6."""
    wave, sr = sf.read(DEMO / f"DEMO-{index:04d}.wav", dtype="float32")
    assert sr == SR
    return wave


def noise_wave(n_samples: int, seed: int = 0) -> np.ndarray:
    """Random noise with a slow amplitude envelope, float32."""
    rng = np.random.default_rng(seed)
    envelope = 0.05 + 0.1 * np.abs(np.sin(np.arange(n_samples) / SR * 2 * np.pi * 1.7))
    return (envelope * rng.standard_normal(n_samples)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> SpeakerEncoder:
    return load_speaker_encoder()


@pytest.fixture(scope="module")
def random_pair() -> tuple:
    """Resemblyzer's VoiceEncoder with every parameter randomised, and ours with the same state."""
    from resemblyzer import VoiceEncoder

    theirs = VoiceEncoder("cpu", verbose=False)
    packaged = {k: v.clone() for k, v in theirs.state_dict().items()}
    torch.manual_seed(1234)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.1)
    for name, value in theirs.state_dict().items():
        assert not torch.equal(value, packaged[name]), f"{name} was not randomised"
    ours = SpeakerEncoder().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


# 3.7 s plus a fraction of a hop: 4 partials, the last zero-padded; 2.5 s: a third partial would
# cover only 60 % and is dropped; 0.5 s: one zero-padded partial.
@pytest.mark.parametrize("n_samples, n_partials", [(int(3.7 * SR) + 37, 4), (int(2.5 * SR), 2), (SR // 2, 1)])
def test_embedding_equals_resemblyzer_with_random_parameters(random_pair, n_samples, n_partials):
    theirs, ours = random_pair
    wave = noise_wave(n_samples)
    expected, partials, _ = theirs.embed_utterance(wave, return_partials=True)
    assert len(partials) == len(se.partial_slices(n_samples)) == n_partials
    got = embed(ours, wave)
    assert got.shape == (256,) and got.dtype == torch.float32
    assert np.abs(got.numpy() - expected).max() < 1e-5
    assert float(got.norm()) == pytest.approx(1.0, abs=1e-6)


def test_partial_windows_equal_resemblyzer():
    from resemblyzer import VoiceEncoder

    for n_samples in (0, 1, 19199, 25600, 30400, 40000, int(3.7 * SR) + 37, 10 * SR + 3):
        _, theirs = VoiceEncoder.compute_partial_slices(n_samples, 1.3, 0.75)
        assert se.partial_slices(n_samples) == theirs, n_samples


def test_mel_front_end_equals_resemblyzer(random_pair):
    from resemblyzer.audio import wav_to_mel_spectrogram

    _, ours = random_pair
    for wave in (noise_wave(int(3.7 * SR) + 37, seed=3), demo_wave(2)):
        expected = wav_to_mel_spectrogram(wave)
        got = mel_spectrogram(ours, wave).numpy()
        assert got.shape == expected.shape == (1 + len(wave) // 160, 40)
        # measured: about 2e-7 of the peak (float32 FFTs of torch and numpy)
        assert np.abs(got - expected).max() <= 1e-5 * expected.max()


def test_volume_normalisation_equals_resemblyzer():
    from resemblyzer.audio import normalize_volume as their_normalize_volume

    quiet, loud = 0.01 * demo_wave(3), demo_wave(3)
    for wave in (quiet, loud):
        expected = their_normalize_volume(wave, -30, increase_only=True)
        assert np.abs(normalize_volume(wave).numpy() - expected).max() < 1e-6
    assert torch.equal(normalize_volume(loud), torch.from_numpy(loud))
    assert torch.equal(normalize_volume(np.zeros(100, np.float32)), torch.zeros(100))


def test_batched_embeddings_equal_single_ones(encoder):
    waves = [demo_wave(1), noise_wave(SR // 3), torch.from_numpy(demo_wave(4))]
    batched = embed_many(encoder, waves, max_partials=3)
    single = torch.stack([embed(encoder, w) for w in waves])
    assert batched.shape == (3, 256)
    assert (batched - single).abs().max() < 1e-5


def test_packaged_weights_load_in_eval_mode_without_gradients(encoder):
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert set(encoder.state_dict()) == {n for n, _ in encoder.named_parameters()}


def test_weights_are_loaded_with_weights_only(monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_speaker_encoder()
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(se.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpeakerEncoderError, match=r"pip install resemblyzer==0\.1\.4"):
        load_speaker_encoder()


def test_resemblyzer_modules_are_not_imported_by_our_code():
    tree = ast.parse(Path(se.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "resemblyzer" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "resemblyzer"


def test_similarity_of_a_wave_with_itself_is_one(encoder):
    wave = demo_wave(5)
    assert speaker_similarity(encoder, wave, wave) == pytest.approx(1.0, abs=1e-5)
    assert speaker_similarity(encoder, wave, torch.from_numpy(wave)) == pytest.approx(1.0, abs=1e-5)


def test_noisy_copy_is_closer_than_another_voice(encoder):
    # demo files 1 and 7 are espeak-ng's en-us voice, 3 and 9 its en-us+f3 variant
    clean = demo_wave(1)
    rng = np.random.default_rng(7)
    rms = float(np.sqrt(np.mean(clean**2)))
    noisy = clean + (rms * 0.1 * rng.standard_normal(len(clean))).astype(np.float32)  # 20 dB SNR
    noisy_sim = speaker_similarity(encoder, clean, noisy)
    other_sim = speaker_similarity(encoder, clean, demo_wave(3))
    assert noisy_sim > other_sim + 0.1  # measured 0.91 and 0.60
    # another sentence in the same espeak voice is closer than the other voice
    assert (
        speaker_similarity(encoder, demo_wave(3), demo_wave(9))
        > speaker_similarity(encoder, demo_wave(9), demo_wave(7)) + 0.1
    )  # measured 0.87 and 0.61


def test_unscorable_waves_give_nan_without_raising(encoder):
    speech = demo_wave(6)
    unscorable = [
        speech[: SR // 10],  # 0.1 s
        speech[: MIN_SAMPLES - 1],
        np.zeros(2 * SR, np.float32),
        np.full(2 * SR, 1e-6, np.float32),
        np.concatenate([speech[:MIN_SAMPLES], [np.nan]]).astype(np.float32),
        np.stack([speech, speech]),  # stereo
        np.array([], np.float32),
        np.arange(2 * SR),  # integers, not a float wave
    ]
    for bad in unscorable:
        assert math.isnan(speaker_similarity(encoder, speech, bad))
        assert math.isnan(speaker_similarity(encoder, bad, speech))
    assert not math.isnan(speaker_similarity(encoder, speech, speech[:MIN_SAMPLES]))
