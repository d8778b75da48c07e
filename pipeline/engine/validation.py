"""The pieces of the engine's validation (``Engine.validate``): eval mode around it, the validation set's totals
on this rank, every rank's totals added up, and the samples stored under the step."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.common import faults
from pipeline.data.datasets import seeded_loader
from pipeline.engine.checkpoint_files import checkpoint_name
from pipeline.engine.distributed import Dist
from pipeline.engine.outage import first_line
from pipeline.engine.rng import capture_rng, restore_rng
from pipeline.engine.stage import Stage

log = logging.getLogger(__name__)

Totals = tuple[dict[str, float], dict[str, list[float]], int]  # sums x n, [numerator, denominator], examples


@contextmanager
def evaluating(stage: Stage):
    """Trained modules in eval mode, no gradients, and the training random streams left untouched;
    each module gets its own mode back afterwards."""
    rng = capture_rng()
    modes = {key: m.training for key, m in stage.modules.items()}
    for m in stage.modules.values():
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for key, m in stage.modules.items():
            m.train(modes[key])
        restore_rng(rng)


def validation_totals(stage: Stage, batch_size: int, workers: int, seed: int, dist: Dist) -> Totals:
    """The stage's validation step over this rank's share of the validation set (every world-th batch), under
    the job's autocast: each metric's sum weighted by batch size, each ratio's numerator and denominator."""
    keys = list(range(len(stage.val_set)))
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)][dist.rank :: dist.world_size]
    loader = seeded_loader(stage.val_set, batches, workers, stage.collate, seed, stage.device.type == "cuda")
    totals: dict[str, float] = {}
    sums: dict[str, list[float]] = {}  # name -> [numerator, denominator] over the whole set
    count = 0
    for batch in loader:
        batch = stage.to_device(batch)
        with stage.precision.autocast():
            loss, parts, ratios = stage.validation_step(batch)
        n = len(next(iter(batch.values())))
        for key, value in {"loss": loss, **parts}.items():
            totals[key] = totals.get(key, 0.0) + float(value) * n
        for key, (num, den) in ratios.items():
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + float(num), acc[1] + float(den)
        count += n
    return totals, sums, count


def merge_ranks(dist: Dist, totals: dict[str, float], sums: dict[str, list[float]], count: int) -> Totals:
    """Every rank's validation totals added up (the ranks' shares of the validation set)."""
    if not dist.enabled:
        return totals, sums, count
    merged_totals: dict[str, float] = {}
    merged_sums: dict[str, list[float]] = {}
    merged_count = 0
    for rank_totals, rank_sums, rank_count in dist.all_gather((totals, sums, count)):
        for key, value in rank_totals.items():
            merged_totals[key] = merged_totals.get(key, 0.0) + value
        for key, (num, den) in rank_sums.items():
            acc = merged_sums.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + num, acc[1] + den
        merged_count += rank_count
    return merged_totals, merged_sums, merged_count


def write_samples(stage: Stage, store, step: int) -> None:
    """The stage's samples at ``step``, stored under ``samples/step-…``; a store outage loses only them."""
    faults.point("samples")
    with tempfile.TemporaryDirectory() as tmp:
        stage.write_samples(Path(tmp), step)
        if any(Path(tmp).iterdir()):
            try:
                store.log_files(tmp, f"samples/{checkpoint_name(step)}")
            except Exception as err:  # an artifact store outage: the samples of this step only are lost
                log.warning("The samples of step %d could not be stored (%s); training goes on", step, first_line(err))
