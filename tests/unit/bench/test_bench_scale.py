"""The cost-growth curves of pipeline/bench/scale.py at tiny sizes: each measures what it says, in a real store
(the figures' values are not judged here; docs/benchmarks.md holds them)."""

import glob
import json

import pytest
from mlflow import MlflowClient

from pipeline.bench import scale
from pipeline.bench.history import metric_names, write_history


def test_history_is_written_into_the_store_with_the_latest_values_mlflow_keeps(store):
    uri = f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("history")).info.run_id
    assert write_history(uri, run_id, steps=300, metrics=3) == 900
    run = client.get_run(run_id)
    assert set(run.data.metrics) == set(metric_names(3)) == {"train/loss", "history/m01", "history/m02"}
    history = client.get_metric_history(run_id, "history/m02")
    assert [m.step for m in history] == list(range(1, 301)) and len({m.value for m in history}) > 100
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")][-1] == 300  # latest through log_batch


@pytest.mark.skipif(
    not glob.glob("/usr/lib/postgresql/*/bin"),
    reason="PostgreSQL server binaries not installed (apt-get install postgresql)",
)
def test_history_goes_into_postgresql_with_copy(store):
    with scale.store("postgresql") as uri:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("history")).info.run_id
        assert write_history(uri, run_id, steps=2000, metrics=2, prefix="history/m") == 4000
        assert sorted(client.get_run(run_id).data.metrics) == ["history/m00", "history/m01"]
        assert [m.step for m in client.get_metric_history(run_id, "history/m01")] == list(range(1, 2001))


def test_commit_curve_times_real_commits_after_each_size(store):
    figures = scale.commit_vs_checkpoints(sizes=(2, 6), window=3)
    by_name = {f["name"]: f for f in figures}
    assert set(by_name) == {
        "scale/commit_vs_checkpoints/2",
        "scale/commit_vs_checkpoints/6",
        "scale/commit_vs_checkpoints",
    }
    assert by_name["scale/commit_vs_checkpoints/6"]["spread"]["n"] == 3
    summary = by_name["scale/commit_vs_checkpoints"]
    assert summary["largest_over_smallest"] > 0 and set(summary["medians"]) == {"2", "6"}


def test_commit_vs_history_times_linked_commits_and_the_relinked_ones_and_plots_both(store, tmp_path):
    from pipeline.bench import plot

    figures = scale.commit_vs_history("sqlite", sizes=(5, 50), metrics=3, window=2, relinked=1)
    by_name = {f["name"]: f for f in figures}
    assert set(by_name) == {
        "scale/commit_vs_history/sqlite/5",
        "scale/commit_vs_history/sqlite/50",
        "scale/commit_vs_history/sqlite",
    }
    summary = by_name["scale/commit_vs_history/sqlite"]
    assert by_name["scale/commit_vs_history/sqlite/50"]["spread"]["n"] == 2 and set(summary["medians"]) == {"5", "50"}
    assert {size: late["n"] for size, late in summary["relinked_s"].items()} == {"5": 1, "50": 1}
    found = plot.curves([json.dumps(f) for f in figures])
    assert found["scale/commit_vs_history/sqlite"][0] == [5.0, 50.0]
    assert found["scale/commit_vs_history/sqlite (compared)"][1] == [
        summary["relinked_s"]["5"]["median"],
        summary["relinked_s"]["50"]["median"],
    ]
    plot.plot(found, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
