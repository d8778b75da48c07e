"""Padded batches: what makes each item's valid outputs those of its own unpadded run."""

from __future__ import annotations

import torch


def zero_past(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``x`` (batch, channels, time) with every time step at or past its item's ``lengths`` set to zero: what a
    convolution of an unpadded item sees there (its own zero padding). ``lengths`` None: ``x`` itself."""
    if lengths is None:
        return x
    padded = torch.arange(x.shape[-1], device=x.device) >= lengths.to(x.device)[:, None]
    return x.masked_fill(padded[:, None, :], 0.0)
