"""The run's tags from a background thread (engine/tracking.py TagWriter), against a real tracking store."""

from mlflow import MlflowClient

from pipeline.engine.tracking import TagWriter


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
    assert writer.flush(timeout=10)
    writer.set({"progress": "Step 3/10"})
    writer.close()
    tags = client.get_run(run_id).data.tags
    assert tags["progress"] == "Step 3/10" and tags["other"] == "x"
    assert calls[0]["progress"] in ("Step 1/10", "Step 2/10") and len(calls) >= 2
    assert calls[-1] == {"progress": "Step 3/10"}
