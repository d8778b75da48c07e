"""The run's tags and metrics from background threads (engine/senders.py), its description and links into the UI
(engine/tracking.py), against a real tracking store."""

import json
import re

from mlflow import MlflowClient

from pipeline.engine.senders import TagWriter
from pipeline.engine.tracking import (
    RUNS_VIEW_TAG,
    dashboard_hint,
    default_run_name,
    describe_run,
    ensure_runs_view,
    ui_url,
)


def test_tags_are_stored_in_the_background_newest_value_wins_and_a_failed_send_is_retried(store):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("tags")).info.run_id
    calls = []

    class FlakyClient:  # the first send fails as a tracking-server outage would
        def log_batch(self, run_id, tags):
            calls.append({t.key: t.value for t in tags})
            if len(calls) == 1:
                raise ConnectionError("tracking server unreachable")
            client.log_batch(run_id, tags=tags)

    writer = TagWriter(FlakyClient(), run_id, retry_seconds=0.05)
    writer.set({"progress": "Step 1/10"})
    writer.set({"progress": "Step 2/10", "other": "x"})
    assert writer.flush(timeout=60)
    writer.set({"progress": "Step 3/10"})
    writer.close()
    tags = client.get_run(run_id).data.tags
    assert tags["progress"] == "Step 3/10" and tags["other"] == "x"
    assert calls[0]["progress"] in ("Step 1/10", "Step 2/10") and len(calls) >= 2
    assert calls[-1] == {"progress": "Step 3/10"}


def test_links_open_the_model_training_pages_in_the_pipelines_view_and_never_carry_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret-pw@mlflow.example.org:8443/")
    base = "https://mlflow.example.org:8443/#/experiments/7"
    assert ui_url("7") == f"{base}/runs?workflowType=machine_learning&viewStateShareKey=speech-pipeline-runs"
    assert ui_url("7", "abc") == f"{base}/runs/abc?workflowType=machine_learning"
    assert (
        ui_url("7", "abc", page="artifactPath/x.csv")
        == f"{base}/runs/abc/artifactPath/x.csv?workflowType=machine_learning"
    )
    assert ui_url("7", page="models") == f"{base}/models?workflowType=machine_learning"
    assert dashboard_hint("7", "abc") == f"{base}/runs/abc?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x/mlflow.db")
    # within whatever serves the UI
    assert ui_url("7", "abc") == "/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert dashboard_hint("7") == (
        "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db, then open http://127.0.0.1:5000"
        "/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=speech-pipeline-runs"
    )


def test_the_runs_view_is_stored_once_in_the_experiment_and_names_columns_the_ui_knows(store):
    client = MlflowClient()
    experiment = client.create_experiment("view")
    ensure_runs_view(client, experiment)
    stored = client.get_experiment(experiment).tags[RUNS_VIEW_TAG]
    view = json.loads(stored)
    assert view["selectedColumns"][0] == "tags.`progress`" and "metrics.`val/loss`" in view["selectedColumns"]
    assert all(re.fullmatch(r"(tags|metrics|params|attributes)\.`[^`]+`", c) for c in view["selectedColumns"])
    client.set_experiment_tag(experiment, RUNS_VIEW_TAG, "{}")  # an older view is replaced
    ensure_runs_view(client, experiment)
    assert client.get_experiment(experiment).tags[RUNS_VIEW_TAG] == stored
    ensure_runs_view(client, "999")  # an experiment that is not there: a warning, never an error


def test_the_description_starts_with_status_progress_checkpoint_and_the_resume_command(store):
    text = describe_run(
        stage="train_adapter",
        run_id="r1",
        progress="step 40/100 · epoch 2",
        status="RUNNING",
        latest_checkpoint="checkpoints/step-00000040",
        experiment_id="3",
        history=[{"attempt": 1, "started": "2026-11-27T10:00:00Z", "overrides": ["token=abc"]}],
    )
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == "**RUNNING** · step 40/100 · epoch 2 · latest checkpoint `checkpoints/step-00000040`"
    assert paragraphs[1] == "Resume: `mlflow run . -e train_adapter --env-manager local -P resume_run=r1`"
    assert "(/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=speech-pipeline-runs)" in text
    assert "(/#/experiments/3/models?workflowType=machine_learning)" in text
    assert "| 1 | 2026-11-27T10:00:00Z | fresh | `token=***` |" in text


def test_default_run_names_differ_at_the_front():
    assert default_run_name("3fa9c1d2e4", "tiny", "demo") == "3fa9c1-tiny-demo"


def test_a_store_slower_than_the_job_is_reported_and_bounds_the_metrics_held_in_memory(store, monkeypatch, caplog):
    """A store that takes a batch only when allowed (a saturated team server): past the warning threshold the job
    says what to change; at the limit the training thread waits for the store; every point is stored in order."""
    import threading

    from pipeline.engine import senders

    monkeypatch.setattr(senders, "BACKLOG_WARN_BATCHES", 3)
    monkeypatch.setattr(senders, "BACKLOG_MAX_BATCHES", 6)
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("backlog")).info.run_id
    allowed = threading.Semaphore(0)

    class SlowClient:
        def log_batch(self, run_id, metrics):
            allowed.acquire()
            client.log_batch(run_id, metrics=metrics)

    metrics = senders.MetricLogger(SlowClient(), run_id, flush_seconds=3600)
    for step in range(1, 6):  # five batches handed over, none stored yet
        metrics.log({"train/loss": float(step)}, step)
        metrics.flush()
    assert "3 batches of metrics (up to 3000 values) are waiting to be stored" in caplog.text
    assert "tracking.metric_interval" in caplog.text
    blocked = threading.Thread(target=lambda: (metrics.log({"train/loss": 6.0}, 6), metrics.flush()))
    blocked.start()
    blocked.join(timeout=1.0)
    assert blocked.is_alive()  # the sixth batch is the limit: its step waits until the store catches up
    for _ in range(6):
        allowed.release()
    blocked.join(timeout=60)
    assert not blocked.is_alive()
    metrics.flush(wait=True)
    metrics.close()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (s, float(s)) for s in range(1, 7)
    ]
