"""What the engine costs in one process: step overhead, checkpoint stall and the metric path.

Each figure puts the engine next to a reference measured on the same machine at the same time:

- ``tracking_overhead``: the engine (``run_stage``, a real SQLite tracking store, metrics every step,
  system metrics on, checkpoints every K) against a bare loop over the same stage's parts (its
  loader, ``training_step`` under the same autocast, its LR schedulers), in interleaved segments;
- ``checkpoint_stall``: the time the training thread is blocked by ``Engine.save_checkpoint`` against a
  synchronous save + sha256 + upload of the same state, alternating, in one process;
- ``metric_throughput``: points per second the metric path accepts on the training thread.

What whole job processes cost (resume and stop latency, torchrun) is in jobs.py.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.bench import figure, spread
from pipeline.bench.harness import build_stage, engine_stamps, new_run, run_ids, step_time, tracking_store
from pipeline.engine.checkpoint_files import checkpoint_name, write_local
from pipeline.engine.checkpointing import CheckpointStore, RetentionPolicy
from pipeline.engine.senders import MetricLogger
from pipeline.engine.session import run_stage
from pipeline.engine.tracking import start_or_adopt_run
from pipeline.engine.trainer import Engine
from pipeline.stages import stage_class

log = logging.getLogger(__name__)


def _sync(stage) -> None:
    if stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)


def bare_loop(stage, steps: int) -> list[float]:
    """A hand-written loop over the stage's parts; returns the time after each step."""
    cfg = stage.cfg
    workers, size = int(cfg.data.num_workers), int(cfg.batch_size)
    for m in stage.modules.values():
        m.train()
    stamps, epoch = [], 0
    while len(stamps) < steps:
        for batch in stage.train_source.loader(epoch, 0, size, workers, stage.collate):
            batch = stage.to_device(batch)
            with stage.precision.autocast():
                out = stage.training_step(batch)
            for sch in stage.schedulers.values():
                sch.step()
            {k: float(v) for k, v in out.items()}  # what any loop does to print or log its loss
            stamps.append(time.perf_counter())
            if len(stamps) == steps:
                break
        epoch += 1
    return stamps


def tracking_overhead(
    stage_name: str, overrides: list[str], *, steps: int, save_every: int, pairs: int, warmup: int, label: str
) -> dict[str, Any]:
    """Engine step time ÷ bare-loop step time over ``steps`` steps, ``pairs`` interleaved segments."""
    job = [
        *overrides,
        f"trainer.max_steps={steps}",
        f"checkpoint.save_interval={save_every}",
        "validation.interval=0",
        "tracking.system_metrics=true",
        "tracking.log_model=false",
    ]
    engine_times, bare_times, ratios = [], [], []
    with tracking_store() as client:
        stage = None
        for pair in range(pairs):
            order = ("bare", "engine") if pair % 2 == 0 else ("engine", "bare")
            times = {}
            for side in order:
                if side == "bare":
                    stage = build_stage(stage_name, job, client)
                    times[side] = step_time(bare_loop(stage, steps), warmup)
                    samples = int(stage.cfg.batch_size)
                    del stage
                else:
                    before = run_ids(client)
                    code = run_stage(stage_class(stage_name), job)
                    if code != 0:
                        raise RuntimeError(f"engine run failed with exit code {code}")
                    run_id = new_run(client, before)
                    times[side] = step_time(engine_stamps(client, run_id), warmup)
            engine_times.append(times["engine"])
            bare_times.append(times["bare"])
            ratios.append(times["engine"] / times["bare"])
    value = statistics.median(ratios)
    return figure(
        f"tracking_overhead/{label}",
        value,
        "engine step / bare step",
        f"{stage_name} {' '.join(overrides)}: median over {pairs} interleaved pairs of the mean step time over steps "
        f"{warmup + 1}..{steps} (metrics every step, system metrics on, a checkpoint every {save_every} steps, "
        "SQLite tracking store) against a bare loop over the same stage parts",
        target="<= 1.03",
        met=value <= 1.03,
        ratio=spread(ratios),
        engine_step_s=spread(engine_times),
        bare_step_s=spread(bare_times),
        samples_per_s={
            "engine": round(samples / statistics.median(engine_times), 2),
            "bare": round(samples / statistics.median(bare_times), 2),
        },
    )


# --------------------------------------------------------------------------------------------
# Checkpoint stall
# --------------------------------------------------------------------------------------------


def checkpoint_stall(overrides: list[str], *, pairs: int, label: str, target: float | None = 0.2) -> dict[str, Any]:
    """Time the training thread spends in ``Engine.save_checkpoint`` ÷ a synchronous save + sha256 +
    upload of the same state, alternating in one process, a training step before each."""
    blocked, synchronous, sizes = [], [], []
    with tracking_store() as client:
        stage = build_stage("train_adapter", [*overrides, "tracking.system_metrics=false"], client)
        run_id = start_or_adopt_run(client, experiment="bench", run_name=f"stall-{label}", tags={})
        store = CheckpointStore(client, run_id, Path(".checkpoints"), RetentionPolicy(1, 0, "val/loss", "min"))
        engine = Engine(stage, MetricLogger(client, run_id, 5.0), store, stopper=None, run_id=run_id)
        batches = _endless_batches(stage)

        def train_one() -> None:
            with stage.precision.autocast():
                stage.training_step(next(batches))
            engine.pos.step += 1

        train_one()  # the optimizer's state exists from here on
        for pair in range(pairs):
            for side in ("engine", "sync") if pair % 2 == 0 else ("sync", "engine"):
                train_one()
                _sync(stage)
                started = time.perf_counter()
                if side == "engine":
                    engine.save_checkpoint()
                    blocked.append(time.perf_counter() - started)
                    store.wait()  # not timed: checkpoints are far apart in a real job
                else:
                    local = write_local(
                        Path("sync-staging"),
                        engine.pos.step,
                        engine.state_dict(),
                        {"format_version": 1, "step": engine.pos.step},
                    )
                    store.repo.log_artifacts(str(local), f"sync/{checkpoint_name(engine.pos.step)}")
                    synchronous.append(time.perf_counter() - started)
                    sizes.append((local / "state.pt").stat().st_size)
                    store.repo.delete_artifacts(f"sync/{checkpoint_name(engine.pos.step)}")
                    shutil.rmtree(local)
        store.close()
    ratios = [b / s for b, s in zip(blocked, synchronous)]
    value = statistics.median(ratios)
    size_mb = statistics.median(sizes) / 1e6
    return figure(
        f"checkpoint_stall/{label}",
        value,
        "blocked / synchronous save",
        f"train_adapter {' '.join(overrides)} ({size_mb:.1f} MB state.pt): median over {pairs} alternating pairs of "
        "the training thread's time in Engine.save_checkpoint against write (torch.save + fsync + sha256) + upload "
        "of the same state, synchronously, SQLite tracking store with local artifacts",
        target=None if target is None else f"<= {target}",
        met=None if target is None else value <= target,
        state_mb=round(size_mb, 2),
        ratio=spread(ratios),
        blocked_s=spread(blocked),
        synchronous_s=spread(synchronous),
    )


def _endless_batches(stage) -> Iterator[dict]:
    epoch = 0
    while True:
        for batch in stage.train_source.loader(epoch, 0, int(stage.cfg.batch_size), 0, stage.collate):
            yield stage.to_device(batch)
        epoch += 1


# --------------------------------------------------------------------------------------------
# Metric path
# --------------------------------------------------------------------------------------------


def metric_throughput(*, steps: int, per_step: int) -> dict[str, Any]:
    """Points per second ``MetricLogger.log`` accepts on the training thread, and how fast the store
    takes them (SQLite, asynchronous batches)."""
    with tracking_store() as client:
        run_id = start_or_adopt_run(client, experiment="bench", run_name="metrics", tags={})
        metrics = MetricLogger(client, run_id, flush_seconds=5.0)
        names = [f"bench/m{i}" for i in range(per_step)]
        started = time.perf_counter()
        for step in range(1, steps + 1):
            metrics.log({name: step * 1e-3 + i for i, name in enumerate(names)}, step)
        accepted = time.perf_counter() - started
        metrics.flush(wait=True)
        stored = time.perf_counter() - started
        metrics.close()
        count = len(client.get_metric_history(run_id, names[0]))
    points = steps * per_step
    return figure(
        "metric_throughput",
        points / accepted,
        "points/s",
        f"{steps} steps × {per_step} metrics through MetricLogger.log on the caller's thread (batched, sent "
        "in order by a background thread every flush_seconds or 1000 points); stored_points_per_s includes waiting "
        "until the SQLite store holds them all",
        per_point_us=round(accepted / points * 1e6, 2),
        stored_points_per_s=round(points / stored, 1),
        stored_check=count == steps,
    )
