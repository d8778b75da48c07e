"""Parallel adapters beside the feed-forward blocks of a frozen encoder (Miipher-2).

Each of the first L transformer layers gets its feed-forward block wrapped: the wrapper returns
``feed_forward(x) + adapter(x)``. The adapters are modules in the model tree, so ``state_dict``,
``.to(device)`` and DDP see them like any other module.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torchaudio.models import Wav2Vec2Model

from pipeline.models.encoder import encoder_features


class ParallelAdapter(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, output projection initialised near zero."""

    def __init__(self, dim: int, bottleneck: int, init_std: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.norm(x))))


class FeedForwardWithAdapter(nn.Module):
    """A feed-forward block plus a parallel adapter on the same input."""

    def __init__(self, feed_forward: nn.Module, adapter: ParallelAdapter):
        super().__init__()
        self.feed_forward = feed_forward
        self.adapter = adapter
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.feed_forward(x)
        return out + self.adapter(x) if self.adapter_enabled else out


class AdaptedEncoder(nn.Module):
    """A frozen encoder whose first ``num_adapter_layers`` layers carry trainable adapters."""

    def __init__(self, encoder: Wav2Vec2Model, layer: int, num_adapter_layers: int, bottleneck: int, init_std: float):
        super().__init__()
        layers = encoder.encoder.transformer.layers
        if not 1 <= num_adapter_layers <= len(layers):
            raise ValueError(f"adapter.num_layers={num_adapter_layers} must be between 1 and ssl.layer={len(layers)}")
        encoder.requires_grad_(False)
        dim = encoder.encoder.feature_projection.projection.out_features
        self.adapters = nn.ModuleList()
        for block in list(layers)[:num_adapter_layers]:
            adapter = ParallelAdapter(dim, bottleneck, init_std)
            block.feed_forward = FeedForwardWithAdapter(block.feed_forward, adapter)
            self.adapters.append(adapter)
        self.encoder = encoder
        self.layer = layer

    def _wrappers(self):
        return [m for m in self.encoder.modules() if isinstance(m, FeedForwardWithAdapter)]

    @contextmanager
    def adapters_disabled(self):
        """Run the plain frozen encoder (the clean-feature target)."""
        wrappers = self._wrappers()
        for w in wrappers:
            w.adapter_enabled = False
        try:
            yield
        finally:
            for w in wrappers:
                w.adapter_enabled = True

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Adapted features of ``wave`` (batch, samples) -> (batch, frames, dim)."""
        return encoder_features(self.encoder, wave, self.layer)

    @torch.no_grad()
    def target_features(self, wave: torch.Tensor) -> torch.Tensor:
        with self.adapters_disabled():
            return encoder_features(self.encoder, wave, self.layer)


def build_adapted_encoder(ssl, adapter) -> AdaptedEncoder:
    """The encoder preset ``ssl`` (EncoderConfig) with adapters configured by ``adapter`` (AdapterConfig)."""
    from pipeline.models.encoder import create_encoder

    num_layers = adapter.num_layers or ssl.layer
    return AdaptedEncoder(create_encoder(ssl), ssl.layer, num_layers, adapter.bottleneck, adapter.init_std)
