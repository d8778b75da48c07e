"""A long run's metric history, written fast into a real MLflow SQL store (SQLite or PostgreSQL).

Logging 10^6 steps x 20 metrics through ``log_batch`` (1,000 points a call) would take hours here, so the points
go into the store's own ``metrics`` table in bulk (``executemany`` of 50,000 rows; ``COPY`` on PostgreSQL), and
each metric's last point then goes through ``MlflowClient.log_batch`` so that MLflow itself writes the run's
``latest_metrics`` rows. What MLflow reads afterwards (``get_run``, metric history, the UI's sampled charts) is what
it would read after a week of ``log_batch`` calls.
"""

from __future__ import annotations

import io
import itertools
import math
import time

from mlflow import MlflowClient
from mlflow.entities import Metric

ROWS_PER_STATEMENT = 50_000


def metric_names(count: int, prefix: str | None = None) -> list[str]:
    """``train/loss`` first (the chart a user opens), then ``history/m01`` .. as many as asked; with ``prefix``,
    ``<prefix>00`` .. only (beside a real run's own metrics)."""
    if prefix:
        return [f"{prefix}{k:02d}" for k in range(count)]
    return ["train/loss", *(f"history/m{k:02d}" for k in range(1, count))]


def value(step: int, k: int) -> float:
    """A loss-like curve, different per metric, with some noise a chart sampler cannot flatten."""
    return (1.0 + k) / math.sqrt(step) + 0.01 * ((step * 7919 + k * 104729) % 1000) / 1000


def write_history(
    tracking_uri: str, run_id: str, steps: int, metrics: int, first_step: int = 1, prefix: str | None = None
) -> int:
    """``steps`` steps (from ``first_step``) of ``metrics`` metrics (named by ``metric_names``) into the run; the number
    of points written."""
    from sqlalchemy import create_engine

    engine = create_engine(tracking_uri)
    names = metric_names(metrics, prefix)
    now = int(time.time() * 1000)
    last = first_step + steps - 1
    # every step but the last in bulk; the last goes through log_batch below
    rows = (
        (name, value(step, k), now, run_id, step) for step in range(first_step, last) for k, name in enumerate(names)
    )
    with engine.begin() as conn:
        raw = conn.connection.dbapi_connection
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            buffer = io.StringIO()
            for i, (key, val, ts, run, step) in enumerate(rows, 1):
                buffer.write(f"{key}\t{val!r}\t{ts}\t{run}\t{step}\tf\n")
                if i % ROWS_PER_STATEMENT == 0:
                    _copy(cursor, buffer)
            _copy(cursor, buffer)
        else:
            while batch := list(itertools.islice(rows, ROWS_PER_STATEMENT)):
                cursor.executemany(
                    "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, 0)",
                    batch,
                )
        cursor.close()
    engine.dispose()
    # MLflow's own write of the last point of each metric: it keeps latest_metrics as a week of log_batch would
    MlflowClient(tracking_uri).log_batch(
        run_id, metrics=[Metric(name, value(last, k), now, last) for k, name in enumerate(names)]
    )
    return steps * metrics


def _copy(cursor, buffer: io.StringIO) -> None:
    """The buffered rows into ``metrics`` with COPY: psycopg 3 (what SQLAlchemy picks when installed) or psycopg2."""
    sql = "COPY metrics (key, value, timestamp, run_uuid, step, is_nan) FROM STDIN"
    if hasattr(cursor, "copy_expert"):  # psycopg2
        buffer.seek(0)
        cursor.copy_expert(sql, buffer)
    else:
        with cursor.copy(sql) as copy:
            copy.write(buffer.getvalue())
    buffer.seek(0)
    buffer.truncate()
