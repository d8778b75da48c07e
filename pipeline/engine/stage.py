"""What a training stage gives the engine, and the precision/device decided once for a job."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, default_collate

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class Precision:
    """Device and numeric precision, chosen once per job (DESIGN §8)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def from_config(cls, device: str, precision: str) -> "Precision":
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r}; choose one of {sorted(PRECISIONS)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"trainer.device={device} but no CUDA device is available")
        dtype = PRECISIONS[precision]
        scaler = torch.amp.GradScaler(dev.type) if precision == "16-mixed" and dev.type == "cuda" else None
        return cls(dev, dtype, scaler)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine decay or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"optim.schedule={schedule!r}; choose cosine or constant")
    progress = min(max(step - warmup_steps, 0) / max(max_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Stage:
    """Base class of a training stage. A stage builds its parts and defines one step.

    The engine owns everything else: the loop, data order, validation schedule, metrics,
    checkpoints, resume and stop. ``compute_loss`` is shared by training and validation.
    """

    name: str = ""
    schema: type = object
    # Config prefixes whose change makes saved weights unusable; refused on resume.
    architecture_keys: tuple[str, ...] = ()
    # Keys under those prefixes that may change anyway (e.g. where weights live on disk).
    architecture_exempt: tuple[str, ...] = ()
    # Validation metrics the stage logs (what a sweep may optimise).
    val_metric_names: tuple[str, ...] = ("val/loss",)

    def __init__(self, cfg: DictConfig, precision: Precision):
        self.cfg = cfg
        self.precision = precision
        self.device = precision.device
        self.modules: dict[str, nn.Module] = {}  # trainable modules: saved in checkpoints
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # --- to implement -------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        """`model` and `dataset` tags for the run list filters."""
        raise NotImplementedError

    def build(self) -> None:
        """Create models, optimizers, schedulers and datasets."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step (or one per optimizer); returns metrics named like ``train/loss``."""
        raise NotImplementedError

    def write_samples(self, out_dir: Path, step: int) -> None:
        """Optional: write audio examples and plots for this validation into ``out_dir``."""

    def model_args(self) -> dict[str, Any]:
        """What is needed to rebuild the model (stored in every checkpoint's meta.json)."""
        return {}

    # --- helpers for stages -----------------------------------------------------------------
    def collate(self, items: list[Any]) -> Any:
        return default_collate(items)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        o, max_steps = self.cfg.optim, self.cfg.trainer.max_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, o.warmup_steps, max_steps, o.schedule, o.min_lr_ratio)
        )

    def optimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> torch.Tensor:
        """Backward, clip, step (through the grad scaler when one is used); returns the grad norm."""
        params = list(params)
        scaler = self.precision.scaler
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return grad_norm
