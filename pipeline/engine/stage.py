"""What a training stage gives the engine, and the precision/device decided once for a job."""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, default_collate

from pipeline.engine.distributed import SINGLE, Dist

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}


def data_workers(cfg: DictConfig) -> int:
    """DataLoader worker processes of a job (``data.num_workers``; 0 for a stage without the key)."""
    return int(OmegaConf.select(cfg, "data.num_workers", default=0))


@dataclass
class Precision:
    """Device and numeric precision, chosen once per job (docs/architecture.md, Models)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def from_config(cls, device: str, precision: str) -> Precision:
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
        """The forward passes' context: the engine enters it around every training and validation step."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def full_precision(self):
        """Leaves the autocast region: backward passes and optimizer steps run outside it (PyTorch's AMP recipe)."""
        return torch.autocast(self.device.type, enabled=False) if self.dtype is not None else nullcontext()


def lr_factor(
    step: int,
    warmup_steps: int,
    max_steps: int,
    schedule: str,
    min_ratio: float,
    anchor_step: int = 0,
    anchor_factor: float = 1.0,
) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine decay or constant.

    The cosine decays from 1 at the end of warm-up to ``min_ratio`` at ``max_steps``. An anchor past
    the warm-up, (``anchor_step``, ``anchor_factor``), makes it decay from that point instead: this is
    how a resume that moves the horizon (more epochs, another batch size) or changes the schedule
    continues from the restored learning rate, with no jump in the LR curve; ``constant`` holds it.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return anchor_factor if anchor_step >= warmup_steps and anchor_step > 0 else 1.0
    if schedule != "cosine":
        raise ValueError(f"optim.schedule={schedule!r}; choose cosine or constant")
    start, top = (anchor_step, anchor_factor) if anchor_step >= warmup_steps else (warmup_steps, 1.0)
    progress = min(max(step - start, 0) / max(max_steps - start, 1), 1.0)
    return min_ratio + (top - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """``lr_factor`` as a callable for LambdaLR whose attributes are plain numbers.

    LambdaLR saves the attributes of a callable object in its state dict, so a checkpoint holds the
    horizon and anchor the job ran with, and a resume continues exactly the same curve.
    """

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.schedule = str(schedule)
        self.min_ratio = float(min_ratio)
        self.anchor_step = 0
        self.anchor_factor = 1.0

    def __call__(self, step: int) -> float:
        return lr_factor(
            step,
            self.warmup_steps,
            self.total_steps,
            self.schedule,
            self.min_ratio,
            self.anchor_step,
            self.anchor_factor,
        )

    def retarget(self, step: int, total_steps: int) -> bool:
        """Plan for ``total_steps`` from ``step`` on; returns True when a started curve was re-anchored.

        At step 0 the horizon is simply set. Later, the curve continues from its value at ``step`` and
        decays over the new remaining steps.
        """
        if total_steps == self.total_steps:
            return False
        started = step > 0
        if started:
            self.anchor_factor, self.anchor_step = self(step), int(step)
        self.total_steps = int(total_steps)
        return started


class Stage:
    """Base class of a training stage. A stage builds its parts and defines one step.

    The engine owns everything else: the loop, data order, validation schedule, metrics,
    checkpoints, resume and stop; it runs ``training_step`` and ``validation_step`` under the job's
    autocast (``optimize`` leaves it for the backward pass), and ``validation_step`` and
    ``write_samples`` with the trained modules in eval mode, without gradients, leaving the training
    random streams untouched. ``compute_loss`` is shared by training and validation.
    """

    name: str = ""
    schema: type = object
    # Config prefixes whose change makes saved weights unusable; refused on resume.
    architecture_keys: tuple[str, ...] = ()
    # Keys under those prefixes that may change anyway (e.g. where weights live on disk).
    architecture_exempt: tuple[str, ...] = ()
    # Validation metrics the stage logs (what a sweep may optimise).
    val_metric_names: tuple[str, ...] = ("val/loss",)
    # Runs the stage builds on, given as launch arguments (``adapter_run=<id>``); required on a fresh start,
    # taken from the checkpoint on resume.
    run_inputs: tuple[str, ...] = ()
    # Attributes holding the modules that train: under torchrun each is wrapped in DistributedDataParallel
    # (``distribute``), and ``training_step`` runs its forward passes through ``self.ddp(module)``.
    parallel_modules: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: DictConfig,
        precision: Precision,
        inputs: dict[str, str] | None = None,
        resuming: bool = False,
        dist: Dist = SINGLE,
    ):
        self.cfg = cfg
        self.precision = precision
        self.device = precision.device
        self.dist = dist  # this process's place under torchrun (one rank without it)
        self._ddp: dict[nn.Module, nn.Module] = {}  # module -> its DistributedDataParallel wrapper
        self.inputs: dict[str, str] = dict(inputs or {})  # run_inputs by name (stored in every checkpoint)
        self.resuming = resuming  # the engine restores a checkpoint after build(): skip initial weights
        self.step = 0  # optimizer steps done before the current training_step (the engine keeps it, resume included)
        self.nonfinite_updates = 0  # optimizer updates skipped because the loss or gradient was not finite
        self.modules: dict[str, nn.Module] = {}  # trainable modules: saved in checkpoints
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None  # map-style, read in order by validation
        # how the engine reads the training set (pipeline.data.datasets.TrainSource): set by build(), e.g.
        # ShuffledBatches(self.train_set, seed) for a map-style set, or a shard stream
        self.train_source: Any = None
        # what build() read, as an MLflow dataset (``mlflow.data``; the runs table's Dataset column and filter)
        self.training_data: Any = None

    # --- to implement -------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        """`model` and `dataset` tags for the run list filters."""
        raise NotImplementedError

    def build(self) -> None:
        """Create models, optimizers, schedulers, datasets and ``train_source``."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step (or one per optimizer) through ``optimize``; returns metrics named like
        ``train/loss``. Runs under the job's autocast."""
        raise NotImplementedError

    def validation_step(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
        """One validation batch: the loss and its parts (``compute_loss``, as in training) plus
        optional quality metrics as (numerator, denominator) sums, e.g. ``{"cer": (edits, reference
        characters)}``. The engine logs sum(numerators) / sum(denominators) over the whole validation
        set as ``val/<name>``, which is the corpus-level rate, not a mean of per-batch rates."""
        loss, parts = self.compute_loss(batch)
        return loss, parts, {}

    @classmethod
    def resolve_config(cls, cfg: DictConfig) -> DictConfig:
        """Optional: derive dependent values (e.g. a quick mode that picks a preset) after composing
        or applying resume overrides, before the config is compared with a checkpoint's."""
        return cfg

    @classmethod
    def adopt_inputs(cls, cfg: DictConfig, inputs: dict[str, str]) -> DictConfig:
        """Optional, fresh start only: check the ``run_inputs`` runs and take from them what the
        config must match (e.g. the architecture a run was trained with); a resume keeps the checkpoint's."""
        return cfg

    def check_data(self) -> None:
        """After ``build``, before the job writes anything: refuse (ValueError naming the setting) data settings
        the training set cannot serve, such as a batch larger than the set (the last partial batch is dropped,
        so an epoch would have no batch) or more workers than shards, instead of failing when training starts."""
        if self.train_source is not None:
            self.train_source.num_batches(int(self.cfg.batch_size), data_workers(self.cfg), world=self.dist.world_size)

    def write_samples(self, out_dir: Path, step: int) -> None:
        """Optional: write audio examples and plots for this validation into ``out_dir``. Runs after the
        validation steps, in eval mode and in full precision (no autocast)."""

    def export_model(self, checkpoint_dir: Path, out_dir: Path) -> bool:
        """Optional: save an MLflow model (``mlflow.pyfunc.save_model``) of the final, verified checkpoint
        ``checkpoint_dir`` into ``out_dir``; the engine logs it as the run's ``model/``. Returns False
        when the stage has no model of its own to serve."""
        return False

    def dataset_inputs(self) -> list[Any]:
        """MLflow datasets (``mlflow.data``) this job trains on, logged as the run's inputs."""
        return [self.training_data] if self.training_data is not None else []

    def model_args(self) -> dict[str, Any]:
        """What is needed to rebuild the model (stored in every checkpoint's meta.json)."""
        return {}

    # --- several processes ------------------------------------------------------------------
    def distribute(self) -> None:
        """Under torchrun, wrap each of ``parallel_modules`` in DistributedDataParallel (once; the engine
        calls this after a restore). Parameters that do not train (a frozen encoder) are left out of it:
        DDP neither broadcasts nor reduces them."""
        if not self.dist.enabled or self._ddp:
            return
        for name in self.parallel_modules:
            module = getattr(self, name)
            frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
            self._ddp[module] = self.dist.wrap(module, ignore=frozen)

    def ddp(self, module: nn.Module) -> nn.Module:
        """What a training forward pass calls: ``module``'s DistributedDataParallel wrapper under torchrun
        (its gradients are then averaged over the ranks in the backward pass), else ``module`` itself.
        Validation and samples call the modules directly, one rank at a time, with no collective."""
        return self._ddp.get(module, module)

    # --- helpers for stages -----------------------------------------------------------------
    def collate(self, items: list[Any]) -> Any:
        return default_collate(items)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.AdamW:
        """The default optimizer: AdamW with ``optim.betas`` and ``optim.weight_decay``, at ``optim.lr``
        unless another peak ``lr`` is given (e.g. the discriminators')."""
        o = self.cfg.optim
        return torch.optim.AdamW(
            params, lr=o.lr if lr is None else lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """LambdaLR over ``LRSchedule``; the engine sets its horizon when training starts or resumes."""
        o = self.cfg.optim
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, LRSchedule(o.warmup_steps, self.cfg.trainer.max_steps, o.schedule, o.min_lr_ratio)
        )

    def optimize(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        update_scaler: bool = True,
    ) -> torch.Tensor:
        """Backward, clip, step (through the grad scaler when one is used); returns the grad norm.

        A non-finite loss or gradient norm skips the update (the grad scaler skips it by itself) and is
        counted in ``nonfinite_updates``: the engine stops the job when that happens too many steps in a row.

        With several optimizers in one training step (a GAN), all share the one grad scaler and only
        the last call of the step passes ``update_scaler=True``: the scale is updated once per
        iteration, after every optimizer has stepped (PyTorch's recipe for multiple optimizers).
        """
        params = list(params)
        scaler = self.precision.scaler
        with self.precision.full_precision():
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            clip = self.cfg.optim.grad_clip
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss.detach()).all())
            finite = not self.dist.any(not finite)  # every rank skips the update, or none does
            if not finite:
                self.nonfinite_updates += 1
            if scaler is not None:
                scaler.step(optimizer)
                if update_scaler:
                    scaler.update()
            elif finite:
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
        return grad_norm
