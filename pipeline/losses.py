"""Losses as pure functions returning (total, parts). Training and validation call the same ones."""

from __future__ import annotations

import torch


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Miipher feature-cleaning loss: L1 + L2 + spectral convergence, on (batch, frames, dim).

    Spectral convergence is ||target - pred||_F / ||target||_F per example, averaged over the batch.
    """
    l1 = (pred - target).abs().mean()
    l2 = (pred - target).pow(2).mean()
    diff_norm = torch.linalg.vector_norm(target - pred, dim=(1, 2))
    target_norm = torch.linalg.vector_norm(target, dim=(1, 2)).clamp_min(1e-8)
    sc = (diff_norm / target_norm).mean()
    return l1 + l2 + sc, {"l1": l1, "l2": l2, "sc": sc}
