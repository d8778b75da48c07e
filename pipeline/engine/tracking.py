"""MLflow helpers: batched asynchronous metrics, tags and the run description (docs/architecture.md, Tracking)."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from pipeline.common import faults
from pipeline.config import mask_secrets, redact
from pipeline.engine import tags as tag
from pipeline.engine.outage import OUTAGE_LIMIT_S, NotRetried, StorageError, first_line, retry_until
from pipeline.engine.private_apis import dataset_entity, metric_steps

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
BACKLOG_WARN_BATCHES = 20  # batches waiting for the store before the job says it logs faster than the store keeps up
BACKLOG_MAX_BATCHES = 500  # ~500,000 points (~100 MB) waiting: the training thread waits instead of growing further
BACKLOG_WARN_EVERY_S = 600.0
MAX_PARAM_LENGTH = 6000


class MetricLogger:
    """Buffers metrics and hands them every ``flush_seconds`` to a background thread (``metric-sender``)
    that stores them in order, one batch at a time. A batch the store refuses (an outage) is tried again
    (engine/outage.py) until it is stored, so the charts keep no gap, or until the outage outlasts
    ``outage_limit_s``: then the next ``log`` or ``flush(wait=True)`` raises StorageError.

    ``already_logged`` (metric -> last step in the store) holds back what an interrupted attempt of
    the run logged already: steps re-trained after an exact resume give the same values, and logging
    them again would give the charts two points per step.

    A store slower than the job (a team server shared by many jobs that log every step) makes batches wait:
    past BACKLOG_WARN_BATCHES the job says so (every 10 minutes at most), naming the settings that help; at
    BACKLOG_MAX_BATCHES the training thread waits for the store rather than holding ever more points in memory.

    The newest step's points stay buffered until a later step is logged (or ``flush`` is called), so that a
    checkpoint saved at that step can still ask for them to be linked to its logged model: ``flush(link=...)``
    has the sender store them with the model's ID, in the one call that stores them (engine/logged_models.py).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        flush_seconds: float,
        already_logged: dict[str, int] | None = None,
        outage_limit_s: float = OUTAGE_LIMIT_S,
    ):
        self.client = client
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.outage_limit_s = outage_limit_s
        self.already_logged = dict(already_logged or {})
        self._buffer: list[Metric] = []
        self._latest: dict[str, Metric] = {}  # the newest point of each metric, as logged
        self._last_flush = time.monotonic()
        self._backlog_warned = -BACKLOG_WARN_EVERY_S
        self._queue: deque[list[Metric]] = deque()  # batches not stored yet, oldest first
        self._queued = self._stored = 0  # batches handed to the sender, and stored, so far
        self._links: dict[int, Any] = {}  # step -> CheckpointLink whose model the points of that step are stored with
        self._error: StorageError | NotRetried | None = None
        self._closed = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name="metric-sender", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._error is not None:
            raise self._error
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self.already_logged.get(key, -1):
                continue
            value = float(value)
            if math.isfinite(value):
                self._latest[key] = Metric(key, value, now_ms, step)
                self._buffer.append(self._latest[key])
            else:
                log.warning("metric %s is %s at step %d (not logged)", key, value, step)
        if len(self._buffer) >= MAX_BATCH or time.monotonic() - self._last_flush >= self.flush_seconds:
            self._hand_over(before_step=step)  # this step's points wait: a checkpoint at this step may link them

    def at_step(self, step: int) -> list[Metric]:
        """The points logged at ``step`` (timestamps included), among each metric's newest."""
        return [m for m in self._latest.values() if m.step == step]

    def flush(self, wait: bool = False, link: Any = None) -> list:
        """Hand what is buffered to the sender; with ``wait`` block until everything so far is stored.
        ``link`` (a CheckpointLink) has the points of its step stored with its model's ID; those already stored
        are left in ``link.relog``. Returns what another thread may wait on for the same (see
        ``CheckpointStore.save``)."""
        if link is not None:
            with self._cond:
                if any(m.step == link.step for m in self._buffer):
                    self._links[link.step] = link
                else:  # none buffered: either none were logged at that step, or they were sent already
                    link.relog = self.at_step(link.step)
        return self._hand_over(wait=wait)

    def _hand_over(self, wait: bool = False, before_step: int | None = None) -> list:
        if before_step is not None and len(self._buffer) < 2 * MAX_BATCH:
            cut = next((i for i, m in enumerate(self._buffer) if m.step >= before_step), len(self._buffer))
        else:
            cut = len(self._buffer)
        if cut:
            faults.point("metrics.flush")
        with self._cond:
            handed, self._buffer = self._buffer[:cut], self._buffer[cut:]
            while handed:
                batch, handed = handed[:MAX_BATCH], handed[MAX_BATCH:]
                self._queue.append(batch)
                self._queued += 1
            self._cond.notify_all()
            sent = _Stored(self, self._queued)
            waiting = len(self._queue)
        if cut or not self._buffer:  # held back only the newest step: the next step's log hands it over
            self._last_flush = time.monotonic()
        if waiting >= BACKLOG_WARN_BATCHES and self._last_flush - self._backlog_warned >= BACKLOG_WARN_EVERY_S:
            self._backlog_warned = self._last_flush
            log.warning(
                "%d batches of metrics (up to %d values) are waiting to be stored: the tracking store takes "
                "them slower than this job logs them, and at %d batches training waits for it. A larger "
                "tracking.metric_interval (a point per N steps) or more server workers (mlflow server "
                "--workers) keep up; docs/benchmarks.md, Cost growth",
                waiting,
                waiting * MAX_BATCH,
                BACKLOG_MAX_BATCHES,
            )
        if wait:
            sent.wait()
        elif waiting >= BACKLOG_MAX_BATCHES:  # bounded memory: wait until the oldest batches are stored
            self._wait_stored(self._queued - BACKLOG_MAX_BATCHES // 2)
        return [sent]

    def close(self) -> None:
        """Stop the sender once what is queued is stored (or has failed)."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    def _wait_stored(self, count: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stored >= count or self._error is not None)
            if self._stored < count:
                raise self._error

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed.is_set())
                if not self._queue:
                    return
                batch, pending = self._queue[0], sum(len(b) for b in self._queue)
                first, last = batch[0].step, batch[-1].step
                for step in [s for s in self._links if s < first]:  # their points are stored
                    del self._links[step]
                links = [link for step, link in self._links.items() if step <= last]
            batch = self._linked(batch, links)
            steps = f"steps {first}-{last}" if first != last else f"step {first}"
            try:
                retry_until(
                    lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch),
                    f"Storing the metrics of {steps} ({pending} values waiting)",
                    self.outage_limit_s,
                )
            except (StorageError, NotRetried) as err:  # NotRetried: this job may not write to the run any more
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.popleft()
                self._stored += 1
                self._cond.notify_all()

    @staticmethod
    def _linked(batch: list[Metric], links: list) -> list[Metric]:
        """``batch`` with the points of each link's step carrying its model's ID (made now, if need be)."""
        ids = {link.step: link.metric_model_id() for link in links}
        if not any(ids.values()):
            return batch
        return [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=ids[m.step]) if ids.get(m.step) else m for m in batch
        ]


class _Stored:
    """Waits until the metric batches handed over so far are stored (raises StorageError if they cannot be)."""

    def __init__(self, logger: MetricLogger, count: int):
        self.logger, self.count = logger, count

    def wait(self) -> None:
        self.logger._wait_stored(self.count)


class TagWriter:
    """Sets a run's tags from a background thread, so the training loop never waits on the tracking
    store for its progress. Only the newest value of each tag is sent; a failed send is retried with
    the next change or after ``retry_seconds``, and never stops training."""

    def __init__(self, client: MlflowClient, run_id: str, retry_seconds: float = 5.0):
        self.client, self.run_id, self.retry_seconds = client, run_id, retry_seconds
        self._pending: dict[str, str] = {}
        self._sending = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name="tag-writer", daemon=True)
        self._thread.start()

    def set(self, tags: dict[str, str]) -> None:
        with self._cond:
            if self._closed:
                return
            self._pending.update(tags)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every tag set so far is stored; False when ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._sending, timeout)

    def close(self, timeout: float = 30.0) -> None:
        if not self.flush(timeout):
            log.warning("Tags %s could not be stored within %.0f s", ", ".join(sorted(self._pending)), timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                batch, self._pending, self._sending = self._pending, {}, True
            failed = False
            try:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in batch.items()])
            except NotRetried as err:  # this job may not write to the run any more: drop what is left
                log.debug("Tags %s not set: %s", ", ".join(sorted(batch)), err)
                with self._cond:
                    self._pending, self._sending, self._closed = {}, False, True
                    self._cond.notify_all()
                return
            except Exception as err:  # a flaky tracking server must not stop training
                log.warning("Could not set tags %s (%s); retrying", ", ".join(sorted(batch)), err)
                failed = True
            with self._cond:
                if failed:  # newer values set meanwhile win
                    self._pending = {**batch, **self._pending}
                self._sending = False
                self._cond.notify_all()
                if failed:
                    self._cond.wait(self.retry_seconds)


class AccessError(RuntimeError):
    """The tracking store cannot be used by this job (unreachable, wrong credentials, no permission)."""


def access_error(err: Exception, what: str) -> AccessError | None:
    """A clear AccessError for a refusal by the server's auth (401/403), else None."""
    code = getattr(err, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = repr(user) if user else "nobody (MLFLOW_TRACKING_USERNAME is not set)"
    uri = mlflow.get_tracking_uri()
    if code == "UNAUTHENTICATED":
        return AccessError(
            f"The tracking server {uri} refused the credentials of {who}: check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; the server's admin creates users "
            "(docs/team-server.md)"
        )
    if code == "PERMISSION_DENIED":
        return AccessError(
            f"User {who} may not {what} on the tracking server {uri}. Ask the experiment's owner or the "
            "server's admin for EDIT permission on it (docs/team-server.md), or use another "
            "experiment: tracking.experiment=<name>"
        )
    return None


def check_access(client: MlflowClient) -> None:
    """One cheap read before anything else, so that an unreachable store or wrong credentials fail at
    once with one message (AccessError), not after the model is built."""
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # MLflow's own exceptions, or requests' when the server is unreachable
        raise access_error(err, "read experiments") or AccessError(
            f"Cannot use the tracking store {mlflow.get_tracking_uri()}: {first_line(err)}. "
            "Check MLFLOW_TRACKING_URI and that the server is up"
        ) from err


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment called ``name``, created when missing."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def default_run_name(run_id: str, *parts: str) -> str:
    """A default run name: the run ID's first six characters, then what the run is (``3fa9c1-tiny-demo``).
    The runs table cuts long names off at the end, so names that differ must differ at the front."""
    return "-".join([run_id[:6], *parts])


def start_or_adopt_run(
    client: MlflowClient,
    *,
    experiment: str,
    run_name: str | Callable[[str], str],
    tags: dict[str, str],
    params: dict[str, Any] | None = None,
    launcher: str | None = None,
) -> str:
    """A job's own run: ``launcher`` (the run `mlflow run` created, MLFLOW_RUN_ID), renamed, or a new run in
    ``experiment``; then named (``run_name``, or ``run_name(run_id)``), tagged, and given the params it
    does not have yet (secrets masked in all three, ``redact``; `mlflow run` logs its entry-point parameters
    first, and MLflow params cannot change)."""
    run_id = launcher or client.create_run(experiment_id(client, experiment)).info.run_id
    name = run_name(run_id) if callable(run_name) else run_name
    for key, value in redact({tag.RUN_NAME: name, **tags}).items():
        client.set_tag(run_id, key, value)
    if params:
        existing = client.get_run(run_id).data.params
        log_params(client, run_id, {k: v for k, v in mask_secrets(params).items() if k not in existing})
    return run_id


def log_dataset_inputs(client: MlflowClient, run_id: str, datasets: list, context: str) -> None:
    """Log ``mlflow.data`` datasets as the run's inputs, tagged with their role (training, output); their names
    and sources with secrets masked (``redact``: e.g. the credentials of an ``s3://`` or ``https://`` address)."""
    entities = [dataset_entity(d) for d in datasets]
    client.log_inputs(
        run_id,
        [
            DatasetInput(
                Dataset(redact(e.name), e.digest, e.source_type, redact(e.source), e.schema, e.profile),
                [InputTag("mlflow.data.context", context)],
            )
            for e in entities
        ],
    )


def copy_history(client: MlflowClient, src_run: str, dst_run: str, max_step: int) -> int:
    """Copy every metric of ``src_run`` up to ``max_step`` into ``dst_run``; returns the count."""
    keys = client.get_run(src_run).data.metrics.keys()
    metrics = [m for key in keys for m in client.get_metric_history(src_run, key) if m.step <= max_step]
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(dst_run, metrics=metrics[i : i + MAX_BATCH])
    return len(metrics)


def latest_steps(run) -> dict[str, int]:
    """The last step logged of each metric of ``run``. MLflow keeps every metric's latest point (highest
    step) with the run, so this costs no history query, however long the run has trained."""
    return metric_steps(run)


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_base() -> str:
    """The tracking server's address without credentials, or "" for a local store (no UI runs yet)."""
    uri = urlsplit(mlflow.get_tracking_uri())
    if uri.scheme not in ("http", "https") or not uri.hostname:
        return ""
    return urlunsplit((uri.scheme, uri.hostname + (f":{uri.port}" if uri.port else ""), uri.path.rstrip("/"), "", ""))


# The runs table as the pipeline's links open it: an MLflow "shared view" stored as an experiment tag
# (``mlflow.sharedViewState.<key>``, what the UI's Share button writes), named by ``viewStateShareKey``.
RUNS_VIEW_KEY = "speech-pipeline-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_COLUMNS = [
    f"tags.`{tag.PROGRESS}`",
    "metrics.`val/loss`",
    "metrics.`val/mel`",
    "metrics.`val/cer`",
    "metrics.`val/wer`",
    "metrics.`train/loss`",
    f"tags.`{tag.MODEL}`",
    f"tags.`{tag.DATASET}`",
    f"tags.`{tag.CHECKPOINT_LATEST}`",
]  # a metric no run of the experiment logs shows no column
RUNS_VIEW = json.dumps(
    {
        "selectedColumns": RUNS_VIEW_COLUMNS,
        "columnOrder": RUNS_VIEW_COLUMNS,
        "columnWidths": {f"tags.`{tag.PROGRESS}`": 300},
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    },
    sort_keys=True,
)
# ``workflowType``: a fresh browser would otherwise open the UI's GenAI pages (traces, no runs, "Agent versions").
ML_VIEW = "workflowType=machine_learning"


def ensure_runs_view(client: MlflowClient, experiment_id: str) -> None:
    """Store the runs table view the experiment links open (progress, validation and training loss, model,
    dataset, latest checkpoint as columns) in the experiment, once. Never fails a job: a link without its
    view still opens the runs table, with the UI's default columns after a notice."""
    try:
        if client.get_experiment(experiment_id).tags.get(RUNS_VIEW_TAG) != RUNS_VIEW:
            client.set_experiment_tag(experiment_id, RUNS_VIEW_TAG, RUNS_VIEW)
    except Exception as err:
        log.warning(
            "Could not store the runs table view in experiment %s (%s); its links show MLflow's default columns",
            experiment_id,
            first_line(err),
        )


def ui_url(experiment_id: str, run_id: str | None = None, base: str | None = None, page: str = "") -> str:
    """A link into the MLflow UI, in its model-training pages: the experiment's runs table in the pipeline's
    view (``ensure_runs_view``) or another of its pages (``page="models"``, the Models tab), or a run's
    page (``page``: one of its tabs, such as ``artifactPath/checkpoints/index.csv``). ``base`` defaults to
    ``ui_base()``: with a local store the link stays relative to whatever serves the UI."""
    if run_id:
        view = f"runs/{run_id}{'/' + page if page else ''}?{ML_VIEW}"
    elif page:
        view = f"{page}?{ML_VIEW}"
    else:
        view = f"runs?{ML_VIEW}&viewStateShareKey={RUNS_VIEW_KEY}"
    return f"{(ui_base() if base is None else base).rstrip('/')}/#/experiments/{experiment_id}/{view}"


def dashboard_hint(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look at a run (or an experiment) in the MLflow UI, for the closing log line."""
    if ui_base():
        return ui_url(experiment_id, run_id)
    return (
        f"mlflow ui --backend-store-uri {redact(mlflow.get_tracking_uri())}, then open "
        f"{ui_url(experiment_id, run_id, base=LOCAL_UI)}"
    )


def resume_command(stage: str, run_id: str, nproc: int = 1) -> str:
    """The command that resumes ``run_id``, with as many processes (torchrun) as it trained with."""
    launcher = f"torchrun --nproc_per_node={nproc}" if nproc > 1 else "python"
    return f"{launcher} -m pipeline.stages.{stage} resume_run={run_id}"


def describe_run(
    *,
    stage: str,
    run_id: str,
    progress: str,
    status: str,
    latest_checkpoint: str | None,
    history: list[dict[str, Any]],
    experiment_id: str = "",
    nproc: int = 1,
    batch: str = "",
    job_key: str = "",
) -> str:
    """The run's Markdown description. The UI shows its first lines until "Show more": status, progress,
    the latest checkpoint and the resume command come first; then how to stop, links, the attempts.
    ``nproc``: the processes the latest attempt trained with (torchrun); ``batch``: its effective batch;
    ``job_key``: the run's job key (resume=auto), if any."""
    ranks = f" -P nproc={nproc}" if nproc > 1 else ""
    lines = [
        f"**{status}** · {progress or 'starting'} · latest checkpoint `{latest_checkpoint or 'none yet'}`",
        "",
        f"Resume: `mlflow run . -e {stage} --env-manager local{ranks} -P resume_run={run_id}`",
        "",
        f"Or: `{resume_command(stage, run_id, nproc)}`. Stop it gracefully: set the tag "
        "`stop_requested` = `true` on this run.",
        "",
    ]
    if batch:
        lines += [f"Effective batch: {batch}", ""]
    if job_key:
        lines += [
            f"Job key `{job_key}`: a launch with `resume=auto` and this key (a requeued Slurm job) continues "
            "this run by itself.",
            "",
        ]
    if experiment_id:
        lines += [
            f"[All runs of this experiment]({ui_url(experiment_id)}) · "
            f"[checkpoints]({ui_url(experiment_id, run_id, page='artifactPath/checkpoints/index.csv')}) · "
            f"[checkpoints of every run, by metric]({ui_url(experiment_id, page='models')})",
            "",
        ]
    earlier = int(history[0]["attempt"]) - 1 if history else 0
    if earlier > 0:  # a resume reads back only the newest attempts (attempts.ATTEMPTS_SHOWN)
        lines += [f"Attempts 1-{earlier}: `config/attempt-<n>.yaml` in this run's artifacts.", ""]
    lines += ["| attempt | started (UTC) | from | overrides | status |", "|---|---|---|---|---|"]
    for h in history:
        overrides = " ".join(redact(h.get("overrides") or [])) or "—"
        lines.append(
            f"| {h['attempt']} | {h['started']} | {h.get('from') or 'fresh'} | `{overrides}` | {h.get('status', '')} |"
        )
    return "\n".join(lines)
