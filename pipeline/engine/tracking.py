"""MLflow helpers: batched asynchronous metrics, tags and the run description (docs/architecture.md, Tracking)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param

from pipeline.config import mask_secrets
from pipeline.engine import tags as tag

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
MAX_PARAM_LENGTH = 6000


class MetricLogger:
    """Buffers metrics and sends them with ``log_batch(synchronous=False)`` every few seconds."""

    def __init__(self, client: MlflowClient, run_id: str, flush_seconds: float):
        self.client = client
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self._buffer: list[Metric] = []
        self._pending = []
        self._last_flush = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                self._buffer.append(Metric(key, value, now_ms, step))
            else:
                log.warning("metric %s is %s at step %d (not logged)", key, value, step)
        if len(self._buffer) >= MAX_BATCH or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self, wait: bool = False) -> list:
        """Send what is buffered; with ``wait`` block until everything sent so far is stored. Returns the
        operations still in flight, which another thread may wait on (see ``CheckpointStore.save``)."""
        while self._buffer:
            batch, self._buffer = self._buffer[:MAX_BATCH], self._buffer[MAX_BATCH:]
            self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))
        self._last_flush = time.monotonic()
        if wait:
            for op in self._pending:
                if op is not None:
                    op.wait()
            self._pending.clear()
        else:
            self._pending = [op for op in self._pending if op is not None]
        return list(self._pending)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment called ``name``, created when missing."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def start_or_adopt_run(client: MlflowClient, *, experiment: str, run_name: str, tags: dict[str, str],
                       params: dict[str, Any] | None = None, launcher: str | None = None) -> str:
    """A job's own run: ``launcher`` (the run `mlflow run` created, MLFLOW_RUN_ID), renamed, or a new run in
    ``experiment``; then tagged, and given the params it does not have yet (secrets masked; `mlflow run`
    logs its entry-point parameters first, and MLflow params cannot change)."""
    if launcher:
        run_id = launcher
        client.set_tag(run_id, tag.RUN_NAME, run_name)
    else:
        run_id = client.create_run(experiment_id(client, experiment), run_name=run_name).info.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if params:
        existing = client.get_run(run_id).data.params
        log_params(client, run_id, {k: v for k, v in mask_secrets(params).items() if k not in existing})
    return run_id


def log_dataset_inputs(client: MlflowClient, run_id: str, datasets: list, context: str) -> None:
    """Log ``mlflow.data`` datasets as the run's inputs, tagged with their role (training, output)."""
    client.log_inputs(run_id, [DatasetInput(d._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])
                               for d in datasets])


def copy_history(client: MlflowClient, src_run: str, dst_run: str, max_step: int) -> int:
    """Copy every metric of ``src_run`` up to ``max_step`` into ``dst_run``; returns the count."""
    keys = client.get_run(src_run).data.metrics.keys()
    metrics = [
        m for key in keys for m in client.get_metric_history(src_run, key) if m.step <= max_step
    ]
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(dst_run, metrics=metrics[i : i + MAX_BATCH])
    return len(metrics)


def last_logged_step(client: MlflowClient, run_id: str, key: str) -> int | None:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=None)


def describe_run(
    *,
    stage: str,
    run_id: str,
    progress: str,
    status: str,
    latest_checkpoint: str | None,
    history: list[dict[str, Any]],
) -> str:
    """The run's Markdown description: progress, resume history and the resume command."""
    lines = [
        f"**{stage}** · {status} · {progress}",
        "",
        f"Latest committed checkpoint: `{latest_checkpoint or 'none yet'}`",
        "",
        "Resume this run (continues logging into it):",
        "",
        "```",
        f"mlflow run . -e {stage} --env-manager local -P resume_run={run_id}",
        f"python -m pipeline.{stage} resume_run={run_id}",
        "```",
        "",
        "Stop it gracefully: set the tag `stop_requested` = `true` on this run.",
        "",
        "| attempt | started (UTC) | from | overrides | status |",
        "|---|---|---|---|---|",
    ]
    for h in history:
        overrides = " ".join(h.get("overrides") or []) or "—"
        lines.append(
            f"| {h['attempt']} | {h['started']} | {h.get('from') or 'fresh'} | `{overrides}` | {h.get('status', '')} |"
        )
    return "\n".join(lines)
