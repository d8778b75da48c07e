"""On-the-fly degradation of clean speech (docs/architecture.md, Data).

Every random choice comes from one NumPy generator seeded by (seed, epoch, index), so a sample is
degraded the same way in every run and after every resume, whatever process or DataLoader worker
builds it. The work is float64 NumPy/SciPy on one thread: the result does not depend on torch's
thread count. Effect functions are pure: (wave, parameters) -> wave.

``degrade`` applies, each with its own probability and in this order (a signal chain from the room
to the network): reverberation (synthetic RIR or a recorded one), additive noise (white, pink,
brown, babble of other utterances, mains hum, or a noise recording) at a sampled SNR, band
limiting (FFT low-pass), a low sample rate (resampled down and back up), gain, clipping, mu-law
quantisation, bit-depth reduction and packet loss. It returns the parameters it drew, named per
effect, as plain JSON-serialisable values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from pipeline.common.files import AUDIO_SUFFIXES
from pipeline.config import DegradationConfig

log = logging.getLogger(__name__)

NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent
NOISE_TYPES = (*NOISE_EXPONENTS, "babble", "hum")

Wave = np.ndarray | torch.Tensor
# Other utterances for babble: a sequence of waveforms, or a callable that picks one with the rng.
Others = Sequence[Wave] | Callable[[np.random.Generator], Wave]


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one sample: independent for every (seed, epoch, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, stream]))


# --------------------------------------------------------------------------------------------
# Additive noise
# --------------------------------------------------------------------------------------------


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def coloured_noise(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white, pink or brown noise made by shaping white noise in the frequency domain."""
    if kind not in NOISE_EXPONENTS:
        raise ValueError(f"unknown noise type {kind!r}; known: {sorted(NOISE_EXPONENTS)}")
    white = rng.standard_normal(length)
    spectrum = np.fft.rfft(white)
    freqs = np.arange(len(spectrum), dtype=np.float64)
    freqs[0] = 1.0
    spectrum /= freqs ** (NOISE_EXPONENTS[kind] / 2)
    return _unit_rms(np.fft.irfft(spectrum, n=length))


def hum(length: int, sample_rate: int, mains_hz: float, harmonics: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS mains hum: ``harmonics`` multiples of ``mains_hz`` (below Nyquist) with amplitudes
    falling as 1/k (randomly scaled by 0.5-1) and random phases."""
    t = np.arange(length) / sample_rate
    out = np.zeros(length)
    for k in range(1, harmonics + 1):
        amplitude, phase = rng.uniform(0.5, 1.0) / k, rng.uniform(0.0, 2 * np.pi)
        if k * mains_hz < sample_rate / 2:
            out += amplitude * np.sin(2 * np.pi * k * mains_hz * t + phase)
    return _unit_rms(out)


def excerpt(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` samples of ``wave`` from a random offset; a shorter wave is looped."""
    if wave.size >= length:
        start = int(rng.integers(wave.size - length + 1))
        return wave[start : start + length]
    return np.resize(np.roll(wave, -int(rng.integers(wave.size))), length)


def _as_array(wave: Wave) -> np.ndarray:
    return (wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)).astype(np.float64)


def _pick_other(others: Others, rng: np.random.Generator) -> np.ndarray:
    chosen = others(rng) if callable(others) else others[int(rng.integers(len(others)))]
    return _as_array(chosen)


def babble(length: int, speakers: int, others: Others, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS babble: ``speakers`` other utterances (each at unit RMS, random offsets) summed."""
    total = np.zeros(length)
    for _ in range(speakers):
        total += _unit_rms(excerpt(_pick_other(others, rng), length, rng))
    return _unit_rms(total)


class OtherUtterances:
    """Babble source for utterance ``exclude`` of ``waves``: any of the others, drawn with the rng."""

    def __init__(self, waves: Sequence[Wave], exclude: int | None = None):
        self.waves = waves
        self.exclude = exclude

    def __len__(self) -> int:
        return len(self.waves) - (self.exclude is not None and 0 <= self.exclude < len(self.waves))

    def __call__(self, rng: np.random.Generator) -> Wave:
        i = int(rng.integers(len(self)))
        if self.exclude is not None and i >= self.exclude:
            i += 1
        return self.waves[i]


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    signal_power = max(np.mean(wave**2), 1e-10)
    noise_power = max(np.mean(noise**2), 1e-10)
    return wave + np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10))) * noise


# --------------------------------------------------------------------------------------------
# Recorded noise and impulse responses (noise_dir, rir_dir)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def audio_files(directory: str) -> tuple[Path, ...]:
    """Readable audio files under ``directory`` (recursive, sorted); ValueError if there are none."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"degradation directory {root} does not exist")
    files, unreadable = [], 0
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        try:
            if sf.info(str(path)).frames > 0:
                files.append(path)
                continue
        except Exception:  # soundfile raises several error types for unreadable files
            pass
        unreadable += 1
    if unreadable:
        log.warning("%s: ignoring %d unreadable or empty audio files", root, unreadable)
    if not files:
        raise ValueError(f"no readable audio files ({', '.join(AUDIO_SUFFIXES)}) under degradation directory {root}")
    return tuple(files)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased, deterministic, single-threaded)."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly  # 0.8 s to import: only jobs that resample pay it

    g = math.gcd(int(rate), int(target))
    return resample_poly(wave, target // g, rate // g)


def recorded_noise(directory: str, length: int, sample_rate: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A ``length``-sample excerpt of a random noise recording (looped if short) and its name."""
    files = audio_files(directory)
    path = files[int(rng.integers(len(files)))]
    info = sf.info(str(path))
    needed = int(math.ceil(length * info.samplerate / sample_rate)) + 1
    start = int(rng.integers(info.frames - needed + 1)) if info.frames > needed else 0
    data, rate = sf.read(str(path), start=start, frames=needed, dtype="float64", always_2d=True)
    noise = resample(data.mean(axis=1), rate, sample_rate)
    return excerpt(noise, length, rng), str(path.relative_to(directory))


def recorded_rir(directory: str, sample_rate: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A random recorded impulse response, cut to start at its direct path (its peak), so the
    reverberant speech stays time-aligned with the clean speech, at unit energy."""
    files = audio_files(directory)
    path = files[int(rng.integers(len(files)))]
    data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    rir = resample(data.mean(axis=1), rate, sample_rate)
    rir = rir[int(np.argmax(np.abs(rir))) :]
    return rir / (np.sqrt(np.sum(rir**2)) + 1e-12), str(path.relative_to(directory))


# --------------------------------------------------------------------------------------------
# Reverberation, band limiting, level, quantisation, packet loss
# --------------------------------------------------------------------------------------------


def synthetic_rir(rt60_s: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Exponentially decaying noise tail after a unit direct path (a simple diffuse-field room)."""
    length = max(int(rt60_s * sample_rate), 1)
    t = np.arange(length) / sample_rate
    rir = rng.standard_normal(length) * np.exp(-6.908 * t / rt60_s) * 0.3  # -60 dB at rt60
    rir[0] = 1.0
    return rir / np.sqrt(np.sum(rir**2))


def _fft_size(n: int) -> int:
    return 1 << (n - 1).bit_length()


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    n = _fft_size(wave.size + rir.size - 1)
    wet = np.fft.irfft(np.fft.rfft(wave, n) * np.fft.rfft(rir, n), n)[: wave.size]
    return wet * np.sqrt(np.mean(wave**2) / max(np.mean(wet**2), 1e-16))


def band_limit(wave: np.ndarray, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    """Low-pass at ``cutoff_hz`` (what a narrow-band channel or a low sample rate leaves)."""
    if cutoff_hz >= sample_rate / 2:
        return wave
    spectrum = np.fft.rfft(wave)
    freqs = np.fft.rfftfreq(wave.size, 1.0 / sample_rate)
    spectrum[freqs > cutoff_hz] = 0.0
    return np.fft.irfft(spectrum, n=wave.size)


def low_rate(wave: np.ndarray, sample_rate: int, rate: int) -> np.ndarray:
    """Resample down to ``rate`` and back up (what a telephone-rate recording sounds like): the
    polyphase anti-aliasing filter removes the content above ``rate / 2``. Same length out."""
    if rate >= sample_rate:
        return wave
    back = resample(resample(wave, sample_rate, rate), rate, sample_rate)
    return np.pad(back[: wave.size], (0, max(wave.size - back.size, 0)))


def gain(wave: np.ndarray, gain_db: float) -> np.ndarray:
    return wave * 10 ** (gain_db / 20)


def clip(wave: np.ndarray, ratio: float) -> np.ndarray:
    level = np.max(np.abs(wave)) * ratio
    return np.clip(wave, -level, level)


def mu_law(wave: np.ndarray, bits: int) -> np.ndarray:
    """Mu-law companding with 2**bits levels (mu = 2**bits - 1; 8 bits is G.711's mu = 255), then
    expanded back. Input beyond [-1, 1] saturates, as in a real codec."""
    levels = 2**bits
    mu = levels - 1
    x = np.clip(wave, -1.0, 1.0)
    compressed = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    quantised = np.round((compressed + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
    return np.sign(quantised) * np.expm1(np.abs(quantised) * np.log1p(mu)) / mu


def bit_depth(wave: np.ndarray, bits: int) -> np.ndarray:
    """Uniform quantisation to ``bits`` bits over [-1, 1) (saturating), like a low-bit PCM file."""
    half = 2 ** (bits - 1)
    return np.clip(np.round(wave * half), -half, half - 1) / half


def packet_loss(
    wave: np.ndarray, sample_rate: int, rate: float, packet_ms: float, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Zero ``round(rate * packets)`` randomly chosen packets of ``packet_ms``; returns the number lost."""
    size = max(int(round(packet_ms * sample_rate / 1000)), 1)
    packets = int(math.ceil(wave.size / size))
    lost = int(round(rate * packets))
    out = wave.copy()
    for p in rng.choice(packets, size=lost, replace=False):
        out[int(p) * size : (int(p) + 1) * size] = 0.0
    return out, lost


# --------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------


def _happens(rng: np.random.Generator, prob: float) -> bool:
    """One draw per effect, skipped for effects that are off, so configs without the newer effects
    draw exactly the numbers they drew before those effects existed (exact resume of old runs)."""
    return prob > 0 and bool(rng.random() < prob)


def _int_between(rng: np.random.Generator, bounds: Sequence[int]) -> int:
    return int(rng.integers(int(bounds[0]), int(bounds[1]) + 1))


def _has_others(others: Others | None) -> bool:
    if others is None:
        return False
    return len(others) > 0 if hasattr(others, "__len__") else True


def _reverb(out: np.ndarray, sample_rate: int, cfg, rng, params: dict[str, Any]) -> np.ndarray:
    if cfg.rir_dir and _happens(rng, cfg.rir_dir_prob):
        rir, params["rir_file"] = recorded_rir(cfg.rir_dir, sample_rate, rng)
    else:
        params["rt60_s"] = float(rng.uniform(*cfg.rt60_s))
        rir = synthetic_rir(params["rt60_s"], sample_rate, rng)
    return reverberate(out, rir)


def _noise(out: np.ndarray, sample_rate: int, cfg, rng, params: dict[str, Any], others) -> np.ndarray:
    if cfg.noise_dir and _happens(rng, cfg.noise_dir_prob):
        params["noise"] = "file"
        params["snr_db"] = float(rng.uniform(*cfg.snr_db))
        noise, params["noise_file"] = recorded_noise(cfg.noise_dir, out.size, sample_rate, rng)
        return add_noise(out, noise, params["snr_db"])
    types = [str(t) for t in cfg.noise_types if t != "babble" or _has_others(others)]
    if not types:
        return out
    params["noise"] = types[int(rng.integers(len(types)))]
    params["snr_db"] = float(rng.uniform(*cfg.snr_db))
    if params["noise"] == "babble":
        params["babble_speakers"] = _int_between(rng, cfg.babble_speakers)
        noise = babble(out.size, params["babble_speakers"], others, rng)
    elif params["noise"] == "hum":
        params["hum_hz"] = float(cfg.hum_hz[int(rng.integers(len(cfg.hum_hz)))])
        params["hum_harmonics"] = _int_between(rng, cfg.hum_harmonics)
        noise = hum(out.size, sample_rate, params["hum_hz"], params["hum_harmonics"], rng)
    else:
        noise = coloured_noise(params["noise"], out.size, rng)
    return add_noise(out, noise, params["snr_db"])


def degrade(
    wave: torch.Tensor,
    sample_rate: int,
    cfg: DegradationConfig,
    rng: np.random.Generator,
    *,
    others: Others | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Degrade one clean waveform; returns the degraded wave and the parameters drawn.

    ``others`` supplies other utterances for babble noise (a sequence of waveforms, or a callable
    drawing one with the rng, e.g. ``OtherUtterances``); without it babble is not among the noise
    types drawn. The work is done in float64 NumPy (single-threaded), so the result does not depend
    on how many threads torch uses in this process or in a DataLoader worker: exact resume needs that.
    """
    params: dict[str, Any] = {}
    out = _as_array(wave)
    if rng.random() < cfg.reverb_prob:
        out = _reverb(out, sample_rate, cfg, rng, params)
    if (cfg.noise_types or cfg.noise_dir) and rng.random() < cfg.noise_prob:
        out = _noise(out, sample_rate, cfg, rng, params, others)
    if rng.random() < cfg.bandlimit_prob:
        params["cutoff_hz"] = float(rng.uniform(*cfg.cutoff_hz))
        out = band_limit(out, sample_rate, params["cutoff_hz"])
    if _happens(rng, cfg.lowrate_prob):
        rates = [int(r) for r in cfg.low_rates_hz if int(r) < sample_rate]
        if rates:
            params["low_rate_hz"] = rates[int(rng.integers(len(rates)))]
            out = low_rate(out, sample_rate, params["low_rate_hz"])
    if _happens(rng, cfg.gain_prob):
        params["gain_db"] = float(rng.uniform(*cfg.gain_db))
        out = gain(out, params["gain_db"])
    if rng.random() < cfg.clip_prob:
        params["clip_ratio"] = float(rng.uniform(*cfg.clip_ratio))
        out = clip(out, params["clip_ratio"])
    if _happens(rng, cfg.mulaw_prob):
        params["mulaw_bits"] = _int_between(rng, cfg.mulaw_bits)
        out = mu_law(out, params["mulaw_bits"])
    if _happens(rng, cfg.bitdepth_prob):
        params["bit_depth"] = _int_between(rng, cfg.bit_depth)
        out = bit_depth(out, params["bit_depth"])
    if _happens(rng, cfg.packet_loss_prob):
        params["packet_loss_rate"] = float(rng.uniform(*cfg.packet_loss_rate))
        out, params["packets_lost"] = packet_loss(out, sample_rate, params["packet_loss_rate"], cfg.packet_ms, rng)
    return torch.from_numpy(out.astype(np.float32)), params


def check_degradation(cfg: DegradationConfig) -> None:
    """Fail before training with one clear message for a config ``degrade`` cannot use."""
    for name in (
        "noise_prob",
        "noise_dir_prob",
        "reverb_prob",
        "rir_dir_prob",
        "bandlimit_prob",
        "lowrate_prob",
        "gain_prob",
        "clip_prob",
        "mulaw_prob",
        "bitdepth_prob",
        "packet_loss_prob",
    ):
        if not 0.0 <= float(getattr(cfg, name)) <= 1.0:
            raise ValueError(f"degradation.{name}={getattr(cfg, name)}: expected a probability in [0, 1]")
    for name in (
        "snr_db",
        "babble_speakers",
        "hum_harmonics",
        "rt60_s",
        "cutoff_hz",
        "gain_db",
        "clip_ratio",
        "mulaw_bits",
        "bit_depth",
        "packet_loss_rate",
    ):
        bounds = list(getattr(cfg, name))
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise ValueError(f"degradation.{name}={bounds}: expected [min, max]")
    unknown = [t for t in cfg.noise_types if t not in NOISE_TYPES]
    if unknown:
        raise ValueError(f"degradation.noise_types: unknown {unknown}; known: {list(NOISE_TYPES)}")
    if min(cfg.mulaw_bits[0], cfg.bit_depth[0], cfg.babble_speakers[0], cfg.hum_harmonics[0]) < 1:
        raise ValueError("degradation.mulaw_bits, bit_depth, babble_speakers and hum_harmonics must be at least 1")
    if cfg.rt60_s[0] <= 0 or not 0 <= cfg.packet_loss_rate[0] <= cfg.packet_loss_rate[1] <= 1:
        raise ValueError("degradation.rt60_s must be positive and packet_loss_rate within [0, 1]")
    if "hum" in cfg.noise_types and not cfg.hum_hz:
        raise ValueError("degradation.hum_hz is empty: name the mains frequencies, e.g. [50, 60]")
    for name in ("noise_dir", "rir_dir"):
        if getattr(cfg, name):
            audio_files(str(getattr(cfg, name)))  # raises naming the directory
