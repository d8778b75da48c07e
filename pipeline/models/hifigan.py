"""HiFi-GAN (Kong et al. 2020): a generator from encoder features to a waveform, and the
multi-period (MPD) and multi-scale (MSD) discriminators (docs/architecture.md, Models).

The generator takes (batch, frames, dim) features at the encoder's frame rate (50 frames/s) and
upsamples by the product of ``upsample_rates`` to the output rate. Each discriminator returns its
scores and the feature maps of every layer (for the feature-matching loss); the losses are pure
functions in ``pipeline.models.losses``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from pipeline.config import VocoderConfig
from pipeline.models.padding import zero_past
from pipeline.models.vocos import VocosGenerator

LRELU_SLOPE = 0.1
GENERATORS = ("hifigan", "vocos")  # vocoder.generator
FEATURE_RATE = 50  # encoder frames per second (HuBERT-family conv front ends: stride 320 at 16 kHz)


class VocoderConfigError(ValueError):
    """A vocoder preset that cannot work; the message names the keys to fix."""


def validate_preset(cfg: VocoderConfig, feature_rate: float = FEATURE_RATE) -> None:
    """Refuse a preset whose upsampling does not turn ``feature_rate`` frames/s into ``sample_rate``."""
    rates, kernels = list(cfg.upsample_rates), list(cfg.upsample_kernel_sizes)
    wanted = cfg.sample_rate / feature_rate
    if cfg.generator not in GENERATORS:
        raise VocoderConfigError(f"vocoder.generator={cfg.generator!r}; choose one of {', '.join(GENERATORS)}")
    if cfg.generator == "vocos":
        _validate_vocos(cfg, wanted)
    total = math.prod(rates)
    if cfg.generator == "hifigan" and total != wanted:
        raise VocoderConfigError(
            f"vocoder preset {cfg.name!r}: the product of vocoder.upsample_rates {rates} is {total}, but features at "
            f"{feature_rate:g} frames/s need {wanted:g} to reach vocoder.sample_rate={cfg.sample_rate} "
            "(e.g. [8, 5, 4, 2] for 16000, [7, 7, 3, 3] for 22050)"
        )
    if len(kernels) != len(rates) or any(k < r for k, r in zip(kernels, rates)):
        raise VocoderConfigError(
            f"vocoder preset {cfg.name!r}: vocoder.upsample_kernel_sizes {kernels} needs one kernel per "
            f"upsample rate {rates}, each at least as large as its rate"
        )
    if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
        raise VocoderConfigError(
            f"vocoder preset {cfg.name!r}: resblock_kernel_sizes and resblock_dilation_sizes differ in length"
        )
    if cfg.resblock not in ("1", "2"):
        raise VocoderConfigError(f'vocoder.resblock={cfg.resblock!r}; choose "1" or "2"')
    if cfg.upsample_initial_channel >> len(rates) < 1:
        raise VocoderConfigError(
            f"vocoder.upsample_initial_channel={cfg.upsample_initial_channel} is too small to halve {len(rates)} times"
        )
    if cfg.conformer_layers < 0 or (
        cfg.conformer_layers and (cfg.conformer_dim % cfg.conformer_heads or cfg.conformer_kernel % 2 == 0)
    ):
        raise VocoderConfigError(
            f"vocoder preset {cfg.name!r}: vocoder.conformer_layers must be >= 0, and with Conformer blocks "
            f"vocoder.conformer_dim ({cfg.conformer_dim}) must divide by vocoder.conformer_heads "
            f"({cfg.conformer_heads}) and vocoder.conformer_kernel ({cfg.conformer_kernel}) must be odd"
        )
    if len(cfg.mpd_channels) != 5 or len(cfg.msd_channels) != 7 or cfg.msd_scales < 1 or not cfg.mpd_periods:
        raise VocoderConfigError(
            "vocoder.mpd_channels needs 5 widths, vocoder.msd_channels 7, vocoder.msd_scales >= 1 and "
            "vocoder.mpd_periods at least one period"
        )


def _validate_vocos(cfg: VocoderConfig, wanted: float) -> None:
    if cfg.vocos_hop != wanted:
        raise VocoderConfigError(
            f"vocoder preset {cfg.name!r}: vocoder.vocos_hop={cfg.vocos_hop}, but the features' frame rate needs "
            f"{wanted:g} output samples a frame to reach vocoder.sample_rate={cfg.sample_rate}"
        )
    if cfg.vocos_n_fft < cfg.vocos_hop or (cfg.vocos_n_fft - cfg.vocos_hop) % 2 or cfg.vocos_layers < 1:
        raise VocoderConfigError(
            f"vocoder preset {cfg.name!r}: vocoder.vocos_n_fft ({cfg.vocos_n_fft}) must be at least vocos_hop "
            f"({cfg.vocos_hop}) and differ from it by an even number (4 x hop is usual); vocos_layers >= 1"
        )


def generator_hop(cfg: VocoderConfig) -> int:
    """Output samples per feature frame of the preset's generator."""
    return int(cfg.vocos_hop) if cfg.generator == "vocos" else math.prod(cfg.upsample_rates)


def reflect_pad(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``F.pad(x, (left, right), mode="reflect")`` on the last dimension, built from slices and flips:
    the same values, but a backward pass that is deterministic on CUDA (reflection_pad1d's backward
    accumulates with atomic adds, which breaks bit-identical resume on a GPU)."""
    parts = [x[..., 1 : left + 1].flip(-1)] if left else []
    parts.append(x)
    if right:
        parts.append(x[..., -right - 1 : -1].flip(-1))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else x


class CenteredMelSpectrogram(nn.Module):
    """torchaudio's MelSpectrogram with ``center=True`` (reflect padding of n_fft // 2 on both sides),
    with the padding done by ``reflect_pad`` so that gradients through it are deterministic on CUDA."""

    def __init__(self, n_fft: int, **kwargs):
        super().__init__()
        import torchaudio

        self.pad = n_fft // 2
        self.mel = torchaudio.transforms.MelSpectrogram(n_fft=n_fft, center=False, **kwargs)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.mel(reflect_pad(wave, self.pad, self.pad))


def same_padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


def upsample_padding(kernel: int, rate: int) -> tuple[int, int]:
    """(padding, output_padding) that make a transposed convolution output exactly ``rate`` x its input."""
    excess = kernel - rate
    return (excess + 1) // 2, excess % 2


def _init_weights(module: nn.Module, std: float = 0.01) -> None:
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        nn.init.normal_(module.weight, 0.0, std)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Residual stack of dilated convolutions. Type "1": each dilated conv is followed by an
    undilated one; type "2": dilated convs only."""

    def __init__(self, channels: int, kernel: int, dilations: list[int], kind: str):
        super().__init__()
        self.dilated = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=same_padding(kernel, d)))
            for d in dilations
        )
        self.plain = (
            nn.ModuleList(
                weight_norm(nn.Conv1d(channels, channels, kernel, padding=same_padding(kernel))) for _ in dilations
            )
            if kind == "1"
            else None
        )
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, channels, time) -> the same shape. ``lengths``: valid time steps per item of a padded batch
        whose ``x`` is zero past them; every convolution's output is zeroed there too, so it stays zero."""
        for i, conv in enumerate(self.dilated):
            y = zero_past(conv(F.leaky_relu(x, LRELU_SLOPE)), lengths)
            if self.plain is not None:
                y = zero_past(self.plain[i](F.leaky_relu(y, LRELU_SLOPE)), lengths)
            x = x + y
        return x


class ConformerPrenet(nn.Module):
    """Linear -> Conformer blocks -> Linear, on (batch, frames, dim) features, before the upsampling
    (the open Miipher-2 reimplementation's vocoder front end). Every frame is valid: no padding mask."""

    def __init__(self, in_dim: int, out_dim: int, cfg: VocoderConfig):
        super().__init__()
        from torchaudio.models import Conformer

        self.input_projection = nn.Linear(in_dim, cfg.conformer_dim)
        self.conformer = Conformer(
            input_dim=cfg.conformer_dim,
            num_heads=cfg.conformer_heads,
            ffn_dim=cfg.conformer_ffn_dim,
            num_layers=cfg.conformer_layers,
            depthwise_conv_kernel_size=cfg.conformer_kernel,
            dropout=cfg.conformer_dropout,
        )
        self.output_projection = nn.Linear(cfg.conformer_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.input_projection(features)
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        x, _ = self.conformer(x, lengths)
        return self.output_projection(x)


class Generator(nn.Module):
    """Features (batch, frames, in_dim) -> waveform (batch, frames x prod(upsample_rates)) in [-1, 1]."""

    def __init__(self, in_dim: int, cfg: VocoderConfig):
        super().__init__()
        validate_preset(cfg, cfg.sample_rate / generator_hop(cfg))  # the frame rate is checked by its stage
        channels = cfg.upsample_initial_channel
        self.prenet = ConformerPrenet(in_dim, channels, cfg) if cfg.conformer_layers else None
        self.pre = weight_norm(nn.Conv1d(channels if self.prenet is not None else in_dim, channels, 7, padding=3))
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for rate, kernel in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
            padding, output_padding = upsample_padding(kernel, rate)
            up = nn.ConvTranspose1d(
                channels, channels // 2, kernel, rate, padding=padding, output_padding=output_padding
            )
            _init_weights(up)
            self.ups.append(weight_norm(up))
            channels //= 2
            self.blocks.append(
                nn.ModuleList(
                    ResBlock(channels, k, list(d), cfg.resblock)
                    for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
                )
            )
        self.post = weight_norm(nn.Conv1d(channels, 1, 7, padding=3))
        self.masks_padding = self.prenet is None  # a padded batch gives each item its own output (see forward)
        self.rates = list(cfg.upsample_rates)
        self.hop = math.prod(cfg.upsample_rates)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``lengths``: valid frames per item of a padded batch. Every convolution's output (at each resolution)
        is then zeroed past its item's end, so every convolution sees there the zeros of an unpadded run, and
        each item's valid samples (``lengths`` x ``hop``) are those of its own run; the rest are zero. The
        Conformer prenet is not masked (torchaudio's convolution module mixes padded frames in): with one,
        every item must fill the batch. None (training): every frame is valid."""
        if self.prenet is not None:
            if lengths is not None and bool((lengths < features.shape[1]).any()):
                raise ValueError(
                    "a generator with a Conformer prenet runs padded batches inexactly; give it "
                    "items of equal length (pipeline.models.encoder.by_length)"
                )
            features = self.prenet(features)
        x = zero_past(self.pre(zero_past(features.transpose(1, 2), lengths)), lengths)
        for up, blocks, rate in zip(self.ups, self.blocks, self.rates):
            lengths = lengths * rate if lengths is not None else None
            x = zero_past(up(F.leaky_relu(x, LRELU_SLOPE)), lengths)
            x = sum(block(x, lengths) for block in blocks) / len(blocks)  # multi-receptive-field fusion
        x = self.post(F.leaky_relu(x))  # default slope here, as in the reference implementation
        return zero_past(torch.tanh(x), lengths).squeeze(1)


# --------------------------------------------------------------------------------------------
# Discriminators: each sub-discriminator returns (scores, feature maps)
# --------------------------------------------------------------------------------------------

DiscriminatorOutput = tuple[list[torch.Tensor], list[list[torch.Tensor]]]  # scores, feature maps per sub-D


def conv_stack(x: torch.Tensor, convs: nn.ModuleList, post: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A discriminator body: leaky-ReLU convolutions, then the output convolution.
    Returns the flattened score and every layer's feature map (for the feature-matching loss)."""
    maps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        maps.append(x)
    x = post(x)
    maps.append(x)
    return x.flatten(1), maps


class PeriodDiscriminator(nn.Module):
    """Folds the waveform into (samples / period, period) and looks at each phase column with 2-D
    convolutions whose kernels span only the time axis."""

    def __init__(self, period: int, channels: list[int], kernel: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        strides = [stride] * (len(channels) - 1) + [1]
        ins = [1] + list(channels[:-1])
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(i, o, (kernel, 1), (s, 1), padding=(same_padding(kernel), 0)))
            for i, o, s in zip(ins, channels, strides)
        )
        self.post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = wave.unsqueeze(1)  # (batch, 1, samples)
        remainder = x.shape[-1] % self.period
        if remainder:
            x = reflect_pad(x, 0, self.period - remainder)
        x = x.view(x.shape[0], 1, -1, self.period)
        return conv_stack(x, self.convs, self.post)


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods: list[int], channels: list[int]):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, list(channels)) for p in periods)

    def forward(self, wave: torch.Tensor) -> DiscriminatorOutput:
        outputs = [d(wave) for d in self.discriminators]
        return [s for s, _ in outputs], [m for _, m in outputs]


# (kernel, stride, groups) of the seven convolutions of a scale discriminator
SCALE_LAYERS = [(15, 1, 1), (41, 2, 4), (41, 2, 16), (41, 4, 16), (41, 4, 16), (41, 1, 16), (5, 1, 1)]


class ScaleDiscriminator(nn.Module):
    """Strided, grouped 1-D convolutions over the (possibly average-pooled) waveform."""

    def __init__(self, channels: list[int], spectral: bool):
        super().__init__()
        norm = spectral_norm if spectral else weight_norm
        ins = [1] + list(channels[:-1])
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(i, o, k, s, groups=math.gcd(g, i, o), padding=same_padding(k)))
            for i, o, (k, s, g) in zip(ins, channels, SCALE_LAYERS)
        )
        self.post = norm(nn.Conv1d(channels[-1], 1, 3, 1, padding=1))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return conv_stack(wave.unsqueeze(1), self.convs, self.post)


class MultiScaleDiscriminator(nn.Module):
    """Scale discriminators on the raw waveform (spectral norm) and on 2x, 4x, ... pooled copies."""

    def __init__(self, scales: int, channels: list[int]):
        super().__init__()
        self.discriminators = nn.ModuleList(ScaleDiscriminator(list(channels), spectral=i == 0) for i in range(scales))
        self.pool = nn.AvgPool1d(4, 2, padding=2)

    def forward(self, wave: torch.Tensor) -> DiscriminatorOutput:
        scores, maps = [], []
        for i, d in enumerate(self.discriminators):
            if i > 0:
                wave = self.pool(wave.unsqueeze(1)).squeeze(1)
            s, m = d(wave)
            scores.append(s)
            maps.append(m)
        return scores, maps


def build_generator(in_dim: int, cfg: VocoderConfig) -> Generator | VocosGenerator:
    """The preset's generator (``vocoder.generator``: HiFi-GAN or Vocos) for features of width ``in_dim``."""
    validate_preset(cfg, cfg.sample_rate / generator_hop(cfg))
    return VocosGenerator(in_dim, cfg) if cfg.generator == "vocos" else Generator(in_dim, cfg)


def build_vocoder(
    in_dim: int, cfg: VocoderConfig
) -> tuple[Generator | VocosGenerator, MultiPeriodDiscriminator, MultiScaleDiscriminator]:
    """The generator and both discriminators of a preset (validated first)."""
    return (
        build_generator(in_dim, cfg),
        MultiPeriodDiscriminator(list(cfg.mpd_periods), list(cfg.mpd_channels)),
        MultiScaleDiscriminator(int(cfg.msd_scales), list(cfg.msd_channels)),
    )
