"""An optimizer's and its LR schedule's hyperparameters across a resume: what a freshly built optimizer
got from the config, and putting them back over the ones a restored checkpoint carries."""

from __future__ import annotations

import logging

import torch

from pipeline.engine.private_apis import set_last_lr
from pipeline.engine.stage import LRSchedule

log = logging.getLogger(__name__)

GROUP_SETTINGS = ("initial_lr", "betas", "weight_decay")  # per param group; initial_lr is the peak LR
SCHEDULE_SETTINGS = ("warmup_steps", "schedule", "min_ratio")  # LRSchedule fields taken from `optim`


def optimizer_settings(optimizer: torch.optim.Optimizer, scheduler) -> dict[str, list]:
    """The hyperparameters a freshly built optimizer and its schedule got from the config."""
    schedules = [fn for fn in getattr(scheduler, "lr_lambdas", []) if isinstance(fn, LRSchedule)]
    return {
        "groups": [{k: _plain(g[k]) for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups],
        "schedules": [{k: getattr(fn, k) for k in SCHEDULE_SETTINGS} for fn in schedules],
    }


def apply_optimizer_settings(name: str, optimizer: torch.optim.Optimizer, scheduler, configured: dict) -> None:
    """After a restore, let the resumed job's config win over the checkpoint's optimizer settings.

    A restored optimizer and schedule carry the hyperparameters they were saved with; an override such
    as ``optim.lr=3e-4`` or ``optim.weight_decay=0.01`` on resume must still take effect. The peak LR
    scales the rest of the curve (the LR chart steps by the ratio asked for); a changed schedule
    shape continues from the current LR. Nothing is touched when nothing changed, so an unchanged
    resume stays bit-identical.
    """
    changes = []
    for i, (group, wanted) in enumerate(zip(optimizer.param_groups, configured["groups"])):
        for key, value in wanted.items():
            if _plain(group.get(key)) != value:
                changes.append(f"{key} {_plain(group.get(key))} -> {value}")
                group[key] = tuple(value) if key == "betas" else value
                if key == "initial_lr" and scheduler is not None:
                    scheduler.base_lrs[i] = value
    schedules = [fn for fn in getattr(scheduler, "lr_lambdas", []) if isinstance(fn, LRSchedule)]
    for fn, wanted in zip(schedules, configured["schedules"]):
        old = {k: getattr(fn, k) for k in SCHEDULE_SETTINGS}
        if old != wanted:
            step = scheduler.last_epoch
            if step > 0:  # continue from where the old curve is now
                fn.anchor_factor, fn.anchor_step = fn(step), step
            for key, value in wanted.items():
                setattr(fn, key, value)
            changes += [f"{k} {old[k]} -> {wanted[k]}" for k in SCHEDULE_SETTINGS if old[k] != wanted[k]]
    if changes and hasattr(scheduler, "lr_lambdas"):  # the LR of the next step, from the new settings
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        set_last_lr(scheduler, lrs)
    if changes:
        log.warning(
            "Optimizer %s: the resumed config changes %s; the LR is now %.4g",
            name,
            ", ".join(dict.fromkeys(changes)),
            optimizer.param_groups[0]["lr"],
        )


def _plain(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value
