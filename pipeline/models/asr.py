"""Conformer CTC speech recogniser (docs/architecture.md, Models): log-mel front end, convolutional subsampling,
``torchaudio.models.Conformer`` and a linear CTC head over characters; greedy decoding; CER/WER.
"""

from __future__ import annotations

import unicodedata

import torch
import torchaudio
from torch import nn
from torchaudio.functional import edit_distance
from torchaudio.models import Conformer

from pipeline.config import ConformerConfig

BLANK = 0  # CTC blank; characters are 1..len(vocabulary)


class CharVocabulary:
    """Characters <-> token ids; text is normalised first (lower case, accents stripped, anything
    outside the vocabulary becomes a space, runs of spaces collapse)."""

    def __init__(self, characters: str):
        if len(set(characters)) != len(characters) or not characters:
            raise ValueError(f"asr.vocabulary={characters!r} must be non-empty characters without repeats")
        self.characters = characters
        self._ids = {c: i + 1 for i, c in enumerate(characters)}

    def __len__(self) -> int:
        return len(self.characters) + 1  # with the blank

    def normalize(self, text: str) -> str:
        text = unicodedata.normalize("NFKD", text.lower())
        text = "".join(c for c in text if not unicodedata.combining(c))
        text = "".join(c if c in self._ids else " " for c in text)
        return " ".join(text.split())

    def encode(self, text: str) -> list[int]:
        return [self._ids[c] for c in self.normalize(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.characters[i - 1] for i in ids if 0 < i <= len(self.characters))


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, vocab: CharVocabulary) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best = log_probs.argmax(-1).cpu()
    texts = []
    for row, length in zip(best, lengths.cpu().tolist()):
        ids = torch.unique_consecutive(row[:length]).tolist()
        texts.append(" ".join(vocab.decode([i for i in ids if i != BLANK]).split()))
    return texts


def error_counts(hypotheses: list[str], references: list[str]) -> dict[str, tuple[int, int]]:
    """Character and word edit counts with the reference lengths: {"cer": (edits, chars), "wer": ...}."""
    char_edits = sum(edit_distance(r, h) for h, r in zip(hypotheses, references))
    word_edits = sum(edit_distance(r.split(), h.split()) for h, r in zip(hypotheses, references))
    return {
        "cer": (char_edits, sum(len(r) for r in references)),
        "wer": (word_edits, sum(len(r.split()) for r in references)),
    }


class LogMel(nn.Module):
    """Log-mel features normalised per utterance over its real (unpadded) frames."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.hop_length = cfg.hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels
        )

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(wave.device.type, enabled=False):  # features in float32 whatever the precision
            feats = (self.mel(wave.float()) + 1e-6).log().transpose(1, 2)  # (batch, frames, mels)
        frames = lengths // self.hop_length + 1  # centred STFT
        mask = (torch.arange(feats.size(1), device=feats.device)[None] < frames[:, None])[..., None]
        count = frames.clamp(min=1)[:, None, None].to(feats.dtype)
        mean = (feats * mask).sum(1, keepdim=True) / count
        var = (((feats - mean) * mask) ** 2).sum(1, keepdim=True) / count
        return (feats - mean) / (var + 1e-5).sqrt() * mask, frames


class ConvSubsampling(nn.Module):
    """Stride-2 3x3 convolutions over (time, mel), then a projection to the model width."""

    def __init__(self, n_mels: int, channels: int, dim: int, layers: int):
        super().__init__()
        convs: list[nn.Module] = []
        freq, in_channels = n_mels, 1
        for _ in range(layers):
            convs += [nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.ReLU()]
            freq, in_channels = (freq - 1) // 2 + 1, channels
        self.convs = nn.Sequential(*convs)
        self.proj = nn.Linear(channels * freq, dim)
        self.layers = layers

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.convs(feats.unsqueeze(1))  # (batch, channels, frames', mels')
        b, c, t, f = x.shape
        for _ in range(self.layers):
            lengths = (lengths - 1) // 2 + 1
        return self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f)), lengths


class ConformerCTC(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        if cfg.conv_kernel % 2 == 0:
            raise ValueError(f"asr.conv_kernel={cfg.conv_kernel} must be odd")
        self.frontend = LogMel(cfg)
        self.subsampling = ConvSubsampling(cfg.n_mels, cfg.subsampling_channels, cfg.dim, cfg.subsampling_layers)
        self.conformer = Conformer(
            input_dim=cfg.dim,
            num_heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers,
            depthwise_conv_kernel_size=cfg.conv_kernel,
            dropout=cfg.dropout,
        )
        self.head = nn.Linear(cfg.dim, len(cfg.vocabulary) + 1)
        self.subsampling_layers = cfg.subsampling_layers
        self.hop_length = cfg.hop_length

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, samples) audio and its lengths -> (batch, frames, vocabulary) log-probs, frame counts."""
        feats, frames = self.frontend(wave, lengths)
        x, frames = self.subsampling(feats, frames)
        x, frames = self.conformer(x, frames)
        return self.head(x).float().log_softmax(-1), frames

    def output_frames(self, num_samples: int) -> int:
        """Output frames for an utterance of ``num_samples`` samples."""
        frames = num_samples // self.hop_length + 1
        for _ in range(self.subsampling_layers):
            frames = (frames - 1) // 2 + 1
        return frames


def ctc_loss(
    log_probs: torch.Tensor, frames: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """Mean CTC loss per target character (the same function for training and validation)."""
    return nn.functional.ctc_loss(
        log_probs.transpose(0, 1), targets, frames, target_lengths, blank=BLANK, reduction="mean", zero_infinity=True
    )
