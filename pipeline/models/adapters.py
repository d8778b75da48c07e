"""Parallel adapters beside the feed-forward blocks of a frozen encoder (Miipher-2).

Each of the first L transformer layers gets its feed-forward block wrapped: the wrapper returns
``feed_forward(x) + adapter(x)``. The adapters are modules in the model tree, so ``state_dict``,
``.to(device)`` and DDP see them like any other module.

Two recipes are configurable (``AdapterConfig``; README "Adapter recipes"): this project's adapters
return only their bottleneck output and start near zero, so the adapted encoder starts equal to the
frozen one; the open reimplementation's also return their input (the layer then sees 2h + FF(h) +
A(h)) and train each adapted layer's ``final_layer_norm`` as well. A trained norm is a copy beside
the frozen original, which still makes the clean-feature target.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn
from torchaudio.models import Wav2Vec2Model

from pipeline.models.encoder import encoder_features
from pipeline.models.frontend import CleanedLogMel, build_cleaned_log_mel

ADAPTER_INITS = ("normal", "xavier")


class ParallelAdapter(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (plus the input itself with ``residual``)."""

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        init_std: float = 1e-3,
        *,
        init: str = "normal",
        init_gain: float = 0.01,
        residual: bool = False,
    ):
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"adapter.init={init!r}; choose one of {', '.join(ADAPTER_INITS)}")
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        self.residual = residual
        if init == "normal":  # near zero: the adapted encoder starts as the frozen one
            nn.init.normal_(self.up.weight, std=init_std)
            nn.init.zeros_(self.up.bias)
        else:
            for linear in (self.down, self.up):
                nn.init.xavier_uniform_(linear.weight, gain=init_gain)
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(self.norm(x))))
        return x + out if self.residual else out


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


class TrainedLayerNorm(nn.Module):
    """A frozen LayerNorm and a trainable copy of it: the copy while the adapters are on, the frozen
    original for the clean-feature target."""

    def __init__(self, frozen: nn.LayerNorm):
        super().__init__()
        self.frozen = frozen
        self.trained = copy.deepcopy(frozen).requires_grad_(True)
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(x) if self.adapter_enabled else self.frozen(x)


class AdaptedEncoder(nn.Module):
    """A frozen encoder whose first ``num_adapter_layers`` layers carry trainable adapters."""

    def __init__(
        self,
        encoder: Wav2Vec2Model,
        layer: int,
        num_adapter_layers: int,
        bottleneck: int,
        init_std: float = 1e-3,
        *,
        init: str = "normal",
        init_gain: float = 0.01,
        residual: bool = False,
        train_layer_norms: bool = False,
    ):
        super().__init__()
        layers = encoder.encoder.transformer.layers
        if not 1 <= num_adapter_layers <= len(layers):
            raise ValueError(f"adapter.num_layers={num_adapter_layers} must be between 1 and ssl.layer={len(layers)}")
        encoder.requires_grad_(False)
        dim = encoder.encoder.feature_projection.projection.out_features
        self.adapters = nn.ModuleList()
        norms = []
        for block in list(layers)[:num_adapter_layers]:
            adapter = ParallelAdapter(dim, bottleneck, init_std, init=init, init_gain=init_gain, residual=residual)
            block.feed_forward = FeedForwardWithAdapter(block.feed_forward, adapter)
            self.adapters.append(adapter)
            if train_layer_norms:
                block.final_layer_norm = TrainedLayerNorm(block.final_layer_norm)
                norms.append(block.final_layer_norm.trained)
        # the trained norm copies, addressable as one module for checkpoints (None: norms stay frozen)
        self.layer_norms = nn.ModuleList(norms) if train_layer_norms else None
        self.encoder = encoder
        self.layer = layer

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What trains and is saved in checkpoints, by checkpoint key."""
        modules: dict[str, nn.Module] = {"adapters": self.adapters}
        if self.layer_norms is not None:
            modules["layer_norms"] = self.layer_norms
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.trainable_modules().values() for p in module.parameters()]

    def _switches(self):
        return [m for m in self.encoder.modules() if isinstance(m, (FeedForwardWithAdapter, TrainedLayerNorm))]

    @contextmanager
    def adapters_disabled(self):
        """Run the plain frozen encoder (the clean-feature target)."""
        switches = self._switches()
        for w in switches:
            w.adapter_enabled = False
        try:
            yield
        finally:
            for w in switches:
                w.adapter_enabled = True

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Adapted features of ``wave`` (batch, samples) -> (batch, frames, dim); ``lengths``: valid samples per
        item of a zero-padded batch (``encoder_features``)."""
        return encoder_features(self.encoder, wave, self.layer, lengths)

    @torch.no_grad()
    def target_features(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen encoder's features (adapters off), as ``forward``."""
        with self.adapters_disabled():
            return encoder_features(self.encoder, wave, self.layer, lengths)


def build_adapted_encoder(ssl, adapter) -> AdaptedEncoder | CleanedLogMel:
    """The encoder preset ``ssl`` (EncoderConfig) with adapters configured by ``adapter`` (AdapterConfig); a
    log-mel front end (``ssl.family: logmel``) gets the feature cleaner ``adapter`` configures instead."""
    from pipeline.models.encoder import LOGMEL, create_encoder

    if ssl.family == LOGMEL:
        return build_cleaned_log_mel(ssl, adapter)
    num_layers = adapter.num_layers or ssl.layer
    return AdaptedEncoder(
        create_encoder(ssl),
        ssl.layer,
        num_layers,
        adapter.bottleneck,
        adapter.init_std,
        init=adapter.init,
        init_gain=adapter.init_gain,
        residual=adapter.residual,
        train_layer_norms=adapter.train_layer_norms,
    )
