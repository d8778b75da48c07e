"""Reading audio files: mono float32 at the model rate (or every channel at the file's own rate), with
the checks that tell a usable file from a missing, unreadable, empty, non-finite, silent or clipped one.

Audio is read with soundfile (torchaudio 2.11's ``load`` needs torchcodec/ffmpeg); other rates are
resampled with torchaudio. Loading a whole corpus, with the skipped files counted, is in corpus.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from pipeline.common.files import AUDIO_SUFFIXES

# A sample at or above this magnitude is "at full scale" (-0.009 dBFS; int16 full scale is 0.99997).
FULL_SCALE = 0.999
# A file with more than this fraction of its samples at full scale is treated as clipped: a
# recording normalised to 0 dBFS has a handful of such samples, a clipped one has runs of them.
# 0.1 % is 48 samples in 3 s at 16 kHz, which is audible clipping. None disables the check.
DEFAULT_MAX_CLIPPED_FRACTION = 0.001


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file, ``reason`` is one word for the
    skip counts (missing, unreadable, empty, non-finite, silent, clipped)."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    """What loading did to a file: its original rate and channel count."""

    sample_rate: int
    channels: int


def read_audio(
    path: str | Path, sample_rate: int, *, max_clipped_fraction: float | None = None
) -> tuple[torch.Tensor, AudioInfo]:
    """Like ``load_audio`` and also returns what the file was (rate, channels)."""
    wave, rate, channels = _read_mono(Path(path), max_clipped_fraction)
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave.contiguous(), AudioInfo(rate, channels)


def check_audio(path: str | Path, *, max_clipped_fraction: float | None = None) -> tuple[int, int]:
    """Read and check a file without resampling it; returns (frames, sample rate) or AudioError.
    For corpus scans that keep only paths (a file that passes loads without error later)."""
    wave, rate, _ = _read_mono(Path(path), max_clipped_fraction)
    return wave.numel(), rate


def read_channels(path: str | Path) -> tuple[torch.Tensor, int]:
    """Every channel of a file as a (channels, samples) float32 tensor at its own rate, with the same
    checks as ``load_audio`` (AudioError: missing, unreadable, empty, non-finite, silent)."""
    data, rate = _read_checked(Path(path), None)
    return _channels(data, rate, path)


def decode_channels(data: bytes, name: str) -> tuple[torch.Tensor, int]:
    """``read_channels`` of a file's bytes (an S3 object, a shard member); ``name`` names it in messages."""
    return _channels(*_checked(io.BytesIO(data), name, None), name)


def _channels(data: np.ndarray, rate: int, name) -> tuple[torch.Tensor, int]:
    if float(np.abs(data).max()) < 1e-5:
        raise AudioError(f"audio file {name} is silent", "silent")
    return torch.from_numpy(np.ascontiguousarray(data.T)), rate


def _read_mono(path: Path, max_clipped_fraction: float | None) -> tuple[torch.Tensor, int, int]:
    data, rate = _read_checked(path, max_clipped_fraction)
    wave = torch.from_numpy(data.mean(axis=1))
    if float(wave.abs().max()) < 1e-5:
        raise AudioError(f"audio file {path} is silent", "silent")
    return wave, rate, int(data.shape[1])


def _read_checked(path: Path, max_clipped_fraction: float | None) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 data and the rate of a readable, non-empty, finite file."""
    if not path.exists():
        raise AudioError(f"audio file {path} does not exist", "missing")
    return _checked(str(path), path, max_clipped_fraction)


def _checked(source, path, max_clipped_fraction: float | None) -> tuple[np.ndarray, int]:
    """``_read_checked`` of what soundfile reads (a path or a file object); ``path`` names it in messages."""
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        detail = str(err) if isinstance(source, str) else str(err).replace(f"{source!r}", "it")
        raise AudioError(f"cannot read audio file {path}: {detail}", "unreadable") from err
    if data.size == 0:
        raise AudioError(f"audio file {path} is empty", "empty")
    if not np.isfinite(data).all():
        raise AudioError(f"audio file {path} contains NaN or Inf samples", "non-finite")
    if max_clipped_fraction is not None:
        fraction = float(np.mean(np.abs(data) >= FULL_SCALE))
        if fraction > max_clipped_fraction:
            raise AudioError(
                f"audio file {path} is clipped ({fraction:.2%} of samples at full scale, "
                f"more than {max_clipped_fraction:.2%})",
                "clipped",
            )
    return data, int(rate)


def audio_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else every audio file under it (recursively, sorted); AudioError
    when the path is missing or a directory holds no audio."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise AudioError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {root}", "missing")
        return files
    raise AudioError(f"input not found: {root}", "missing")


def load_audio(path: str | Path, sample_rate: int, *, max_clipped_fraction: float | None = None) -> torch.Tensor:
    """Read ``path`` as a mono float32 tensor at ``sample_rate``; AudioError if unusable.

    Stereo is mixed down and other rates are resampled. ``max_clipped_fraction`` (off by default)
    rejects files with more than that fraction of samples at full scale.
    """
    return read_audio(path, sample_rate, max_clipped_fraction=max_clipped_fraction)[0]
