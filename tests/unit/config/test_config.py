"""Config composition, strict schemas and override handling."""

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from pipeline.config import (
    CONFIG_DIR,
    ConfigError,
    apply_overrides,
    compose_config,
    config_diff,
    from_container,
    mask_secrets,
    split_overrides,
    to_container,
)
from pipeline.engine.launch import LaunchArgs, parse_launch
from pipeline.stages.train_adapter import TrainAdapterConfig

SSL_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "ssl").glob("*.yaml"))
DATA_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


def test_presets_named_in_the_issue_exist():
    assert {"tiny", "hubert_base", "hubert_large", "mhubert_147", "wavlm_base_plus"} <= set(SSL_PRESETS)


@pytest.mark.parametrize("ssl", SSL_PRESETS)
def test_every_encoder_preset_composes(ssl):
    cfg = compose_config("train_adapter", [f"ssl={ssl}"])
    assert cfg.ssl.name == ssl
    assert 1 <= cfg.ssl.layer <= cfg.ssl.num_layers


@pytest.mark.parametrize("data", DATA_PRESETS)
def test_every_data_preset_composes(data):
    cfg = compose_config("train_adapter", [f"data={data}", "data.root=/somewhere"])
    assert cfg.data.name == data


def test_default_config_values():
    cfg = compose_config("train_adapter", [])
    assert cfg.stage == "train_adapter"
    assert cfg.ssl.name == "mhubert_147" and cfg.ssl.layer == 6
    assert "resume_run" not in cfg and "resume_step" not in cfg  # launch arguments, not config


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_stepz=3", "max_stepz"),
        ("trainer.max_steps=lots", "max_steps"),
        ("ssl=no_such_encoder", "no_such_encoder"),
        ("trainer.max_steps=[1,", "Malformed override"),
        ("=3", "Malformed override"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config("train_adapter", [override])


def test_mlflow_quoted_overrides_are_split_and_empty_control_keys_dropped():
    words = ["resume_run=", "resume_step=", "ssl=tiny trainer.max_steps=5 tracking.run_name='my run'"]
    launch = parse_launch(words)
    assert launch.overrides == ["ssl=tiny", "trainer.max_steps=5", "tracking.run_name=my run"]
    assert launch == LaunchArgs(overrides=launch.overrides)  # the empty launch words mean "not given"
    with pytest.raises(ConfigError, match="Malformed"):
        split_overrides(["a='unterminated"])


def test_overrides_apply_on_top_of_a_stored_config():
    stored = to_container(compose_config("train_adapter", ["ssl=tiny", "batch_size=16"]))
    base = from_container(TrainAdapterConfig, stored)
    cfg = apply_overrides("train_adapter", base, ["batch_size=32", "trainer.max_steps=7"])
    assert cfg.batch_size == 32 and cfg.trainer.max_steps == 7
    assert cfg.ssl.name == "tiny"  # not reset to the default preset
    assert config_diff(base, cfg) == {"batch_size": (16, 32), "trainer.max_steps": (2000, 7)}
    swapped = apply_overrides("train_adapter", base, ["ssl=hubert_base"])
    assert swapped.ssl.embed_dim == 768
    with pytest.raises(ConfigError, match="batch_sise"):
        apply_overrides("train_adapter", base, ["batch_sise=3"])


def test_control_keys_are_not_config_changes():
    base = compose_config("train_adapter", [])
    launch = parse_launch(["resume_run=abc", "resume_step=5"])
    assert (launch.resume_run, launch.resume_step, launch.explicit_step) == ("abc", 5, True)
    cfg = apply_overrides("train_adapter", base, launch.overrides)
    assert config_diff(base, cfg) == {}


def test_secrets_are_masked():
    masked = mask_secrets({"tracking.password": "hunter2", "db": "postgresql://user:pw@host/db", "optim.lr": 1})
    assert masked == {"tracking.password": "***", "db": "postgresql://***@host/db", "optim.lr": 1}


def test_typed_schema_rejects_unknown_keys_in_stored_config():
    stored = to_container(compose_config("train_adapter", []))
    stored["unknown"] = 1
    with pytest.raises(ConfigKeyError, match="unknown"):
        from_container(TrainAdapterConfig, stored)
    assert OmegaConf.is_config(from_container(TrainAdapterConfig, to_container(compose_config("train_adapter", []))))
