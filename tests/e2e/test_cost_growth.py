"""The resume path's tracking-store calls do not grow with the run: a resume of a run with a long metric history, many
committed checkpoints and many earlier attempts makes the same calls as a resume of a short one (counted with a
recording client); and what a run returns on every read does not grow with its commits."""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager

import pytest
from helpers import TINY, stage_runs
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline.engine.attempts import ATTEMPTS_SHOWN, attempt_record, write_attempt
from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

# The threads whose calls are the resume's own work: the job's main thread and the checkpoint commit. The others
# run on timers (metric batches every flush_seconds, the lease heartbeat, the stop-tag poll, the tag writer's
# coalesced updates), so their counts follow the wall clock, not the history.
COUNTED_THREADS = ("MainThread", "checkpoint-writer")
QUIET = [
    "tracking.stop_poll_seconds=3600",
    "tracking.checkpoint_models=true",
    "checkpoint.keep_last_n=3",
    "checkpoint.keep_best_k=0",
    "checkpoint.save_interval=2",
    "validation.interval=0",
]


@contextmanager
def recording_client():
    """Every public MlflowClient method counts its calls made on COUNTED_THREADS, by name."""
    counts: Counter = Counter()
    originals = {name: fn for name, fn in vars(MlflowClient).items() if callable(fn) and not name.startswith("_")}

    def counting(name, fn):
        def call(self, *args, **kwargs):
            if threading.current_thread().name.startswith(COUNTED_THREADS):
                counts[name] += 1
            return fn(self, *args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(MlflowClient, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(MlflowClient, name, fn)


def trained_run(max_steps: int, extra_history: int, attempts: int) -> tuple[str, int]:
    """A finished tiny run of ``max_steps`` (a checkpoint every 2 steps, the last 3 kept) whose metric history also
    holds ``extra_history`` points of 20 more metrics before step 1, written through the store, and whose config/ holds
    ``attempts`` attempt records in all (as after that many resumes); its ID and last step."""
    assert run_stage(TrainAdapter, [*TINY, *QUIET, f"trainer.max_steps={max_steps}"]) == EXIT_OK
    run_id = stage_runs(MlflowClient())[-1].info.run_id
    client, now = MlflowClient(), int(time.time() * 1000)
    points = [
        Metric(f"history/m{k}", float(i), now, -extra_history + i) for i in range(extra_history) for k in range(20)
    ]
    for start in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[start : start + 1000])
    for attempt in range(2, attempts + 1):
        write_attempt(
            client,
            run_id,
            attempt_record(attempt, "2026-12-01T00:00:00+00:00", "step-00000002", [], status="KILLED (signal)"),
            {},
        )
    client.set_tag(run_id, "resume.count", str(attempts - 1))
    return run_id, max_steps


def resume_calls(run_id: str, last: int) -> Counter:
    with recording_client() as counts:
        assert run_stage(TrainAdapter, [f"resume_run={run_id}", f"trainer.max_steps={last + 2}"]) == EXIT_OK
    return counts


@pytest.mark.slow  # trains 68 steps with 34 commits
def test_a_resume_makes_the_same_tracking_calls_whatever_the_history_checkpoint_and_attempt_count(store):
    # both resumes commit one checkpoint, and retention deletes the oldest of the 3 kept (with its logged model);
    # both runs have more attempts than a resume reads back, so the description shows the newest ATTEMPTS_SHOWN
    short = resume_calls(*trained_run(max_steps=8, extra_history=10, attempts=ATTEMPTS_SHOWN + 1))
    long_id, long_last = trained_run(max_steps=60, extra_history=2000, attempts=90)  # 30 commits, 40,000 more points
    long = resume_calls(long_id, long_last)
    assert sum(short.values()) > 20 and short["download_artifacts"] >= ATTEMPTS_SHOWN  # the recording saw the resume
    assert long == short, {
        name: (short[name], long[name]) for name in set(short) | set(long) if short[name] != long[name]
    }
    run = MlflowClient().get_run(long_id)
    assert run.data.tags["resume.count"] == "90"  # attempt 91: numbered after every record, read back or not
    note = run.data.tags["mlflow.note.content"]
    assert "Attempts 1-70: `config/attempt-<n>.yaml`" in note and "| 71 |" in note and "| 70 |" not in note
    # a read of the run returns at most the final model as an output, not one per commit (31 commits here)
    assert len(run.outputs.model_outputs) <= 1
