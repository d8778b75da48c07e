"""Speech quality and intelligibility metrics as pure functions of (reference, estimate) waveforms.

PESQ (ITU-T P.862.2 wide band, ``pesq``), STOI and extended STOI (``pystoi``) and DNSMOS P.835
(``speechmos``, whose ONNX models ship with the package) come from those libraries; SI-SDR and the
log-spectral distance are short formulas written here. Every function takes mono float arrays at
``RATE`` and returns NaN where the metric is undefined (e.g. PESQ finds no speech), never raises.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

RATE = 16000  # every metric here works at 16 kHz (PESQ wide band, DNSMOS)
INTRUSIVE = ("pesq_wb", "stoi", "estoi", "si_sdr", "lsd")  # need the clean reference
NON_INTRUSIVE = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl")
HIGHER_IS_BETTER = {
    "pesq_wb": True,
    "stoi": True,
    "estoi": True,
    "si_sdr": True,
    "lsd": False,
    "dnsmos_sig": True,
    "dnsmos_bak": True,
    "dnsmos_ovrl": True,
    "cer": False,
    "wer": False,
}


def aligned(reference: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(reference), len(estimate))
    return np.asarray(reference[:n], dtype=np.float64), np.asarray(estimate[:n], dtype=np.float64)


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019), both signals zero-mean."""
    ref, est = aligned(reference, estimate)
    ref, est = ref - ref.mean(), est - est.mean()
    energy = float(np.dot(ref, ref))
    if energy == 0.0:
        return math.nan
    target = np.dot(est, ref) / energy * ref
    noise = est - target
    return float(10 * np.log10(max(np.dot(target, target), 1e-20) / max(np.dot(noise, noise), 1e-20)))


def log_spectral_distance(reference: np.ndarray, estimate: np.ndarray, n_fft: int = 512, hop: int = 128) -> float:
    """Mean over frames of the RMS difference of log10 power spectra (the usual LSD, in its log10 units)."""
    import torch

    ref, est = aligned(reference, estimate)
    if len(ref) < n_fft:
        return math.nan
    window = torch.hann_window(n_fft, dtype=torch.float64)

    def power(x: np.ndarray) -> torch.Tensor:
        return torch.stft(torch.from_numpy(x), n_fft, hop, window=window, return_complex=True).abs().pow(2)

    diff = torch.log10(power(ref) + 1e-10) - torch.log10(power(est) + 1e-10)  # (freq, frames)
    return float(diff.pow(2).mean(dim=0).sqrt().mean())


def pesq_wb(reference: np.ndarray, estimate: np.ndarray) -> float:
    from pesq import PesqError, pesq

    ref, est = aligned(reference, estimate)
    try:
        return float(pesq(RATE, ref, est, "wb"))
    except (PesqError, ValueError) as err:  # no utterance detected, too short
        log.debug("PESQ undefined: %s", err)
        return math.nan


def stoi(reference: np.ndarray, estimate: np.ndarray, extended: bool = False) -> float:
    from pystoi import stoi as pystoi

    ref, est = aligned(reference, estimate)
    try:
        value = float(pystoi(ref, est, RATE, extended=extended))
    except Exception as err:  # too short for one analysis window
        log.debug("STOI undefined: %s", err)
        return math.nan
    return value if math.isfinite(value) else math.nan


def dnsmos(estimate: np.ndarray) -> dict[str, float]:
    """DNSMOS P.835: speech quality (SIG), background noise (BAK) and overall (OVRL), 1-5, no reference."""
    from speechmos import dnsmos as model

    x = np.clip(np.asarray(estimate, dtype=np.float32), -1.0, 1.0)
    try:
        scores = model.run(x, RATE)
    except Exception as err:
        log.debug("DNSMOS undefined: %s", err)
        return {name: math.nan for name in NON_INTRUSIVE}
    return {
        "dnsmos_sig": float(scores["sig_mos"]),
        "dnsmos_bak": float(scores["bak_mos"]),
        "dnsmos_ovrl": float(scores["ovrl_mos"]),
    }


def intrusive(reference: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """Every metric that compares ``estimate`` with the clean ``reference``."""
    return {
        "pesq_wb": pesq_wb(reference, estimate),
        "stoi": stoi(reference, estimate),
        "estoi": stoi(reference, estimate, extended=True),
        "si_sdr": si_sdr(reference, estimate),
        "lsd": log_spectral_distance(reference, estimate),
    }
