"""ConvNeXt blocks over frame sequences: what the log-mel feature cleaner and the Vocos generator are made of.

A block is a depthwise convolution over time (its only mixing of frames), LayerNorm, a pointwise MLP and a
learnt per-channel scale, added to its input (Liu et al. 2022, in the 1-D form of Vocos). With ``lengths``
(valid frames per item of a padded batch) the depthwise convolution sees zeros past each item's end, as an
unpadded run of that item would, so each item's valid frames are those of its own run.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.padding import zero_past


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate: int, kernel: int = 7, layer_scale: float = 0.1):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"a ConvNeXt block's kernel must be odd (got {kernel})")
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, intermediate)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, dim, frames) -> the same shape."""
        y = self.dwconv(zero_past(x, lengths)).transpose(1, 2)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class ConvNeXtStack(nn.Module):
    """Conv1d(in_dim -> dim) -> LayerNorm -> ConvNeXt blocks -> LayerNorm, on (batch, dim, frames)."""

    def __init__(self, in_dim: int, dim: int, intermediate: int, blocks: int, kernel: int = 7):
        super().__init__()
        self.embed = nn.Conv1d(in_dim, dim, kernel, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate, kernel, 1.0 / max(blocks, 1)) for _ in range(blocks)
        )
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(self.embed(zero_past(x, lengths)).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x, lengths)
        return zero_past(self.final_norm(x.transpose(1, 2)).transpose(1, 2), lengths)
