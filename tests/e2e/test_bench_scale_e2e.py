"""The cost-growth benchmark (pipeline/bench/scale.py) measured end to end on small sizes."""

import pytest

from pipeline.bench import scale

pytestmark = pytest.mark.slow


@pytest.mark.slow  # a training run and two resumed ones per curve
def test_resume_curves_resume_a_real_run_per_size(store):
    history = {f["name"]: f for f in scale.resume_vs_history("sqlite", sizes=(10, 1000), metrics=2, repeats=1)}
    assert history["scale/resume_vs_history/sqlite/1000"]["value"] > 0
    summary = history["scale/resume_vs_history/sqlite"]
    assert summary["store_mb"]["1000"] > summary["store_mb"]["10"] and set(summary["process_s"]) == {"10", "1000"}
    checkpoints = {f["name"]: f for f in scale.resume_vs_checkpoints(sizes=(3, 8), repeats=1)}
    assert checkpoints["scale/resume_vs_checkpoints"]["largest_over_smallest"] > 0
