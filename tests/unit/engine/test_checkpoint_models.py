"""A checkpoint's logged model and the metrics of its step (engine/logged_models.py): the points are stored once,
already carrying the model's ID; a link asked for too late still links them; a resume tidies what a dead attempt
left PENDING; a checkpoint that is not committed leaves no model behind."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_models
from mlflow import MlflowClient

from pipeline.engine.checkpointing import CheckpointStore, RetentionPolicy
from pipeline.engine.logged_models import CheckpointModels
from pipeline.engine.senders import MetricLogger
from pipeline.engine.tracking import start_or_adopt_run

NAMES = ("train/loss", "lr", "val/loss")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One SQLite store for the module (each test makes its own run)."""
    root = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        yield MlflowClient()


@pytest.fixture
def sent(monkeypatch):
    """Every point handed to ``MlflowClient.log_batch``: (key, step, timestamp, model_id)."""
    points: list[tuple[str, int, int, str | None]] = []
    real = MlflowClient.log_batch
    lock = threading.Lock()

    def recording(self, run_id, metrics=(), *args, **kwargs):
        with lock:
            points.extend((m.key, m.step, m.timestamp, m.model_id) for m in metrics)
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", recording)
    return points


def open_run(client: MlflowClient, name: str, flush_seconds: float = 0.0):
    run_id = start_or_adopt_run(client, experiment="checkpoint-models", run_name=name, tags={"stage": "toy"})
    run = client.get_run(run_id)
    models = CheckpointModels(client, run_id, run.info.experiment_id, name, {}, run.data.tags)
    logger = MetricLogger(client, run_id, flush_seconds=flush_seconds)
    store = CheckpointStore(
        client,
        run_id,
        Path("staging") / name,
        RetentionPolicy(10, 0, "val/loss", "min"),
        on_save=models.link,
        on_commit=models.committed,
        on_delete=models.deleted,
        on_abandon=models.abandoned,
    )
    return run_id, models, logger, store


def save(store: CheckpointStore, logger: MetricLogger, step: int) -> None:
    store.save(
        step,
        {"w": torch.full((4,), float(step))},
        {"step": step, "epoch": 0},
        {"name": f"step-{step:08d}", "step": step, "epoch": 0},
        flush_metrics=logger.flush,
    )


def test_the_points_of_a_checkpoint_step_are_stored_once_already_linked_to_its_model(tracking, sent):
    """Metrics are handed to the sender at every log (flush_seconds=0), yet the step a checkpoint is saved at is still
    buffered when the checkpoint asks for it: its points reach the store once, carrying the model's ID, and no point
    is ever logged twice (which would cost MLflow a duplicate lookup in the run's whole history)."""
    client = tracking
    run_id, models, logger, store = open_run(client, "once")
    for step in range(1, 7):
        logger.log({"train/loss": 1.0 / step, "lr": 0.1 * step}, step)
        if step % 3 == 0:
            logger.log({"val/loss": 2.0 / step}, step)
            save(store, logger, step)
    store.close()
    logger.flush(wait=True)
    logger.close()
    counts = Counter((key, step, ts) for key, step, ts, _ in sent)
    assert max(counts.values()) == 1, [p for p, n in counts.items() if n > 1]
    assert {(key, step) for key, step, _, model_id in sent if model_id} == {
        (key, step) for key in NAMES for step in (3, 6)
    }
    found = checkpoint_models(client, run_id)
    assert sorted(found) == [3, 6]
    for step, model in found.items():
        assert model.status.name == "READY"
        assert {m.key: m.value for m in model.metrics} == {
            "train/loss": 1.0 / step,
            "lr": 0.1 * step,
            "val/loss": 2.0 / step,
        }
    for key in ("train/loss", "lr"):  # the run's charts: one point per step
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_asking_after_its_points_were_stored_still_links_them_at_its_commit(tracking, sent):
    """A flush with ``wait`` between the log and the save (the points are in the store already): the commit logs them
    again with the model's ID, the one path that costs a duplicate lookup, and the charts still hold one value."""
    client = tracking
    run_id, models, logger, store = open_run(client, "late", flush_seconds=3600.0)
    logger.log({"train/loss": 0.5, "lr": 0.2}, 1)
    logger.flush(wait=True)
    save(store, logger, 1)
    store.close()
    logger.close()
    (model,) = checkpoint_models(client, run_id).values()
    assert model.status.name == "READY" and {m.key: m.value for m in model.metrics} == {"train/loss": 0.5, "lr": 0.2}
    assert [(key, model_id is not None) for key, *_, model_id in sent] == [
        ("train/loss", False),
        ("lr", False),
        ("train/loss", True),
        ("lr", True),
    ]
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.5]


def test_a_resume_makes_ready_the_committed_models_left_pending_and_deletes_the_uncommitted_ones(tracking):
    """A job that died after committing step 4 (before marking its model READY) and while saving step 6 (its model
    made, the checkpoint never committed): the resume from step 4 tidies both."""
    client = tracking
    run_id, models, logger, store = open_run(client, "tidy")
    logger.close()
    store.close()
    for step in (2, 4, 6):
        assert models.link(step, {"epoch": 0}).model_id()
    client.finalize_logged_model(checkpoint_models(client, run_id)[2].model_id, "READY")
    assert sorted(checkpoint_models(client, run_id, "PENDING")) == [4, 6]
    models.resumed(committed_step=4)
    found = checkpoint_models(client, run_id)
    assert sorted(found) == [2, 4] and {m.status.name for m in found.values()} == {"READY"}


def test_a_checkpoint_that_is_never_committed_leaves_no_model(tracking):
    """The upload fails for good (here the lease fence refuses it): the model the metric sender made for the step is
    deleted, and the run's metrics are stored all the same."""
    client = tracking
    run_id, models, logger, _ = open_run(client, "abandoned")

    def refused():
        raise RuntimeError("this job may no longer write to the run")

    store = CheckpointStore(
        client,
        run_id,
        Path("staging") / "abandoned",
        RetentionPolicy(10, 0, "val/loss", "min"),
        on_save=models.link,
        on_commit=models.committed,
        on_abandon=models.abandoned,
        fence=refused,
    )
    logger.log({"train/loss": 0.25}, 1)
    save(store, logger, 1)
    with pytest.raises(RuntimeError, match="no longer write"):
        store.close()
    logger.flush(wait=True)
    logger.close()
    assert checkpoint_models(client, run_id) == {}
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.25]
    assert client.get_run(run_id).data.tags.get("checkpoint.latest") is None


def test_points_of_a_step_stay_buffered_until_a_later_step_is_logged(tracking):
    """The newest step waits in the buffer even when the flush interval has passed; the next step sends it."""
    client = tracking
    run_id = start_or_adopt_run(client, experiment="checkpoint-models", run_name="buffer", tags={})
    logger = MetricLogger(client, run_id, flush_seconds=0.0)
    logger.log({"train/loss": 1.0}, 1)
    assert [m.step for m in logger._buffer] == [1]
    logger.log({"train/loss": 0.5}, 2)
    assert [m.step for m in logger._buffer] == [2]
    logger.flush(wait=True)
    logger.close()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
