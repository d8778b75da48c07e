"""The benchmark command's figures are produced and well-formed (tiny sizes; no speed is asserted)."""

import pytest

from pipeline.bench import training


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


def test_the_ceiling_figure_scores_copy_synthesis_of_a_trained_vocoder():
    """Three mel-only steps on log-mel features, scored by evaluate on one held-out file (values not judged)."""
    from pipeline.bench import ceiling

    scores = ceiling.copy_synthesis(["ssl=logmel"], ["vocoder=vocos_tiny"], steps=3, test_size=1)
    assert 0.0 <= scores["stoi"] <= 1.0 and 1.0 <= scores["pesq_wb"] <= 4.7 and scores["train_s"] > 0
