"""Riding out an outage of the tracking server or the artifact store (docs/reliability.md, Outages).

MLflow's HTTP client retries a failed request with exponential back-off (by default 7 times, from
2 s up to 120 s apart), so after a 20 s outage a request can sleep half a minute after the server is
back. A training job instead keeps each request short (``configure_http``) and retries what it must
store (metric batches, checkpoint uploads and commits) itself, every ``RETRY_S`` seconds, up to
``tracking.outage_limit_seconds``: it notices within seconds that the store is back, and an outage
longer than the limit stops the job cleanly (StorageError, exit code 4) with its checkpoint staged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_S = 1.0  # pause between two tries of a failed store call
OUTAGE_LIMIT_S = 900.0  # default of tracking.outage_limit_seconds
# One request gives up after about 2.5 s (back-off 0 s, then 2 s, plus up to 0.5 s of jitter); the
# caller tries again. MLflow reads the back-off factor as a whole number of seconds.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}


class StorageError(RuntimeError):
    """A checkpoint or the metrics could not be stored; the job stops cleanly (docs/reliability.md)."""


class NotRetried(RuntimeError):
    """An error that trying again cannot cure (e.g. this job lost its lease on the run): ``retry_until``
    raises it at once instead of retrying until the outage limit."""


def configure_http() -> None:
    """Short HTTP retries for this process, unless the user set MLflow's variables themselves."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def retry_until(call: Callable[[], T], what: str, limit_s: float) -> T:
    """``call()``, tried again every RETRY_S seconds while it fails, for up to ``limit_s`` seconds after the
    first failure; then StorageError naming ``what`` and the last error. The first failure and the
    recovery are logged."""
    first_failure = None
    while True:
        try:
            result = call()
        except NotRetried:
            raise
        except Exception as err:  # the store's own exception types vary (MLflow, boto, requests, OS)
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                log.warning(
                    "%s failed (%s); trying again every %.0f s for up to %.0f s, training goes on",
                    what,
                    first_line(err),
                    RETRY_S,
                    limit_s,
                )
            if now - first_failure >= limit_s:
                raise StorageError(
                    f"{what} failed for {now - first_failure:.0f} s "
                    f"(tracking.outage_limit_seconds={limit_s:g}): {first_line(err)}"
                ) from err
            time.sleep(RETRY_S)
            continue
        if first_failure is not None:
            log.warning("%s succeeded after %.1f s of failures", what, time.monotonic() - first_failure)
        return result


def first_line(err: BaseException) -> str:
    """The first line of an error's message (store errors carry whole response bodies), or its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
