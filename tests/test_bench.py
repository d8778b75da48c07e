"""The benchmark command's figures are produced and well-formed (tiny sizes; no speed is asserted)."""

import pytest

from pipeline.bench import jobs, training


def test_engine_figures_measure_both_sides(store):
    overhead = training.tracking_overhead(
        "train_adapter",
        ["ssl=tiny", "batch_size=4", "data.segment_seconds=0.5"],
        steps=12,
        save_every=6,
        pairs=1,
        warmup=2,
        label="test",
    )
    assert overhead["name"] == "tracking_overhead/test" and overhead["target"] == "<= 1.03"
    engine, bare = overhead["engine_step_s"]["median"], overhead["bare_step_s"]["median"]
    assert engine > 0 and bare > 0 and abs(overhead["value"] / (engine / bare) - 1) < 0.01  # medians are rounded

    stall = training.checkpoint_stall(["ssl=tiny", "batch_size=4", "data.segment_seconds=0.5"], pairs=1, label="test")
    assert 0.5 < stall["state_mb"] < 1.5  # the tiny preset's state.pt
    assert stall["blocked_s"]["n"] == stall["synchronous_s"]["n"] == 1

    metrics = training.metric_throughput(steps=50, per_step=3)
    assert metrics["stored_check"] is True and metrics["value"] > 0


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


def test_the_peak_memory_figure_sums_a_process_family_by_kind():
    """The machinery of clean_corpus/peak_memory (its job is measured by the benchmark, not here)."""
    import subprocess
    import sys

    import psutil

    from pipeline.bench import cleaning_memory

    family = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"]
    )
    try:
        root = psutil.Process(family.pid)
        while not root.children():
            pass
        pss, rss, kinds, processes = cleaning_memory.memory_sample(root)
        assert processes == 2 and set(kinds) == {"driver", "sleep"}
        assert 0 < pss <= rss and abs(sum(kinds.values()) - pss) < 1e-6
    finally:
        for child in psutil.Process(family.pid).children():
            child.kill()
        family.kill()
        family.wait()
    peak = cleaning_memory.Peak(pss_mb=2600.0, rss_mb=4100.0, processes=15, by_process=kinds, samples=10, wall_s=90.0)
    tiny = cleaning_memory.memory_figure("tiny", peak, target=True, cpus=2)
    assert tiny["name"] == "clean_corpus/peak_memory/tiny" and tiny["met"] is False and tiny["target"] == "≤ 2 GiB"
    assert "met" not in cleaning_memory.memory_figure("hubert", peak, target=False, cpus=2)


def test_every_planned_figure_binds_its_arguments_to_its_function():
    """The presets' plans are tables (pipeline/bench/__main__.py): each row's arguments are ones its function
    takes, and no name is planned twice (``--figure NAME`` picks a row by it)."""
    import inspect

    from pipeline.bench.__main__ import PLANS, plan

    assert set(PLANS) == {"cpu", "gpu"}
    for preset, rows in PLANS.items():
        names = [name for name, *_ in rows]
        assert len(names) == len(set(names)), preset
        for name, measure, args, kwargs in rows:
            try:
                inspect.signature(measure).bind(*args, **kwargs)
            except TypeError as error:
                pytest.fail(f"{preset} plan, {name}: {error}")
        assert [name for name, _ in plan(preset)] == names
