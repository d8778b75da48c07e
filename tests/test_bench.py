"""The benchmark command's figures are produced and well-formed (tiny sizes; no speed is asserted)."""

from pipeline.bench import training


def test_engine_figures_measure_both_sides(store):
    overhead = training.tracking_overhead("train_adapter", ["ssl=tiny", "batch_size=4", "data.segment_seconds=0.5"],
                                          steps=12, save_every=6, pairs=1, warmup=2, label="test")
    assert overhead["name"] == "tracking_overhead/test" and overhead["target"] == "<= 1.03"
    engine, bare = overhead["engine_step_s"]["median"], overhead["bare_step_s"]["median"]
    assert engine > 0 and bare > 0 and abs(overhead["value"] / (engine / bare) - 1) < 0.01  # medians are rounded

    stall = training.checkpoint_stall(["ssl=tiny", "batch_size=4", "data.segment_seconds=0.5"], pairs=1, label="test")
    assert 0.5 < stall["state_mb"] < 1.5  # the tiny preset's state.pt
    assert stall["blocked_s"]["n"] == stall["synchronous_s"]["n"] == 1

    metrics = training.metric_throughput(steps=50, per_step=3)
    assert metrics["stored_check"] is True and metrics["value"] > 0
