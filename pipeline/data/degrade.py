"""On-the-fly degradation of clean speech (DESIGN §7).

Every random choice comes from one NumPy generator seeded by (seed, epoch, index), so a sample is
degraded the same way in every run and after every resume, whatever process or DataLoader worker
builds it. Functions are pure: (wave, parameters) -> wave.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.config import DegradationConfig

NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one sample: independent for every (seed, epoch, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, stream]))


def coloured_noise(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white, pink or brown noise made by shaping white noise in the frequency domain."""
    if kind not in NOISE_EXPONENTS:
        raise ValueError(f"unknown noise type {kind!r}; known: {sorted(NOISE_EXPONENTS)}")
    white = rng.standard_normal(length)
    spectrum = np.fft.rfft(white)
    freqs = np.arange(len(spectrum), dtype=np.float64)
    freqs[0] = 1.0
    spectrum /= freqs ** (NOISE_EXPONENTS[kind] / 2)
    noise = np.fft.irfft(spectrum, n=length)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    signal_power = max(np.mean(wave**2), 1e-10)
    noise_power = max(np.mean(noise**2), 1e-10)
    return wave + np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10))) * noise


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


def clip(wave: np.ndarray, ratio: float) -> np.ndarray:
    level = np.max(np.abs(wave)) * ratio
    return np.clip(wave, -level, level)


def degrade(
    wave: torch.Tensor, sample_rate: int, cfg: DegradationConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Degrade one clean waveform; returns the degraded wave and the parameters drawn.

    The work is done in float64 NumPy (single-threaded), so the result does not depend on how many
    threads torch uses in this process or in a DataLoader worker: exact resume needs that.
    """
    params: dict[str, Any] = {}
    out = wave.numpy().astype(np.float64)
    if rng.random() < cfg.reverb_prob:
        params["rt60_s"] = float(rng.uniform(*cfg.rt60_s))
        out = reverberate(out, synthetic_rir(params["rt60_s"], sample_rate, rng))
    if cfg.noise_types and rng.random() < cfg.noise_prob:
        params["noise"] = str(cfg.noise_types[int(rng.integers(len(cfg.noise_types)))])
        params["snr_db"] = float(rng.uniform(*cfg.snr_db))
        out = add_noise(out, coloured_noise(params["noise"], out.size, rng), params["snr_db"])
    if rng.random() < cfg.bandlimit_prob:
        params["cutoff_hz"] = float(rng.uniform(*cfg.cutoff_hz))
        out = band_limit(out, sample_rate, params["cutoff_hz"])
    if rng.random() < cfg.clip_prob:
        params["clip_ratio"] = float(rng.uniform(*cfg.clip_ratio))
        out = clip(out, params["clip_ratio"])
    return torch.from_numpy(out.astype(np.float32)), params
