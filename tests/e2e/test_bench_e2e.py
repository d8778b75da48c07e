"""The benchmarks that start jobs and Ray (pipeline/bench/): each figure measured on the tiny presets."""

import pytest

from pipeline.bench import jobs

pytestmark = pytest.mark.slow


@pytest.mark.slow  # two training processes
def test_stop_latency_measures_a_signal_and_the_stop_tag_each_ending_the_run_killed(store):
    """The stop times the tests no longer assert (a loaded machine fails a wall-clock limit) are measured here."""
    figures = jobs.stop_latency(["ssl=tiny", "batch_size=4", "data.segment_seconds=0.5"], repeats=1)
    assert [f["name"] for f in figures] == ["stop_latency/signal", "stop_latency/tag"]
    for fig in figures:  # _stop_once raised unless the run ended KILLED with a checkpoint
        assert fig["seconds"]["n"] == 1 and fig["value"] > 0 and fig["unit"] == "s"


@pytest.mark.slow  # starts a local Ray for the cleaning job
def test_cleaning_figures_measure_the_job_and_the_bare_forward_pass(store):
    from pipeline.bench import cleaning

    throughput, bare = cleaning.cleaning_figures(
        "test", ["ssl=tiny"], "tiny", files=4, files_per_batch=2, scaling=False, memory=False
    )  # memory: the test below
    assert throughput["name"] == "clean_corpus/audio_s_per_s/test"
    assert bare["name"] == "clean_corpus/vs_bare_forward/test"
    job = throughput["job"]
    assert abs(job["audio_s"] - throughput["audio_s"]) < 0.1 and job["commits"] >= 2  # every file restored
    assert abs(sum(job["phases_s"].values()) - job["wall_s"]) < 0.1
    assert throughput["end_to_end"] > 0 and throughput["restore"] > 0 and throughput["restore_loop"] > 0
    assert bare["target"] == "≥ 0.85" and bare["met"] == (bare["value"] >= 0.85)
    assert abs(bare["value"] * bare["bare_audio_s_per_s"] / bare["job_steady_audio_s_per_s"] - 1) < 0.01
