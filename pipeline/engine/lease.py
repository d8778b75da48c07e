"""One job per run: a lease in the run's tags (docs/architecture.md, One job per run).

A job that trains a run holds its lease: ``lease.token`` (unique to the job), ``lease.holder`` (host,
pid, since when, for people), ``lease.host``/``lease.pid``/``lease.process_start`` (to tell a dead
holder on the same machine) and ``lease.heartbeat`` (seconds since the epoch, renewed every
``heartbeat_s``). A second job that wants the run is refused while the lease is alive, with a message
naming the holder. A lease is taken over when its heartbeat is older than ``timeout_s`` (a crashed
job on another machine), or at once when its holder is on this machine and its process is gone.

MLflow tags have no compare-and-set, so taking a lease writes it, waits ``SETTLE_S`` and reads it
back: of two jobs that started together only the last writer finds its own token and trains. The
heartbeat reads the token too: a job that finds another's token (its lease was taken over while it
was cut off) stops without committing anything more to the run.

Fencing: every write of a job to its run goes through ``Lease.fence`` (``FencedClient`` for the tracking
client, ``CheckpointStore`` for the artifact store). No other job can take the lease over before the
holder's heartbeat is ``timeout_s`` old, so a holder is sure of its lease for ``timeout_s / 2`` after it
last read its own token there; past that (a job paused by SIGSTOP or a suspended machine, a long
outage) the next write reads the token again first, and a job that finds another's token writes
nothing more. What a paused job can still write after a takeover is the one call each of its threads
had already started when it was paused (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import psutil
from mlflow import MlflowClient
from mlflow.entities import RunTag

from pipeline.common.provenance import utc_now
from pipeline.engine.outage import NotRetried

log = logging.getLogger(__name__)

TOKEN, HOLDER, HOST, PID, PROCESS_START, HEARTBEAT = (
    "lease.token",
    "lease.holder",
    "lease.host",
    "lease.pid",
    "lease.process_start",
    "lease.heartbeat",
)
KEYS = (TOKEN, HOLDER, HOST, PID, PROCESS_START, HEARTBEAT)
SETTLE_S = 1.0  # between writing a lease and reading it back


class LeaseHeld(RuntimeError):
    """Another live job holds the run's lease; the message names it and says what to do."""


class LeaseLost(NotRetried):
    """Another job took this job's lease over: this job must not write to the run any more."""


def _process_start() -> float:
    return psutil.Process().create_time()


def holder_is_gone(tags: dict[str, str]) -> bool:
    """True when the holder ran on this machine and its process no longer exists, or is this process
    (an earlier job of it that ended without releasing; jobs in one process run one after another)."""
    if tags.get(HOST) != socket.gethostname():
        return False
    try:
        pid = int(tags.get(PID, ""))
        if pid == os.getpid():
            return True
        return abs(psutil.Process(pid).create_time() - float(tags.get(PROCESS_START, "nan"))) > 1.0  # pid reused
    except (psutil.NoSuchProcess, ValueError):
        return True


def heartbeat_age(tags: dict[str, str]) -> float:
    try:
        return max(time.time() - float(tags[HEARTBEAT]), 0.0)
    except (KeyError, ValueError):
        return float("inf")  # no or an unreadable heartbeat: a lease nobody renews


def held_by_live_job(tags: dict[str, str], timeout_s: float) -> bool:
    """A job holds the lease these tags record and is alive: its heartbeat is younger than ``timeout_s`` and, on
    this machine, its process still runs."""
    return bool(tags.get(TOKEN)) and heartbeat_age(tags) < timeout_s and not holder_is_gone(tags)


def run_timeout(run, default_s: float) -> float:
    """The lease timeout the run's jobs use (its ``tracking.lease_timeout_seconds`` param), else ``default_s``."""
    try:
        return float(run.data.params.get("tracking.lease_timeout_seconds", default_s))
    except ValueError:
        return default_s


class Lease:
    """This job's lease on one run; ``acquire`` takes it, ``release`` gives it back."""

    def __init__(self, client: MlflowClient, run_id: str, timeout_s: float, heartbeat_s: float):
        self.client, self.run_id = client, run_id
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self.took_over: str | None = None  # whose lease this job took over, for the run description
        self.on_lost: Callable[[], None] | None = None
        self._lost = False
        self._confirmed_at = -float("inf")  # time.monotonic() when this job last knew it held the lease
        self._confirm_lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    @property
    def held(self) -> bool:
        return not self._lost

    def check(self) -> None:
        """Raise LeaseLost when this job is known to have lost the lease."""
        if self._lost:
            raise LeaseLost(f"another job took over run {self.run_id}; this job writes nothing more to it")

    def fence(self) -> None:
        """Called before every write to the run: LeaseLost unless this job still holds the lease. Within
        ``timeout_s / 2`` of the last time the job read its own token nothing is read; later (the job was
        paused or cut off) the token is read again first."""
        self.check()
        if time.monotonic() - self._confirmed_at <= self.timeout_s / 2:
            return
        with self._confirm_lock:  # one read for all the threads that write
            if time.monotonic() - self._confirmed_at > self.timeout_s / 2:
                self._confirm()
        self.check()

    def _confirm(self) -> None:
        """Read the token: note the time when it is ours, mark the lease lost when it is another job's.
        A store that cannot be read raises its own error (an outage: the caller's write is retried)."""
        asked = time.monotonic()
        if self.client.get_run(self.run_id).data.tags.get(TOKEN) == self.token:
            self._confirmed_at = asked
            return
        if not self._lost:
            self._lost = True
            log.error(
                "Another job took over the lease of run %s: this job stops and writes nothing more to the run",
                self.run_id,
            )
            if self.on_lost:
                self.on_lost()

    def acquire(self, tags: dict[str, str], contended: bool = True) -> Lease:
        """Take the lease, given the run's tags as read now; LeaseHeld when a live job holds it.
        ``contended=False`` for a run this job has just created (no other job can know its ID yet)."""
        self._refuse_if_alive(tags)
        if tags.get(TOKEN):
            self.took_over = f"{tags.get(HOLDER, 'an unknown job')}, whose " + (
                "process is gone" if holder_is_gone(tags) else f"heartbeat stopped {heartbeat_age(tags):.0f} s ago"
            )
            log.warning("Taking over the lease of run %s from %s", self.run_id, self.took_over)
        pid, host = os.getpid(), socket.gethostname()
        written = time.monotonic()  # no other job can take the lease before its heartbeat, written now, expires
        self.client.log_batch(
            self.run_id,
            tags=[
                RunTag(TOKEN, self.token),
                RunTag(HOLDER, f"{host} pid {pid} since {utc_now()}"),
                RunTag(HOST, host),
                RunTag(PID, str(pid)),
                RunTag(PROCESS_START, repr(_process_start())),
                RunTag(HEARTBEAT, repr(time.time())),
            ],
        )
        if contended:
            time.sleep(SETTLE_S)
            now = self.client.get_run(self.run_id).data.tags
            if now.get(TOKEN) != self.token:  # a job that started at the same moment wrote after us
                raise LeaseHeld(self._held_message(now))
        self._confirmed_at = written
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, unless another job holds it by now."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if self._lost:
            return
        try:
            if self.client.get_run(self.run_id).data.tags.get(TOKEN) == self.token:
                for key in KEYS:
                    self.client.delete_tag(self.run_id, key)
        except Exception as err:  # the lease then expires by itself
            log.warning(
                "Could not release the lease of run %s (%s); it expires after %.0f s", self.run_id, err, self.timeout_s
            )

    def _refuse_if_alive(self, tags: dict[str, str]) -> None:
        if held_by_live_job(tags, self.timeout_s):
            raise LeaseHeld(self._held_message(tags))

    def _held_message(self, tags: dict[str, str]) -> str:
        return (
            f"Run {self.run_id} is being trained by another job: {tags.get(HOLDER, 'unknown holder')} "
            f"(last heartbeat {heartbeat_age(tags):.0f} s ago). Only one job may train a run at a time. Stop "
            "that job first (set the tag stop_requested=true on the run, or send it SIGTERM) and resume when it "
            f"has ended; a job that died is taken over once its heartbeat is {self.timeout_s:.0f} s old "
            "(at once when it ran on this machine)."
        )

    def _beat(self) -> None:
        while not self._done.wait(self.heartbeat_s):
            try:
                with self._confirm_lock:
                    self._confirm()
                if self._lost:
                    return
                self.client.set_tag(self.run_id, HEARTBEAT, repr(time.time()))
            except Exception as err:  # a flaky tracking server: the next beat tries again
                log.debug("lease heartbeat failed: %s", err)


class FencedClient:
    """The tracking client a job writes its run with: each of the write calls below first checks the
    job's lease (``Lease.fence``); reads go straight through. Everything else is the MlflowClient's."""

    WRITES = frozenset(
        {
            "log_batch",
            "log_metric",
            "log_param",
            "set_tag",
            "delete_tag",
            "log_text",
            "log_dict",
            "log_artifact",
            "log_artifacts",
            "log_inputs",
            "set_terminated",
            "update_run",
        }
    )

    def __init__(self, client: MlflowClient, lease: Lease):
        self.client, self.lease = client, lease

    def __getattr__(self, name: str):
        attr = getattr(self.client, name)
        if name not in self.WRITES:
            return attr

        def fenced(*args, **kwargs):
            self.lease.fence()
            return attr(*args, **kwargs)

        return fenced
