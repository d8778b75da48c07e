"""Graceful stop requests: SIGINT/SIGTERM/SIGHUP/SIGUSR1 and the run's `stop_requested` tag (docs/architecture.md,
Stopping).

The first request lets the current step finish; the engine then saves a checkpoint and ends the
run as KILLED. A second signal aborts at once. SIGHUP (the terminal or SSH session closed) is a
stop request too, unless the job was started under ``nohup``. A job whose launcher is gone sends
itself SIGTERM (engine/launcher_watch.py). SIGUSR1 (Slurm's ``--signal=USR1@<s>`` before a time limit or a
pre-emption) is the same stop with the reason ``requeue``: the run ends waiting to be requeued and the job exits
EXIT_REQUEUE (docs/distributed.md, Slurm). ``mlflow run`` forwards a Ctrl-C to
its child as a SIGTERM right after the terminal's SIGINT reached it, so a second signal within
``SECOND_SIGNAL_GRACE_S`` of the first counts as the same request, not as an abort.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from mlflow import MlflowClient

from pipeline.engine import tags as tag
from pipeline.engine.launcher_watch import note_stop_requested

log = logging.getLogger(__name__)

SECOND_SIGNAL_GRACE_S = 1.0
STOP_TAG = tag.STOP_REQUESTED
REQUEUE = "requeue"  # the stop reason of SIGUSR1: checkpoint, stop, ask to be requeued


class AbortTraining(BaseException):
    """Raised in the main thread by a second signal: stop now, without a checkpoint."""


class StopController:
    """Signals, and the run's stop tag polled every ``poll_seconds`` (not without a ``client``: torchrun's ranks
    other than 0 leave the tag to rank 0)."""

    def __init__(self, client: MlflowClient | None, run_id: str, poll_seconds: float):
        self.client = client
        self.run_id = run_id
        self.poll_seconds = poll_seconds
        self.reason: str | None = None  # "signal" | "requeue" (SIGUSR1) | "tag" | a hook's reason
        self.abortable = True  # False once training is over and the run is being ended
        self._first_signal_at: float | None = None
        self._previous = {}
        self._done = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="stop-tag-poller", daemon=True)

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def __enter__(self) -> StopController:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started under nohup: the user asked to outlive the terminal
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.client is not None:
            self._poller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def request(self, reason: str) -> None:
        """Ask for a graceful stop from code (e.g. a pruned sweep trial)."""
        if self.reason is None:
            self.reason = reason
            log.warning("Stop requested (%s): stopping after the current step", reason)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        note_stop_requested()
        now = time.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            self.reason = self.reason or (REQUEUE if signum == signal.SIGUSR1 else "signal")
            then = ", then asking to be requeued" if self.reason == REQUEUE else ""
            log.warning(
                "%s received: finishing the current step, then saving a checkpoint%s "
                "(send it again to abort without saving)",
                name,
                then,
            )
        elif not self.abortable:
            log.warning("%s received: the run is being ended, this takes a moment", name)
        elif now - self._first_signal_at > SECOND_SIGNAL_GRACE_S:
            log.error("%s received again: aborting without a checkpoint", name)
            raise AbortTraining(name)

    def _poll(self) -> None:
        while not self._done.wait(self.poll_seconds):
            try:
                tags = self.client.get_run(self.run_id).data.tags
            except Exception as err:  # a flaky tracking server must not kill training
                log.debug("stop-tag poll failed: %s", err)
                continue
            if tags.get(STOP_TAG, "").strip().lower() in ("true", "1", "yes"):
                if self.reason is None:
                    self.reason = "tag"
                    log.warning("Tag %s=true set on the run: stopping after the current step", STOP_TAG)
                return
