"""main: the restoration chain as MLflow Project runs, chained by run IDs, finished steps reused."""

from __future__ import annotations

import os

import pytest
from helpers import all_runs
from mlflow import MlflowClient

from pipeline.config import ConfigError
from pipeline.main import load_main_config, main, step_overrides


def test_overrides_go_to_the_steps_that_have_the_key(store):
    cfg, words = load_main_config(
        ["main.reuse=false", "adapter.bottleneck=8", "pretrain_vocoder.optim.lr=0.01", "trainer.max_steps=7"]
    )
    assert cfg.reuse is False and words == [
        "adapter.bottleneck=8",
        "pretrain_vocoder.optim.lr=0.01",
        "trainer.max_steps=7",
    ]
    out = step_overrides(cfg, words)
    assert "adapter.bottleneck=8" in out["train_adapter"] and "adapter.bottleneck=8" not in out["pretrain_vocoder"]
    assert out["pretrain_vocoder"][-2:] == ["optim.lr=0.01", "trainer.max_steps=7"]
    assert all(o[-1] == "trainer.max_steps=7" for s, o in out.items() if s != "pretrain_vocoder")
    assert "ssl=logmel" in out["pretrain_vocoder"] and "ssl=logmel" not in out["finetune_vocoder"]  # from the runs


def test_presets_give_the_steps_settings_and_an_unknown_one_is_refused():
    quality, _ = load_main_config(["main.preset=quality"])
    assert (
        "vocoder=vocos_tiny" in quality.pretrain_vocoder
        and {"ssl=logmel", "data=voices"} <= set(quality.common)
        and "trainer.max_steps=800" not in quality.train_adapter
    )
    tiny, _ = load_main_config([])
    assert tiny.preset == "tiny" and "trainer.max_steps=800" in tiny.train_adapter
    with pytest.raises(ConfigError, match="main.preset='nope': no such preset; choose one of quality, tiny"):
        load_main_config(["main.preset=nope"])


def test_an_override_no_step_knows_is_refused_before_anything_runs(store, capfd):
    assert main(["trainer.max_stepz=3"]) == 2
    assert "'trainer.max_stepz=3' fits no step of the chain" in capfd.readouterr().err
    assert all_runs(MlflowClient()) == []
    # main in a long-lived process (this test's) leaves its environment as it was: the staging directory of the
    # stages this process runs later stays theirs
    assert "PIPELINE_LAUNCH_DIR" not in os.environ


def test_a_step_is_started_with_the_directory_main_runs_in_and_nothing_stays(store, monkeypatch):
    from pipeline.engine.checkpoint_files import staging_here

    monkeypatch.delenv("PIPELINE_LAUNCH_DIR", raising=False)
    with staging_here():
        assert os.environ["PIPELINE_LAUNCH_DIR"] == str(store)
    assert "PIPELINE_LAUNCH_DIR" not in os.environ
    monkeypatch.setenv("PIPELINE_LAUNCH_DIR", "/outer")  # a main started by another keeps the outer one
    with staging_here():
        assert os.environ["PIPELINE_LAUNCH_DIR"] == "/outer"
    assert os.environ["PIPELINE_LAUNCH_DIR"] == "/outer"


def test_a_known_key_with_a_wrong_value_is_refused_with_the_schemas_reason(store, capfd):
    assert main(["trainer.max_steps=abc"]) == 2
    err = capfd.readouterr().err
    assert "trainer.max_steps=abc" in err and "could not be converted to Integer" in err and "fits no step" not in err
    assert all_runs(MlflowClient()) == []
