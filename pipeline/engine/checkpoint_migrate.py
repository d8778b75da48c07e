"""Reading a checkpoint's state.pt of any format version this code knows (docs/architecture.md, Checkpoints).

Version 2 guarantees that state.pt holds every key ``Engine.state_dict`` writes (``STATE_KEYS``); version 1
did not: its writers added keys feature by feature. ``migrate`` brings an older state up to the current
version, once, where it is read (``read_state``), so that the code restoring it (``Engine.load_state_dict``)
indexes it plainly. A version newer than this code, or one no release wrote, is refused (``check_version``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.engine.checkpoint_files import (
    FORMAT_VERSION,
    STATE_FILE,
    CheckpointError,
    check_state,
    check_version,
    load_state,
)
from pipeline.engine.stage import data_workers

log = logging.getLogger(__name__)

# Every key of state.pt from version 2 on: what Engine.state_dict writes (tests/unit/engine/test_checkpoint_migrate.py
# holds the two together).
STATE_KEYS = (
    "step",
    "epoch",
    "batch_in_epoch",
    "batch_size",
    "world_size",
    "data_workers",
    "seed",
    "modules",
    "optimizers",
    "schedulers",
    "scaler",
    "rng",
    "rank_rng",
    "val_metrics",
    "nonfinite_steps",
    "nonfinite_streak",
    "metric_window",
)


def _v1_to_v2(state: dict[str, Any], meta: dict[str, Any], where: str) -> dict[str, Any]:
    """Version 1 -> 2: each key a version-1 writer may have left out, with the value the reader assumed
    without it before version 2. Values of the job that wrote it come from its own config in meta.json."""
    config = OmegaConf.create(meta.get("config") or {})
    state = dict(state)
    # scaler, val_metrics, seed: written since the first release; filled for a state without them, which the
    # reader before version 2 took as no grad scaler state, no validation yet (seed: read by nothing)
    state.setdefault("scaler", {})
    state.setdefault("val_metrics", {})
    if "seed" not in state:
        state["seed"] = _from_config(config, "seed", where)
    # batch_size (per rank), added with the data position kept when a resume changes batch_size (a722410): the
    # batch size the job was trained with, from its config (the reader assumed this job's, i.e. no change)
    if "batch_size" not in state:
        state["batch_size"] = _from_config(config, "batch_size", where)
    # world_size and rank_rng, added with torchrun (54fc177): one process, whose random state is `rng`
    state.setdefault("world_size", 1)
    state.setdefault("rank_rng", [state["rng"]])
    # data_workers, added with shards (40a67b7: a resume that changes data.num_workers mid-epoch warns): the
    # DataLoader workers of its config (0 for a stage without data.num_workers)
    if "data_workers" not in state:
        state["data_workers"] = data_workers(config)
    # nonfinite_steps and nonfinite_streak, added with the non-finite step guard (9d7d562): none skipped
    state.setdefault("nonfinite_steps", 0)
    state.setdefault("nonfinite_streak", 0)
    # metric_window, added with tracking.metric_interval (b70103c): an empty window (every step was logged)
    state.setdefault("metric_window", {"sums": {}, "last": {}, "count": 0})
    return state


MIGRATIONS = {1: _v1_to_v2}  # version N -> N + 1, for every N below FORMAT_VERSION


def _from_config(config: DictConfig, key: str, where: str) -> int:
    value = OmegaConf.select(config, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(
            f"checkpoint {where}: its {STATE_FILE} (format version 1) has no {key} and its config none either; "
            "it was not written by this pipeline"
        )
    return value


def migrate(state: dict[str, Any], meta: dict[str, Any], where: str | Path = "") -> dict[str, Any]:
    """``state`` (loaded from a checkpoint whose meta.json is ``meta``) brought to FORMAT_VERSION: each
    older version's keys filled in, one version at a time; a version this code does not read is refused.
    ``where`` names the checkpoint in messages."""
    where = str(where or f"step {meta.get('step')}")
    version = check_version(meta, where)
    while version < FORMAT_VERSION:
        state = MIGRATIONS[version](state, meta, where)
        version += 1
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {where}: {STATE_FILE} (format version {meta['format_version']}) lacks "
            f"{', '.join(missing)}; it was not written by this pipeline or was edited"
        )
    if meta["format_version"] != FORMAT_VERSION:
        log.info(
            "Checkpoint %s is of format version %d: read as version %d, the keys its writer left out at their defaults",
            where,
            meta["format_version"],
            FORMAT_VERSION,
        )
    return state


def read_state(ckpt_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The training state of a verified checkpoint (``meta`` is its meta.json): loaded with
    ``weights_only=True``, checked against meta.json and migrated to this format version."""
    state = load_state(ckpt_dir)
    check_state(state, meta, ckpt_dir)
    return migrate(state, meta, ckpt_dir)
