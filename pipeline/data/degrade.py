"""On-the-fly degradation of clean speech (DESIGN §7).

Every random choice comes from one NumPy generator seeded by (seed, epoch, index), so a sample is
degraded the same way in every run and after every resume, whatever process or DataLoader worker
builds it. Functions are pure: (wave, parameters) -> wave.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF

from pipeline.config import DegradationConfig

NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one sample: independent for every (seed, epoch, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, stream]))


def coloured_noise(kind: str, length: int, rng: np.random.Generator) -> torch.Tensor:
    """Unit-RMS white, pink or brown noise made by shaping white noise in the frequency domain."""
    if kind not in NOISE_EXPONENTS:
        raise ValueError(f"unknown noise type {kind!r}; known: {sorted(NOISE_EXPONENTS)}")
    white = rng.standard_normal(length)
    spectrum = np.fft.rfft(white)
    freqs = np.arange(len(spectrum), dtype=np.float64)
    freqs[0] = 1.0
    spectrum /= freqs ** (NOISE_EXPONENTS[kind] / 2)
    noise = np.fft.irfft(spectrum, n=length)
    noise /= np.sqrt(np.mean(noise**2)) + 1e-12
    return torch.from_numpy(noise.astype(np.float32))


def add_noise(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    signal_power = wave.pow(2).mean().clamp_min(1e-10)
    noise_power = noise.pow(2).mean().clamp_min(1e-10)
    scale = torch.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return wave + scale * noise


def synthetic_rir(rt60_s: float, sample_rate: int, rng: np.random.Generator) -> torch.Tensor:
    """Exponentially decaying noise tail after a unit direct path (a simple diffuse-field room)."""
    length = max(int(rt60_s * sample_rate), 1)
    t = np.arange(length) / sample_rate
    tail = rng.standard_normal(length) * np.exp(-6.908 * t / rt60_s)  # -60 dB at rt60
    tail[0] = 0.0
    rir = tail * 0.3
    rir[0] = 1.0
    return torch.from_numpy((rir / np.sqrt(np.sum(rir**2))).astype(np.float32))


def reverberate(wave: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    wet = AF.fftconvolve(wave, rir)[: wave.numel()]
    return wet * (wave.pow(2).mean().sqrt() / wet.pow(2).mean().sqrt().clamp_min(1e-8))


def band_limit(wave: torch.Tensor, sample_rate: int, cutoff_hz: float) -> torch.Tensor:
    """Low-pass by going through a lower sample rate (what a narrow-band channel does)."""
    low_rate = int(max(2 * cutoff_hz // 100 * 100, 1000))
    if low_rate >= sample_rate:
        return wave
    return AF.resample(AF.resample(wave, sample_rate, low_rate), low_rate, sample_rate)[: wave.numel()]


def clip(wave: torch.Tensor, ratio: float) -> torch.Tensor:
    level = float(wave.abs().max()) * ratio
    return wave.clamp(-level, level)


def degrade(
    wave: torch.Tensor, sample_rate: int, cfg: DegradationConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Degrade one clean waveform; returns the degraded wave and the parameters drawn."""
    params: dict[str, Any] = {}
    out = wave
    if rng.random() < cfg.reverb_prob:
        params["rt60_s"] = float(rng.uniform(*cfg.rt60_s))
        out = reverberate(out, synthetic_rir(params["rt60_s"], sample_rate, rng))
    if cfg.noise_types and rng.random() < cfg.noise_prob:
        params["noise"] = str(cfg.noise_types[int(rng.integers(len(cfg.noise_types)))])
        params["snr_db"] = float(rng.uniform(*cfg.snr_db))
        out = add_noise(out, coloured_noise(params["noise"], out.numel(), rng), params["snr_db"])
    if rng.random() < cfg.bandlimit_prob:
        params["cutoff_hz"] = float(rng.uniform(*cfg.cutoff_hz))
        out = band_limit(out, sample_rate, params["cutoff_hz"])
    if rng.random() < cfg.clip_prob:
        params["clip_ratio"] = float(rng.uniform(*cfg.clip_ratio))
        out = clip(out, params["clip_ratio"])
    return out.contiguous(), params
