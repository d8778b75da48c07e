"""Structured configuration: dataclass schemas, Hydra composition, the command-line grammar, stored configs
and secrets. The ground floor above ``pipeline.common``: it imports no other part of the pipeline.

- ``schema``: the shared config groups (``EncoderConfig``, ``DataConfig``, ``TrainConfig``, ...); a training
  stage's own config extends ``TrainConfig`` beside its stage (``pipeline/stages/<stage>.py``);
- ``compose``: ``CONFIG_DIR``, the registry of stage schemas (``@stage_config``), composition and overrides;
- ``command_line``: the one grammar of every entry point (``parse_command_line``, ``parse_key_values``);
- ``stored``: a config as logged, stored in checkpoints and read back; values checked at start-up;
- ``secrets``: what is masked before anything is logged.
"""

from pipeline.config.schema import (
    AdapterConfig,
    CheckpointConfig,
    ConformerConfig,
    DataConfig,
    DegradationConfig,
    EncoderConfig,
    FeatureLossConfig,
    MainConfig,
    OptimConfig,
    PrepareDataConfig,
    TrackingConfig,
    TrainConfig,
    TrainerConfig,
    ValidationConfig,
    VocoderConfig,
    VocoderLossConfig,
)
from pipeline.config.secrets import (
    ENV_PATH_SUFFIXES,
    ENV_SECRET_WORDS,
    MIN_SECRET_LENGTH,
    SECRET_WORDS,
    RedactingFilter,
    environment_secrets,
    mask_secrets,
    redact,
    secret_env_name,
)
from pipeline.config.compose import (
    CONFIG_DIR,
    GLOBAL_GROUPS,
    STAGE_PACKAGE,
    ConfigError,
    GrammarError,
    accepts,
    apply_overrides,
    compose_config,
    group_names,
    register_stage_config,
    route_overrides,
    stage_config,
    stage_schema,
)
from pipeline.config.command_line import CommandLine, parse_command_line, parse_key_values, split_overrides
from pipeline.config.stored import (
    AT_LEAST_ZERO_KEYS,
    LEGACY_LAUNCH_KEYS,
    POSITIVE_KEYS,
    STORED_AS_WRITTEN,
    check_values,
    config_diff,
    config_hash,
    flatten,
    from_container,
    legacy_launch_values,
    to_container,
)

__all__ = [
    "AdapterConfig", "CheckpointConfig", "ConformerConfig", "DataConfig", "DegradationConfig", "EncoderConfig",
    "FeatureLossConfig", "MainConfig", "OptimConfig", "PrepareDataConfig", "TrackingConfig", "TrainConfig",
    "TrainerConfig", "ValidationConfig", "VocoderConfig", "VocoderLossConfig",
    "ENV_PATH_SUFFIXES", "ENV_SECRET_WORDS", "MIN_SECRET_LENGTH", "SECRET_WORDS", "RedactingFilter",
    "environment_secrets", "mask_secrets", "redact", "secret_env_name",
    "CONFIG_DIR", "GLOBAL_GROUPS", "STAGE_PACKAGE", "ConfigError", "GrammarError", "accepts", "apply_overrides", "compose_config",
    "group_names", "register_stage_config", "route_overrides", "stage_config", "stage_schema",
    "CommandLine", "parse_command_line", "parse_key_values", "split_overrides",
    "AT_LEAST_ZERO_KEYS", "LEGACY_LAUNCH_KEYS", "POSITIVE_KEYS", "STORED_AS_WRITTEN", "check_values", "config_diff",
    "config_hash", "flatten", "from_container", "legacy_launch_values", "to_container",
]
