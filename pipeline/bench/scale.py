"""Cost that must not grow with the run: a resume and a checkpoint commit of a long run against a short one.

Each curve is measured at three sizes, in a fresh store each (SQLite, or a throwaway PostgreSQL database), so a
user sees whether the cost stays flat; the summary figure of each curve holds ``largest_over_smallest``.

- ``scale/resume_vs_history/<store>``: a real tiny ``train_adapter`` run (2 steps, a checkpoint) whose store also
  holds ``steps`` x 20 metrics of history (pipeline.bench.history), then resumed by real subprocesses, one step
  further each time. The figure is the resume's own tracking work from the start-up line (download, verify, load,
  config, run setup, restore), and the whole process start → first step beside it (imports included, which do
  not depend on the run and vary by seconds on a shared machine).
- ``scale/resume_vs_checkpoints``: the same resume after the run has committed ``n`` checkpoints under retention
  (the last 3 kept). A commit leaves one logged model behind per checkpoint (deleted with the checkpoint), which
  is what a run of ``n`` commits adds to the store; they are made through the engine's own ``CheckpointModels``.
- ``scale/commit_vs_history/<store>``: the time of one real commit whose step's 20 metrics go through the engine's
  ``MetricLogger`` and are linked to the checkpoint's logged model, once the run holds ``steps`` x 20 metrics of
  history. ``relinked`` beside it: the same commit when the step's points were stored before the checkpoint asked
  for them (the engine's fallback: they are logged again with the model's ID, and MLflow looks the duplicates up
  in the run's history), which was every commit's path before the points were linked when first sent.
- ``scale/commit_vs_checkpoints``: the time of one real commit (``CheckpointStore.save`` + wait: state written,
  hashed, uploaded, verified, tags, retention listing and deletes, index.csv, logged model) once ``n`` commits
  went before it in the same run.
"""

from __future__ import annotations

import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline.bench import emit, figure, spread
from pipeline.bench.harness import new_run, run_ids, stage_startup, working_in
from pipeline.bench.history import metric_names, value, write_history

log = logging.getLogger(__name__)

TINY = [
    "ssl=tiny",
    "validation.interval=0",
    "tracking.log_model=false",
    "tracking.checkpoint_models=true",
    "checkpoint.save_interval=1",
    "checkpoint.keep_last_n=3",
    "checkpoint.keep_best_k=0",
]
# the start-up phases a resume's tracking work falls in (imports, build and the first step do not read the store)
RESUME_PHASES = ("download", "verify", "load", "config", "run setup", "restore")


@contextmanager
def store(kind: str) -> Iterator[str]:
    """A fresh, empty tracking store of ``kind`` (sqlite | postgresql) with a working directory; its URI."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if kind != "postgresql":
            with working_in(tmp, f"sqlite:///{tmp}/mlflow.db"):
                yield os.environ["MLFLOW_TRACKING_URI"]
            return
        from pipeline.ops.teamserver import Postgres

        postgres = Postgres(secrets.token_urlsafe(12))
        postgres.start()
        try:
            with working_in(tmp, postgres.create_database("mlflow")):
                yield os.environ["MLFLOW_TRACKING_URI"]
        finally:
            postgres.stop()


def _trained_run(client: MlflowClient) -> str:
    before = run_ids(client)
    stage_startup([*TINY, "trainer.max_steps=2"], dict(os.environ))
    return new_run(client, before)


def _resumes(run_id: str, first_step: int, repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` resumes of the run, one step further each; (tracking phases, process start → first step) in s."""
    tracking, total = [], []
    for i in range(repeats):
        seconds, phases = stage_startup(
            [f"resume_run={run_id}", f"trainer.max_steps={first_step + i}"], dict(os.environ)
        )
        tracking.append(sum(phases.get(name, 0.0) for name in RESUME_PHASES))
        total.append(seconds)
    return tracking, total


def _curve(name: str, unit: str, how: str, points: dict[int, list[float]], extra: dict[str, Any]) -> list[dict]:
    """One figure per size and a summary whose value is the largest size's median ÷ the smallest's."""
    medians = {size: statistics.median(values) for size, values in points.items()}
    ratio = medians[max(medians)] / medians[min(medians)]
    figures = [
        figure(f"{name}/{size}", medians[size], unit, how, spread=spread(values)) for size, values in points.items()
    ]
    figures.append(
        figure(
            name,
            ratio,
            "largest / smallest",
            how,
            target="<= 1.2",
            met=ratio <= 1.2,
            largest_over_smallest=round(ratio, 3),
            medians={str(size): round(m, 4) for size, m in medians.items()},
            **extra,
        )
    )
    return figures


def resume_vs_history(
    kind: str = "sqlite", sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), metrics: int = 20, repeats: int = 3
) -> list[dict[str, Any]]:
    """Resume latency of a run holding ``size`` steps x ``metrics`` metrics, per size, in a ``kind`` store."""
    tracking: dict[int, list[float]] = {}
    total: dict[int, list[float]] = {}
    written_s, store_mb = {}, {}
    for size in sizes:
        with store(kind) as uri:
            client = MlflowClient(uri)
            run_id = _trained_run(client)
            started = time.perf_counter()
            write_history(uri, run_id, size, metrics, prefix="history/m")
            written_s[str(size)] = round(time.perf_counter() - started, 1)
            if kind == "sqlite":
                store_mb[str(size)] = round(Path(uri.removeprefix("sqlite:///")).stat().st_size / 1e6, 1)
            tracking[size], total[size] = _resumes(run_id, 3, repeats)
            log.info("%s, %d steps: resume tracking phases %s s", kind, size, tracking[size])
    how = (
        f"{kind} store: a tiny train_adapter run (2 steps) with size x {metrics} metrics of history, resumed "
        f"{repeats} times (subprocesses, one step further each); the value is the median of the start-up phases "
        f"that read the store ({', '.join(RESUME_PHASES)}); process_s is process start -> first step"
    )
    extra = {"process_s": {str(s): spread(v, 2) for s, v in total.items()}, "history_write_s": written_s}
    if store_mb:
        extra["store_mb"] = store_mb
    return _curve(f"scale/resume_vs_history/{kind}", "s", how, tracking, extra)


def _leftovers(client: MlflowClient, run_id: str, count: int, start: int) -> None:
    """What ``count`` earlier commits under retention leave in the store: their logged models, created and then
    deleted by the engine's own CheckpointModels (negative steps: they never name a real checkpoint)."""
    from pipeline.engine.logged_models import CheckpointModels

    run = client.get_run(run_id)
    models = CheckpointModels(client, run_id, run.info.experiment_id, run.info.run_name, {}, run.data.tags)
    for i in range(count):
        step = -(start + i + 1)
        link = models.link(step, {"epoch": 0})
        link.relog = [Metric("train/loss", 1.0, 0, step)]  # a linked point, as a commit's step has
        models.committed(step, {"epoch": 0}, link)
        models.deleted([step])


def resume_vs_checkpoints(sizes: tuple[int, ...] = (10, 1000, 10_000), repeats: int = 3) -> list[dict[str, Any]]:
    """Resume latency of one run after ``size`` committed checkpoints (the last 3 kept), SQLite."""
    tracking: dict[int, list[float]] = {}
    total: dict[int, list[float]] = {}
    with store("sqlite") as uri:
        client = MlflowClient(uri)
        run_id = _trained_run(client)
        made, step = 2, 3  # the run's own two commits
        for size in sizes:
            _leftovers(client, run_id, size - made, made)
            made = size
            tracking[size], total[size] = _resumes(run_id, step, repeats)
            made += repeats  # each resume commits its step
            step += repeats
            log.info("%d commits: resume tracking phases %s s", size, tracking[size])
    how = (
        f"SQLite store: a tiny train_adapter run after size commits under retention (keep_last_n=3), the earlier "
        f"ones' logged models made and deleted by CheckpointModels; resumed {repeats} times; the value is the median "
        f"of the start-up phases that read the store ({', '.join(RESUME_PHASES)})"
    )
    return _curve(
        "scale/resume_vs_checkpoints",
        "s",
        how,
        tracking,
        {"process_s": {str(s): spread(v, 2) for s, v in total.items()}},
    )


def commit_vs_checkpoints(sizes: tuple[int, ...] = (10, 1000, 10_000), window: int = 10) -> list[dict[str, Any]]:
    """The time of a real commit after ``size`` commits of the same run (SQLite, retention keeping 3)."""
    from pipeline.engine.checkpointing import CheckpointStore, RetentionPolicy
    from pipeline.engine.logged_models import CheckpointModels
    from pipeline.engine.tracking import start_or_adopt_run

    state = {"model": {"w": torch.randn(256, 256)}, "step": 0}  # a 256 KB state: the bookkeeping is what is timed
    times: dict[int, list[float]] = {}
    with store("sqlite") as uri:
        client = MlflowClient(uri)
        run_id = start_or_adopt_run(client, experiment="bench-scale", run_name="commits", tags={})
        run = client.get_run(run_id)
        models = CheckpointModels(client, run_id, run.info.experiment_id, "commits", {}, run.data.tags)
        checkpoints = CheckpointStore(
            client,
            run_id,
            Path("staging"),
            RetentionPolicy(3, 1, "val/loss", "min"),
            on_save=models.link,
            on_commit=models.committed,
            on_delete=models.deleted,
        )
        step = 0
        for size in sizes:
            while step < size + window:
                step += 1
                row = {"name": f"step-{step:08d}", "step": step, "epoch": 0, "val/loss": 1.0 / step}
                started = time.perf_counter()
                checkpoints.save(step, {**state, "step": step}, {"step": step, "epoch": 0}, row)
                checkpoints.wait()
                if step > size:
                    times.setdefault(size, []).append(time.perf_counter() - started)
            log.info("commits after %d: %s s", size, [round(t, 3) for t in times[size]])
        checkpoints.close()
    how = (
        f"SQLite store, one run: CheckpointStore.save + wait of a 256 KB state (write, sha256, upload, verify, "
        f"commit tags, retention keeping the last 3 and the best 1, index.csv, the logged model made and the "
        f"deleted ones' removed); the value is the median of the {window} commits after size commits"
    )
    return _curve("scale/commit_vs_checkpoints", "s", how, times, {})


def commit_vs_history(
    kind: str = "sqlite",
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
    metrics: int = 20,
    window: int = 10,
    relinked: int = 3,
) -> list[dict[str, Any]]:
    """The time of a real commit with its step's metrics linked to its logged model, after ``size`` steps x
    ``metrics`` metrics of history (a fresh ``kind`` store per size); ``relinked`` commits of the fallback path."""
    linked: dict[int, list[float]] = {}
    late: dict[int, list[float]] = {}
    for size in sizes:
        linked[size], late[size] = _commits_after_history(kind, size, metrics, window, relinked)
        log.info(
            "%s, %d steps: commits %s s, relinked %s s",
            kind,
            size,
            [round(t, 3) for t in linked[size]],
            [round(t, 3) for t in late[size]],
        )
    how = (
        f"{kind} store, one run holding size x {metrics} metrics of history: CheckpointStore.save + wait of a 256 KB "
        f"state whose step's {metrics} metrics go through MetricLogger, linked to the checkpoint's logged model in "
        f"the call that stores them; the value is the median of {window} commits"
    )
    extra = {
        "relinked_s": {str(s): spread(v, 3) for s, v in late.items()},
        "relinked_how": f"the median of {relinked} commits whose step's points were stored first, then linked by "
        f"logging them again (MLflow's duplicate lookup)",
    }
    return _curve(f"scale/commit_vs_history/{kind}", "s", how, linked, extra)


def _commits_after_history(
    kind: str, size: int, metrics: int, window: int, relinked: int
) -> tuple[list[float], list[float]]:
    """In a fresh ``kind`` store, a run holding ``size`` steps x ``metrics`` metrics of history: the seconds of
    ``window`` commits whose step's points are linked when first sent, then of ``relinked`` whose points were
    stored before the checkpoint asked."""
    from pipeline.engine.checkpointing import CheckpointStore, RetentionPolicy
    from pipeline.engine.logged_models import CheckpointModels
    from pipeline.engine.senders import MetricLogger
    from pipeline.engine.tracking import start_or_adopt_run

    state = {"model": {"w": torch.randn(256, 256)}, "step": 0}
    names = metric_names(metrics, "train/m")
    linked, late = [], []
    with store(kind) as uri:
        client = MlflowClient(uri)
        run_id = start_or_adopt_run(client, experiment="bench-scale", run_name="commits", tags={})
        write_history(uri, run_id, size, metrics, prefix="train/m")
        run = client.get_run(run_id)
        models = CheckpointModels(client, run_id, run.info.experiment_id, "commits", {}, run.data.tags)
        logger = MetricLogger(client, run_id, flush_seconds=3600.0)
        checkpoints = CheckpointStore(
            client,
            run_id,
            Path("staging"),
            RetentionPolicy(3, 0, "val/loss", "min"),
            on_save=models.link,
            on_commit=models.committed,
            on_delete=models.deleted,
            on_abandon=models.abandoned,
        )
        for i in range(window + relinked):
            step = size + 1 + i
            logger.log({name: value(step, k) for k, name in enumerate(names)}, step)
            if i >= window:  # stored before the checkpoint asks: linked by logging them again at the commit
                logger.flush(wait=True)
            row = {"name": f"step-{step:08d}", "step": step, "epoch": 0}
            started = time.perf_counter()
            checkpoints.save(step, {**state, "step": step}, {"step": step, "epoch": 0}, row, flush_metrics=logger.flush)
            checkpoints.wait()
            (linked if i < window else late).append(time.perf_counter() - started)
        checkpoints.close()
        logger.close()
    return linked, late


if __name__ == "__main__":  # a quick look at small sizes: python -m pipeline.bench.scale
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    for fig in [*resume_vs_history(sizes=(100, 1000, 10_000), repeats=1), *commit_vs_checkpoints(sizes=(2, 20, 40))]:
        emit(fig)
