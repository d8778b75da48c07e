"""Where training is (``Position``) and how a checkpoint's state puts a built stage and the engine back there.

The state restored here is the one ``checkpoint_migrate.read_state`` gives: migrated to the current format
version, so every key ``Engine.state_dict`` writes is present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.engine.optimizer_settings import apply_optimizer_settings, optimizer_settings
from pipeline.engine.rng import restore_rng
from pipeline.engine.stage import Stage

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training is: finished steps and the data position."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed


def restore_stage(stage: Stage, state: dict[str, Any]) -> None:
    """The stage's modules, optimizers, schedulers and grad scaler from ``state``; this job's optimizer and LR
    schedule settings then go over the restored optimizers' (optimizer_settings.py)."""
    configured = {key: optimizer_settings(opt, stage.schedulers.get(key)) for key, opt in stage.optimizers.items()}
    for key, module in stage.modules.items():
        module.load_state_dict(state["modules"][key])
    for key, opt in stage.optimizers.items():
        opt.load_state_dict(state["optimizers"][key])
    for key, sch in stage.schedulers.items():
        sch.load_state_dict(state["schedulers"][key])
    for key, opt in stage.optimizers.items():
        apply_optimizer_settings(key, opt, stage.schedulers.get(key), configured[key])
    if stage.precision.scaler is not None and state["scaler"]:  # {}: trained without a grad scaler
        stage.precision.scaler.load_state_dict(state["scaler"])


def restore_rank_rng(state: dict[str, Any], rank: int) -> None:
    """This rank's random state from the checkpoint; a rank the checkpoint did not have keeps the stream it was
    seeded with (seed + rank)."""
    if rank < len(state["rank_rng"]):
        restore_rng(state["rank_rng"][rank])


def resumed_position(state: dict[str, Any], batch_size: int, world: int, workers: int, stage: Stage) -> Position:
    """The checkpoint's position for a job of ``world`` ranks with ``batch_size`` per rank and ``workers``
    DataLoader workers: the place in the epoch kept in samples when the global batch changed (in whole new
    batches), with a warning when a changed world size or worker count makes the resume inexact."""
    pos = Position(int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"]))
    old_world = int(state["world_size"])
    old_size, new_size = int(state["batch_size"]) * old_world, batch_size * world  # global: per-rank batch x ranks
    if old_size != new_size:
        pos.batch_in_epoch = -(-pos.batch_in_epoch * old_size // new_size)
    dealt_by_workers = stage.train_source.order_depends_on_workers
    if old_world != world:
        _warn_world_changed(pos, old_world, world, old_size, batch_size, dealt_by_workers)
    elif dealt_by_workers and int(state["data_workers"]) != workers and pos.batch_in_epoch:
        log.warning(
            "data.num_workers changed from %d to %d in the middle of epoch %d: the data are dealt to "
            "workers anew, so the rest of this epoch is not what an uninterrupted run would read "
            "(some samples repeat, others sit out); the next epochs read every sample once. Resume "
            "with data.num_workers=%d to keep the resume exact.",
            int(state["data_workers"]),
            workers,
            pos.epoch,
            int(state["data_workers"]),
        )
    return pos


def _warn_world_changed(
    pos: Position, old_world: int, world: int, old_size: int, batch_size: int, dealt_by_workers: bool
) -> None:
    log.warning(
        "The checkpoint was trained on %d rank(s), this job has %d: the effective batch is now %d (%d "
        "per rank x %d) instead of %d, and the LR schedule goes on by steps. The epoch goes on from the "
        "same sample position (batch %d of epoch %d at the new size), but the examples are grouped "
        "into batches differently%s; ranks beyond the checkpoint's use their own fresh random "
        "streams. Resume with %d rank(s) for an exact continuation.",
        old_world,
        world,
        batch_size * world,
        batch_size,
        world,
        old_size,
        pos.batch_in_epoch,
        pos.epoch,
        " and shards are dealt to the ranks' workers anew, from this epoch on" if dealt_by_workers else "",
        old_world,
    )
