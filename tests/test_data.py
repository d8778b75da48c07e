"""Embedded corpus, degradation determinism and the resumable batch order."""

import numpy as np
import soundfile as sf
import torch

from pipeline.config import DegradationConfig
from pipeline.data.corpus import DEMO_DIR, AudioError, load_audio, load_corpus_audio, read_corpus
from pipeline.data.datasets import DegradedPairs, epoch_batches
from pipeline.data.degrade import add_noise, band_limit, clip, coloured_noise, degrade, sample_rng

import pytest


def test_demo_corpus_is_small_and_complete():
    utts = read_corpus("ljspeech", None)
    assert 24 <= len(utts) <= 60
    assert all(u.path.is_file() and u.text for u in utts)
    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size < 5_000_000


def test_load_audio_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([np.sin(np.arange(8000) / 5), np.sin(np.arange(8000) / 7)], axis=1) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 8000)
    wave = load_audio(tmp_path / "s.wav", 16000)
    assert wave.ndim == 1 and abs(wave.numel() - 16000) <= 1


@pytest.mark.parametrize("content, reason", [(b"not audio", "cannot read"), (None, "silent"), (b"", "cannot read")])
def test_unusable_audio_is_reported(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    if content is None:
        sf.write(path, np.zeros(1600), 16000)
    else:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=reason):
        load_audio(path, 16000)


def test_corpus_loading_skips_bad_files(tmp_path):
    good = read_corpus("ljspeech", None)[:3]
    bad_path = tmp_path / "broken.wav"
    bad_path.write_bytes(b"garbage")
    broken = type(good[0])("broken", bad_path, "x")
    kept, waves = load_corpus_audio(good + [broken], 16000)
    assert [u.id for u in kept] == [u.id for u in good] and len(waves) == 3


def test_degradation_does_not_depend_on_torch_threads():
    wave = torch.randn(16000) * 0.1
    cfg = DegradationConfig(noise_prob=1.0, reverb_prob=1.0, bandlimit_prob=1.0, clip_prob=1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = degrade(wave, 16000, cfg, sample_rng(1, 2, 3))
        torch.set_num_threads(max(threads, 2))
        multi, _ = degrade(wave, 16000, cfg, sample_rng(1, 2, 3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_degradation_is_a_pure_function_of_seed_epoch_index():
    wave = torch.sin(torch.arange(16000) / 10.0) * 0.3
    cfg = DegradationConfig(noise_prob=1.0, reverb_prob=1.0, bandlimit_prob=1.0, clip_prob=1.0)
    a, pa = degrade(wave, 16000, cfg, sample_rng(1, 2, 3))
    b, pb = degrade(wave, 16000, cfg, sample_rng(1, 2, 3))
    c, _ = degrade(wave, 16000, cfg, sample_rng(1, 3, 3))
    assert torch.equal(a, b) and pa == pb
    assert not torch.equal(a, c)
    assert set(pa) == {"rt60_s", "noise", "snr_db", "cutoff_hz", "clip_ratio"}


def test_noise_is_added_at_the_requested_snr():
    wave = np.sin(np.arange(16000) / 10.0)
    rng = np.random.default_rng(0)
    for kind in ("white", "pink", "brown"):
        noise = coloured_noise(kind, wave.size, rng)
        noisy = add_noise(wave, noise, 10.0)
        snr = 10 * np.log10(np.mean(wave**2) / np.mean((noisy - wave) ** 2))
        assert abs(snr - 10.0) < 1e-6


def test_band_limit_and_clip():
    t = np.arange(16000) / 16000
    wave = np.sin(2 * np.pi * 200 * t) + np.sin(2 * np.pi * 6000 * t)
    low = band_limit(wave, 16000, 2000.0)
    spectrum = np.abs(np.fft.rfft(low))
    assert spectrum[6000] < 0.01 * spectrum[200]
    assert np.max(np.abs(clip(wave, 0.5))) <= 0.5 * np.max(np.abs(wave)) + 1e-9


def test_batch_order_resumes_mid_epoch():
    full = epoch_batches(20, 4, seed=7, epoch=3)
    assert epoch_batches(20, 4, seed=7, epoch=3, start_batch=2) == full[2:]
    assert full != epoch_batches(20, 4, seed=7, epoch=4)
    assert sorted(i for b in full for _, i in b) == list(range(20))


def test_dataset_examples_are_reproducible():
    waves = [torch.randn(12000) * 0.1 for _ in range(3)]
    ds = DegradedPairs(waves, 16000, 8000, DegradationConfig(), seed=5, train=True)
    a, b = ds[(2, 1)], ds[(2, 1)]
    assert torch.equal(a["noisy"], b["noisy"]) and torch.equal(a["clean"], b["clean"])
    assert a["clean"].numel() == 8000
    assert not torch.equal(ds[(3, 1)]["noisy"], a["noisy"])
