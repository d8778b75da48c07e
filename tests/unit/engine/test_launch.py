"""Launch arguments (engine/launch.py): how a job starts, kept apart from what it trains."""

import pytest

from pipeline.config import ConfigError, compose_config, from_container, to_container
from pipeline.engine.launch import parse_launch
from pipeline.engine.resume import stored_inputs
from pipeline.stages.finetune_vocoder import FinetuneVocoderConfig


def test_launch_arguments_are_parsed_apart_from_the_config():
    launch = parse_launch(
        ["checkpoint.resume_from=runs:/x/checkpoints/step-00000010", "optim.lr=2e-4", "adapter_run=a1", "vocoder_run="],
        run_inputs=("adapter_run", "vocoder_run"),
    )
    assert launch.resume_from == "runs:/x/checkpoints/step-00000010" and launch.resuming and launch.explicit_step
    assert launch.inputs == {"adapter_run": "a1"} and launch.overrides == ["optim.lr=2e-4"]
    assert not parse_launch(["resume_run=r"]).explicit_step  # "the latest checkpoint"
    with pytest.raises(ConfigError, match="resume_step='ten' is not a step number"):
        parse_launch(["resume_run=r", "resume_step=ten"])
    with pytest.raises(ConfigError, match="does not build on another run's adapter_run"):
        parse_launch(["adapter_run=a1"])  # train_adapter takes no run inputs


def test_a_config_stored_by_an_earlier_release_drops_its_launch_keys():
    stored = to_container(compose_config("finetune_vocoder", []))
    stored.update(resume_run=None, resume_step=None, adapter_run="a1", vocoder_run="v1")
    stored["checkpoint"]["resume_from"] = None
    cfg = from_container(FinetuneVocoderConfig, stored)
    assert "adapter_run" not in cfg and "resume_from" not in cfg.checkpoint
    assert stored_inputs({"config": stored}) == {"adapter_run": "a1", "vocoder_run": "v1"}
    assert stored_inputs({"config": stored, "inputs": {"adapter_run": "a2"}}) == {"adapter_run": "a2"}
