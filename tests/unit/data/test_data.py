"""Embedded corpus, degradation determinism and the resumable batch order."""

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.config import DegradationConfig
from pipeline.data.audio import AudioError, load_audio
from pipeline.data.corpus import DEMO_DIR, load_corpus_audio, read_corpus
from pipeline.data.datasets import DegradedPairs, epoch_batches
from pipeline.data.degrade import add_noise, band_limit, clip, coloured_noise, degrade, sample_rng


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


# --- the full degradation set (docs/architecture.md, Data) -------------------------------------------------------

from pipeline.config import CONFIG_DIR, compose_config  # noqa: E402
from pipeline.data.degrade import (  # noqa: E402
    OtherUtterances,
    bit_depth,
    check_degradation,
    low_rate,
    mu_law,
    packet_loss,
)

RATE = 16000
OFF = dict(noise_prob=0.0, reverb_prob=0.0, bandlimit_prob=0.0, clip_prob=0.0)
DEGRADATION_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "degradation").glob("*.yaml"))


def speech_like(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A few harmonics with a syllable-rate envelope: enough structure for every effect."""
    t = np.arange(int(seconds * RATE)) / RATE
    wave = sum(np.sin(2 * np.pi * f * t + seed) / (k + 1) for k, f in enumerate((150, 300, 450, 3000, 6500)))
    return torch.from_numpy((0.3 * wave * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32))


def others_pool(count: int = 4) -> list[torch.Tensor]:
    return [
        torch.from_numpy(np.random.default_rng(i).standard_normal(8000).astype(np.float32) * 0.1) for i in range(count)
    ]


def only(**kwargs) -> DegradationConfig:
    return DegradationConfig(**{**OFF, **kwargs})


def measured_snr(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    c, n = clean.double().numpy(), noisy.double().numpy()
    return float(10 * np.log10(np.mean(c**2) / np.mean((n - c) ** 2)))


def every_effect(tmp_path=None) -> DegradationConfig:
    cfg = only(
        noise_prob=1.0,
        noise_types=["white", "pink", "brown", "babble", "hum"],
        reverb_prob=1.0,
        bandlimit_prob=1.0,
        lowrate_prob=1.0,
        gain_prob=1.0,
        clip_prob=1.0,
        mulaw_prob=1.0,
        bitdepth_prob=1.0,
        packet_loss_prob=1.0,
    )
    if tmp_path is not None:
        cfg.noise_dir, cfg.rir_dir = str(tmp_path / "noise"), str(tmp_path / "rirs")
        cfg.noise_dir_prob = cfg.rir_dir_prob = 0.5
    return cfg


def write_noise_and_rirs(root):
    (root / "noise").mkdir()
    (root / "rirs").mkdir()
    sf.write(root / "noise" / "fan.wav", np.random.default_rng(1).standard_normal(48000) * 0.1, 48000)
    sf.write(root / "noise" / "street.flac", np.random.default_rng(2).standard_normal(4000) * 0.1, 8000)
    rir = np.zeros(4000)
    rir[200], rir[201:] = 1.0, np.random.default_rng(3).standard_normal(3799) * np.exp(-np.arange(3799) / 800) * 0.3
    sf.write(root / "rirs" / "hall.wav", rir, 16000)


@pytest.mark.parametrize("kind", ["babble", "hum", "white"])
def test_noise_types_are_added_at_the_drawn_snr(kind):
    clean = speech_like()
    noisy, params = degrade(
        clean, RATE, only(noise_prob=1.0, noise_types=[kind]), sample_rng(1, 0, 0), others=others_pool()
    )
    assert params["noise"] == kind
    assert abs(measured_snr(clean, noisy) - params["snr_db"]) < 0.01


def test_hum_is_at_the_mains_frequency_and_its_harmonics():
    clean = speech_like() * 0
    clean[0] = 1e-3  # hum is scaled to the signal's power
    for index in range(4):
        noisy, params = degrade(clean, RATE, only(noise_prob=1.0, noise_types=["hum"]), sample_rng(1, 0, index))
        assert params["hum_hz"] in (50.0, 60.0) and 3 <= params["hum_harmonics"] <= 8
        spectrum = np.abs(np.fft.rfft((noisy - clean).double().numpy()))  # 1 Hz bins for 1 s
        peaks = np.argsort(spectrum)[-params["hum_harmonics"] :]
        assert set(int(p) for p in peaks) == {int(params["hum_hz"]) * k for k in range(1, params["hum_harmonics"] + 1)}


def test_babble_mixes_other_utterances_only():
    pool = others_pool(3)
    picks = {id(OtherUtterances(pool, 1)(np.random.default_rng(i))) for i in range(50)}
    assert picks == {id(pool[0]), id(pool[2])}
    assert len(OtherUtterances(pool[:1], 0)) == 0
    cfg = only(noise_prob=1.0, noise_types=["babble"])
    _, params = degrade(speech_like(), RATE, cfg, sample_rng(1, 0, 0), others=pool)
    assert 3 <= params["babble_speakers"] <= 6
    clean, params = degrade(speech_like(), RATE, cfg, sample_rng(1, 0, 0))  # nobody to babble: no noise
    assert params == {} and torch.equal(clean, speech_like())


def test_packet_loss_zeroes_the_drawn_fraction_of_packets():
    wave = np.ones(RATE)
    out, lost = packet_loss(wave, RATE, 0.2, 20.0, np.random.default_rng(0))
    packets = out.reshape(50, 320)
    zeroed = int(np.sum(np.all(packets == 0, axis=1)))
    assert zeroed == lost == 10 and np.all((packets == 0).all(axis=1) | (packets == 1).all(axis=1))
    _, params = degrade(torch.ones(RATE), RATE, only(packet_loss_prob=1.0), sample_rng(1, 0, 0))
    assert 0.02 <= params["packet_loss_rate"] <= 0.15 and params["packets_lost"] == round(
        params["packet_loss_rate"] * 50
    )


@pytest.mark.parametrize("bits", [3, 6, 8])
def test_mu_law_and_bit_depth_reduce_the_number_of_levels(bits):
    wave = speech_like().double().numpy()
    assert len(np.unique(wave)) > 2**bits
    assert len(np.unique(mu_law(wave, bits))) <= 2**bits
    assert len(np.unique(bit_depth(wave, bits))) <= 2**bits
    assert np.max(np.abs(mu_law(wave, 8) - wave)) < 0.02  # 8-bit mu-law is close to the input
    _, params = degrade(speech_like(), RATE, only(mulaw_prob=1.0, bitdepth_prob=1.0), sample_rng(1, 0, 0))
    assert 4 <= params["mulaw_bits"] <= 8 and 4 <= params["bit_depth"] <= 12


def test_gain_changes_the_rms_by_the_drawn_db():
    clean = speech_like()
    loud, params = degrade(clean, RATE, only(gain_prob=1.0), sample_rng(1, 0, 0))
    change = 20 * np.log10(loud.double().pow(2).mean().sqrt().item() / clean.double().pow(2).mean().sqrt().item())
    assert -15.0 <= params["gain_db"] <= 6.0 and abs(change - params["gain_db"]) < 1e-4


def test_low_rate_removes_content_above_its_nyquist():
    t = np.arange(RATE) / RATE
    wave = np.sin(2 * np.pi * 1000 * t) + np.sin(2 * np.pi * 5000 * t)
    out = low_rate(wave, RATE, 8000)
    spectrum = np.abs(np.fft.rfft(out))
    assert out.size == wave.size
    assert spectrum[5000] < 1e-3 * spectrum[1000]  # > 60 dB down above 4 kHz
    assert abs(spectrum[1000] / np.abs(np.fft.rfft(wave))[1000] - 1) < 0.01
    _, params = degrade(torch.from_numpy(wave.astype(np.float32)), RATE, only(lowrate_prob=1.0), sample_rng(1, 0, 0))
    assert params["low_rate_hz"] in (8000, 11025, 12000)


def test_recorded_noise_and_rirs(tmp_path):
    write_noise_and_rirs(tmp_path)
    cfg = only(noise_prob=1.0, reverb_prob=1.0, noise_dir=str(tmp_path / "noise"), rir_dir=str(tmp_path / "rirs"))
    clean = speech_like()
    files = set()
    for index in range(6):
        noisy, params = degrade(clean, RATE, cfg, sample_rng(1, 0, index))
        assert params["noise"] == "file" and params["rir_file"] == "hall.wav" and "rt60_s" not in params
        files.add(params["noise_file"])
        assert noisy.shape == clean.shape and torch.isfinite(noisy).all()
    assert files == {"fan.wav", "street.flac"}
    # the recorded RIR is cut at its direct path: the reverberant speech stays aligned with the clean one
    white = torch.from_numpy(np.random.default_rng(0).standard_normal(4000).astype(np.float32))
    wet, _ = degrade(white, RATE, only(reverb_prob=1.0, rir_dir=str(tmp_path / "rirs")), sample_rng(1, 0, 0))
    assert np.argmax(np.correlate(wet.numpy(), white.numpy(), "full")) - 3999 == 0


def test_whole_set_is_a_pure_function_of_seed_epoch_index(tmp_path):
    write_noise_and_rirs(tmp_path)
    cfg, clean, pool = every_effect(tmp_path), speech_like(), others_pool()
    a, pa = degrade(clean, RATE, cfg, sample_rng(1, 2, 3), others=pool)
    b, pb = degrade(clean, RATE, cfg, sample_rng(1, 2, 3), others=pool)
    c, pc = degrade(clean, RATE, cfg, sample_rng(1, 2, 4), others=pool)
    assert torch.equal(a, b) and pa == pb
    assert not torch.equal(a, c) and pa != pc
    assert {
        "noise",
        "snr_db",
        "cutoff_hz",
        "low_rate_hz",
        "gain_db",
        "clip_ratio",
        "mulaw_bits",
        "bit_depth",
        "packet_loss_rate",
        "packets_lost",
    } <= set(pa)
    import json

    assert json.loads(json.dumps(pa)) == pa  # plain values: shard metadata can hold them


def test_whole_set_does_not_depend_on_torch_threads(tmp_path):
    write_noise_and_rirs(tmp_path)
    cfg, clean, pool = every_effect(tmp_path), speech_like(), others_pool()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [degrade(clean, RATE, cfg, sample_rng(1, 0, i), others=pool)[0] for i in range(6)]
        torch.set_num_threads(max(threads, 2))
        multi = [degrade(clean, RATE, cfg, sample_rng(1, 0, i), others=pool)[0] for i in range(6)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(s, m) for s, m in zip(single, multi))


@pytest.mark.parametrize("preset", DEGRADATION_PRESETS)
def test_every_degradation_preset_composes_and_runs(preset):
    cfg = compose_config("train_adapter", [f"degradation={preset}"])
    check_degradation(cfg.degradation)
    for index in range(8):
        noisy, params = degrade(speech_like(), RATE, cfg.degradation, sample_rng(1, 0, index), others=others_pool())
        assert noisy.shape == (RATE,) and torch.isfinite(noisy).all()
        if preset == "none":
            assert params == {} and torch.equal(noisy, speech_like())


def test_degradation_presets_and_default():
    assert {"default", "none", "strong"} <= set(DEGRADATION_PRESETS)
    cfg = compose_config("train_adapter", [])
    assert "babble" in cfg.degradation.noise_types and cfg.degradation.packet_loss_prob > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ({"snr_db": [30.0, 5.0]}, r"degradation.snr_db=\[30.0, 5.0\]: expected \[min, max\]"),
        ({"noise_types": ["pink", "rain"]}, r"unknown \['rain'\]"),
        ({"gain_prob": 1.5}, r"degradation.gain_prob=1.5: expected a probability"),
        ({"noise_dir": "/no/such/noise"}, r"degradation directory /no/such/noise does not exist"),
    ],
)
def test_bad_degradation_config_fails_before_training(override, message):
    with pytest.raises(ValueError, match=message):
        DegradedPairs(others_pool(), RATE, 4000, DegradationConfig(**override), seed=1, train=True)


def test_dataset_babble_comes_from_the_other_utterances():
    cfg = DegradationConfig(**{**OFF, "noise_prob": 1.0, "noise_types": ["babble"]})
    ds = DegradedPairs(others_pool(3), RATE, 4000, cfg, seed=5, train=True)
    a, b = ds[(1, 2)], ds[(1, 2)]
    assert torch.equal(a["noisy"], b["noisy"]) and not torch.equal(a["noisy"], a["clean"])
    assert torch.equal(
        DegradedPairs(others_pool(1), RATE, 4000, cfg, seed=5, train=True)[(1, 0)]["noisy"],
        DegradedPairs(others_pool(1), RATE, 4000, cfg, seed=5, train=True)[(1, 0)]["clean"],
    )
