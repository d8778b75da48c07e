"""The log-mel front end (``ssl.family: logmel``) and its feature cleaner (docs/architecture.md, Models).

Beside the SSL encoders, a front end that needs no download and keeps the spectral detail a vocoder needs: a
frozen, parameter-free log-mel analysis, and a trainable cleaner that maps the degraded input's log-mel frames
to the clean input's (VoiceFixer's analysis-synthesis). ``CleanedLogMel`` has the interface of
``pipeline.models.adapters.AdaptedEncoder``, so train_adapter, the vocoder stages and the restoration chain use
either without knowing which.

Frames are not centred: a window of ``frames x hop + n_fft - hop`` samples gives exactly ``frames`` frames, the
same geometry as an SSL encoder's convolutional front end (``encoder_geometry``), so the chain's chunking and the
vocoder's crops work unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pipeline.models.convnext import ConvNeXtStack
from pipeline.models.losses import log_mel
from pipeline.models.padding import zero_past


class LogMelFrontEnd(nn.Module):
    """Waveform (batch, samples) -> natural-log mel magnitudes (batch, frames, n_mels); nothing trains."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int):
        super().__init__()
        import torchaudio

        if hop_length < 1 or n_fft < hop_length:
            raise ValueError(f"ssl.n_fft={n_fft} must be at least ssl.hop_length={hop_length} (and the hop >= 1)")
        self.n_fft, self.hop_length = n_fft, hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            hop_length=hop_length,
            n_mels=n_mels,
            power=1.0,
            center=False,
            norm="slaney",
            mel_scale="slaney",
        )

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        """Frames of inputs of ``samples`` samples (0 for one shorter than a window)."""
        return torch.div(samples - self.n_fft, self.hop_length, rounding_mode="floor").add(1).clamp_min(0)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return log_mel(wave, self.mel).transpose(1, 2)  # the losses' log-mel: float32, floor 1e-5


class FeatureCleaner(nn.Module):
    """Degraded log-mel frames -> cleaned ones: the input plus a correction from ConvNeXt blocks (each with
    ``kernel`` frames of context), whose output projection starts at zero, so training starts from the identity."""

    def __init__(self, n_mels: int, dim: int, blocks: int, kernel: int):
        super().__init__()
        self.body = ConvNeXtStack(n_mels, dim, 3 * dim, blocks, kernel)
        self.out = nn.Conv1d(dim, n_mels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, frames, n_mels) -> the same shape; ``frames``: valid frames per item of a padded batch."""
        x = features.transpose(1, 2)
        return (x + zero_past(self.out(self.body(x, frames)), frames)).transpose(1, 2)


class CleanedLogMel(nn.Module):
    """The log-mel front end with a trainable cleaner: ``AdaptedEncoder``'s interface for ``ssl.family=logmel``."""

    def __init__(self, front_end: LogMelFrontEnd, cleaner: FeatureCleaner):
        super().__init__()
        self.encoder = front_end  # the frozen part, under the name AdaptedEncoder gives it
        self.cleaner = cleaner
        self.cleaner_enabled = True

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What trains and is saved in checkpoints, by checkpoint key."""
        return {"cleaner": self.cleaner}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.cleaner.parameters())

    @contextmanager
    def adapters_disabled(self):
        """The plain log-mel analysis (the clean-feature target)."""
        self.cleaner_enabled = False
        try:
            yield
        finally:
            self.cleaner_enabled = True

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Cleaned features of ``wave`` (batch, samples) -> (batch, frames, n_mels); ``lengths``: valid samples
        per item of a zero-padded batch (the frames past each item's own are zero)."""
        features = self.encoder(wave)
        frames = self.encoder.frames(lengths) if lengths is not None else None
        if frames is not None:
            features = zero_past(features.transpose(1, 2), frames).transpose(1, 2)
        return self.cleaner(features, frames) if self.cleaner_enabled else features

    @torch.no_grad()
    def target_features(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The log-mel analysis alone (cleaner off), as ``forward``."""
        with self.adapters_disabled():
            return self(wave, lengths)


def build_log_mel(ssl) -> LogMelFrontEnd:
    """The front end of an ``EncoderConfig`` with ``family: logmel``; it has no weights to load."""
    if ssl.weights:
        raise ValueError(
            f"ssl={ssl.name} is a log-mel analysis with nothing to load: unset ssl.weights ({ssl.weights})"
        )
    return LogMelFrontEnd(int(ssl.sample_rate), int(ssl.n_fft), int(ssl.hop_length), int(ssl.embed_dim))


def build_cleaned_log_mel(ssl, adapter) -> CleanedLogMel:
    """``ssl`` (EncoderConfig, family logmel) with the cleaner ``adapter`` (AdapterConfig) configures."""
    cleaner = FeatureCleaner(int(ssl.embed_dim), adapter.cleaner_dim, adapter.cleaner_blocks, adapter.cleaner_kernel)
    return CleanedLogMel(build_log_mel(ssl), cleaner)
