"""What the training loop hands to the tracking store without waiting for it: metrics in ordered batches
(``MetricLogger``, thread ``metric-sender``) and tags, newest value first (``TagWriter``, thread ``tag-writer``)
(docs/architecture.md, Tracking; docs/benchmarks.md, Cost growth)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from pipeline.common import faults
from pipeline.engine.outage import OUTAGE_LIMIT_S, NotRetried, StorageError, retry_until

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
BACKLOG_WARN_BATCHES = 20  # batches waiting for the store before the job says it logs faster than the store keeps up
BACKLOG_MAX_BATCHES = 500  # ~500,000 points (~100 MB) waiting: the training thread waits instead of growing further
BACKLOG_WARN_EVERY_S = 600.0


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
