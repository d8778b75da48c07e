"""A Vocos-style generator (Siuzdenko et al. 2023): features -> STFT magnitude and phase at the frame rate ->
waveform by an inverse STFT (docs/architecture.md, Models).

No upsampling layers: ConvNeXt blocks run at the feature frame rate and a linear head predicts, per frame,
``n_fft // 2 + 1`` log-magnitudes and phases; an inverse STFT with "same" padding turns ``frames`` frames into
exactly ``frames x hop`` samples, frame ``i``'s window centred on output samples ``[i x hop, (i + 1) x hop)``, as
HiFi-GAN's output is. Far fewer operations per output sample than HiFi-GAN's convolutions at every resolution,
which is what makes it converge in a CPU budget. Trained with the same discriminators and losses as HiFi-GAN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import VocoderConfig
from pipeline.models.convnext import ConvNeXtStack
from pipeline.models.padding import zero_past

MAX_MAGNITUDE = 100.0  # exp of the predicted log-magnitude is clipped here (Vocos' own bound)


def overlap_add_envelope(window: torch.Tensor, hop: int) -> torch.Tensor:
    """Sum of ``window**2`` over every frame covering an output sample, for one hop's samples (it repeats with
    period ``hop`` away from the ends): what the overlap-add is divided by."""
    squared = F.pad(window.pow(2), (0, (-window.numel()) % hop))
    return squared.view(-1, hop).sum(0)


def istft_same(spec: torch.Tensor, window: torch.Tensor, hop: int, envelope: torch.Tensor) -> torch.Tensor:
    """Inverse STFT of ``spec`` (batch, n_fft // 2 + 1, frames), complex -> (batch, frames x hop) samples.

    Each frame's inverse FFT, windowed, is overlap-added; the sum is divided by the steady-state window envelope
    (not by the envelope of the frames present), so a frame that is zero contributes nothing and a zero-padded
    batch's valid samples equal those of each item's own run. ``(n_fft - hop) / 2`` samples are trimmed on both
    sides ("same" padding)."""
    n_fft, frames = window.numel(), spec.shape[-1]
    pieces = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None]  # (batch, n_fft, frames)
    length = (frames - 1) * hop + n_fft
    wave = F.fold(pieces, output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop)).flatten(1)
    wave = wave / envelope.repeat(math.ceil(length / hop))[:length]
    trim = (n_fft - hop) // 2
    return wave[:, trim : trim + frames * hop]


class VocosGenerator(nn.Module):
    """Features (batch, frames, in_dim) -> waveform (batch, frames x vocos_hop), like ``hifigan.Generator``."""

    def __init__(self, in_dim: int, cfg: VocoderConfig):
        super().__init__()
        self.hop, n_fft = int(cfg.vocos_hop), int(cfg.vocos_n_fft)
        self.masks_padding = True  # a padded batch gives each item its own output (see forward)
        self.body = ConvNeXtStack(in_dim, cfg.vocos_dim, cfg.vocos_intermediate, cfg.vocos_layers)
        self.head = nn.Linear(cfg.vocos_dim, n_fft + 2)
        window = torch.hann_window(n_fft)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("envelope", overlap_add_envelope(window, self.hop), persistent=False)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``lengths``: valid frames per item of a padded batch; the spectra of frames past them are zero, so each
        item's valid samples (``lengths`` x ``hop``) are those of its own run; the rest are zero."""
        x = self.head(self.body(features.transpose(1, 2), lengths).transpose(1, 2)).transpose(1, 2)
        with torch.autocast(x.device.type, enabled=False):  # the inverse STFT needs float32
            log_magnitude, phase = x.float().chunk(2, dim=1)
            magnitude = zero_past(log_magnitude.exp().clamp(max=MAX_MAGNITUDE), lengths)
            wave = istft_same(torch.polar(magnitude, phase), self.window, self.hop, self.envelope)
        samples = lengths * self.hop if lengths is not None else None
        return zero_past(wave[:, None], samples).squeeze(1)
