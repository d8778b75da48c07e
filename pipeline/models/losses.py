"""Losses as pure functions returning (total, parts). Training and validation call the same ones."""

from __future__ import annotations

import torch

SC_MODES = ("per_example", "pooled_power")


def feature_loss(
    pred: torch.Tensor, target: torch.Tensor, sc: str = "per_example"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Miipher feature-cleaning loss: L1 + L2 + spectral convergence, on (batch, frames, dim).

    Spectral convergence ``per_example`` is ||target - pred||_F / ||target||_F per example, averaged
    over the batch; ``pooled_power`` is sum((pred - target)^2) / sum(target^2) over the whole batch
    (squared, no root: the open Miipher-2 reimplementation's form).
    """
    l1 = (pred - target).abs().mean()
    l2 = (pred - target).pow(2).mean()
    if sc == "per_example":
        diff_norm = torch.linalg.vector_norm(target - pred, dim=(1, 2))
        target_norm = torch.linalg.vector_norm(target, dim=(1, 2)).clamp_min(1e-8)
        sc_value = (diff_norm / target_norm).mean()
    elif sc == "pooled_power":
        sc_value = (pred - target).pow(2).sum() / (target.pow(2).sum() + 1e-9)
    else:
        raise ValueError(f"loss.sc={sc!r}; choose one of {', '.join(SC_MODES)}")
    return l1 + l2 + sc_value, {"l1": l1, "l2": l2, "sc": sc_value}


# --------------------------------------------------------------------------------------------
# HiFi-GAN: least-squares GAN losses, feature matching, log-mel L1 (docs/architecture.md, Models)
# --------------------------------------------------------------------------------------------


def log_mel(wave: torch.Tensor, mel: torch.nn.Module) -> torch.Tensor:
    """Log-mel spectrogram in float32 (outside autocast: the STFT needs the precision)."""
    with torch.autocast(wave.device.type, enabled=False):
        return torch.log(mel(wave.float()).clamp_min(1e-5))


def mel_l1(pred: torch.Tensor, target: torch.Tensor, mel: torch.nn.Module) -> torch.Tensor:
    """L1 distance of the log-mel spectrograms of two waveforms (batch, samples)."""
    return torch.nn.functional.l1_loss(log_mel(pred, mel), log_mel(target, mel))


def discriminator_loss(
    real_scores: list[torch.Tensor], fake_scores: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Least-squares GAN: push scores of real audio to 1 and of generated audio to 0, summed over
    sub-discriminators. Parts: ``real`` and ``fake``."""
    real = sum(torch.mean((1 - r.float()) ** 2) for r in real_scores)
    fake = sum(torch.mean(f.float() ** 2) for f in fake_scores)
    return real + fake, {"real": real, "fake": fake}


def adversarial_loss(fake_scores: list[torch.Tensor]) -> torch.Tensor:
    """The generator's side of the least-squares GAN: scores of generated audio towards 1."""
    return sum(torch.mean((1 - f.float()) ** 2) for f in fake_scores)


def feature_matching_loss(real_maps: list[list[torch.Tensor]], fake_maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between the discriminators' feature maps of real and generated audio, summed over layers."""
    return sum(
        torch.mean(torch.abs(r.detach().float() - f.float()))
        for real_layers, fake_layers in zip(real_maps, fake_maps)
        for r, f in zip(real_layers, fake_layers)
    )


def generator_loss(
    fake_scores: list[torch.Tensor],
    real_maps: list[list[torch.Tensor]],
    fake_maps: list[list[torch.Tensor]],
    mel_loss: torch.Tensor,
    *,
    adv_weight: float,
    fm_weight: float,
    mel_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HiFi-GAN generator objective: weighted adversarial + feature matching + mel L1.

    Parts are unweighted: ``adv``, ``fm`` and ``mel`` (the log-mel L1 itself, comparable with the
    validation mel loss)."""
    adv = adversarial_loss(fake_scores)
    fm = feature_matching_loss(real_maps, fake_maps)
    total = adv_weight * adv + fm_weight * fm + mel_weight * mel_loss
    return total, {"adv": adv, "fm": fm, "mel": mel_loss}
