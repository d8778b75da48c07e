"""The team server's metric ingest figure (pipeline/bench/scale_ingest.py) at a tiny size: every point the
jobs logged is stored in PostgreSQL and every figure is there (no speed is asserted)."""

import glob

import pytest

pytestmark = pytest.mark.slow  # a team server (PostgreSQL + mlflow server) and one process per job


@pytest.mark.skipif(
    not glob.glob("/usr/lib/postgresql/*/bin"),
    reason="PostgreSQL server binaries not installed (apt-get install postgresql)",
)
def test_metric_ingest_stores_every_point_of_concurrent_jobs():
    from pipeline.bench.scale_ingest import metric_ingest

    figures = {f["name"]: f for f in metric_ingest(jobs_sizes=(1, 2), steps=50, metrics=3)}
    assert set(figures) == {
        "scale/metric_ingest/points_per_s/1_jobs",
        "scale/metric_ingest/points_per_s/2_jobs",
        "scale/metric_ingest/slowest_step_ratio/1_jobs",
        "scale/metric_ingest/slowest_step_ratio/2_jobs",
        "scale/metric_ingest",
    }
    for n in (1, 2):
        ingest = figures[f"scale/metric_ingest/points_per_s/{n}_jobs"]
        assert ingest["stored_points"] == ingest["logged_points"] == n * 50 * 3 and ingest["all_stored"] is True
        assert ingest["value"] > 0 and ingest["wall_s"] > 0 and ingest["unit"] == "points/s"
        ratio = figures[f"scale/metric_ingest/slowest_step_ratio/{n}_jobs"]
        assert ratio["value"] > 0 and ratio["step_s"]["n"] == n
        assert min(ratio["step_s"]["values"]) >= 0.02  # each step slept step_s
    assert figures["scale/metric_ingest/slowest_step_ratio/1_jobs"]["value"] == pytest.approx(1.0, abs=1e-3)
    summary = figures["scale/metric_ingest"]
    assert set(summary["points_per_s"]) == set(summary["slowest_step_ratio"]) == {"1", "2"}
    assert summary["largest_over_smallest"] > 0 and summary["value"] == pytest.approx(
        summary["largest_over_smallest"], abs=1e-3
    )
