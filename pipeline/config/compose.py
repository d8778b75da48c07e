"""Composing a config: the config directory, the registry of stage schemas, Hydra composition and overrides.

``configs/<stage>.yaml`` starts from its stage's schema (its defaults list names ``<stage>_schema``), registered
with Hydra's ConfigStore by the stage's module (``@stage_config("<stage>")`` on its config dataclass), so a typo
in a YAML file or an override fails at start-up instead of being silently ignored. Presets under ``configs/<group>/``
fill the shared groups (``ssl=tiny``, ``data=demo``, ...; schema.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from pipeline.config.schema import ConformerConfig, DataConfig, EncoderConfig, PrepareDataConfig, VocoderConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# Config groups whose options set keys all over the config (`# @package _global_`), for a fresh start.
GLOBAL_GROUPS = ("recipe",)
# The package whose module ``<stage>`` registers the stage's schema (pipeline/stages/<stage>.py).
STAGE_PACKAGE = "pipeline.stages"


class ConfigError(ValueError):
    """A configuration or override the user has to fix; the message says what and how."""


class GrammarError(ConfigError):
    """Words that are not ``key=value`` at all (unbalanced quotes, no key, a bare word): the command line itself is
    malformed, whatever the entry point. An MLproject command that MLflow filled in must never raise it."""


# --------------------------------------------------------------------------------------------
# Stage schemas
# --------------------------------------------------------------------------------------------

_STAGE_SCHEMAS: dict[str, type] = {}  # stage name -> its top-level config dataclass


def register_stage_config(name: str, schema: type) -> None:
    """Make ``schema`` the config of stage ``name``: ``configs/<name>.yaml`` composes on it (its defaults list
    names ``<name>_schema``). Called by the stage's module when it is imported (``stage_config``)."""
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
    _STAGE_SCHEMAS[name] = schema


def stage_config(name: str) -> Callable[[type], type]:
    """Class decorator of a stage's config dataclass, beside its stage: ``@stage_config("train_adapter")``."""

    def register(schema: type) -> type:
        register_stage_config(name, schema)
        return schema

    return register


def stage_schema(name: str) -> type | None:
    """The config dataclass registered for stage ``name`` (None if there is none). A stage whose module was
    not imported yet is imported by name first (``STAGE_PACKAGE.<name>``), so that anything can compose any
    stage's config; this ground-floor package never imports a stage module otherwise."""
    if name not in _STAGE_SCHEMAS and name.isidentifier():
        module = f"{STAGE_PACKAGE}.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return _STAGE_SCHEMAS.get(name)


def _register_shared() -> None:
    """The shared groups' schemas (a preset under configs/<group>/ may start from them) and prepare_data's."""
    cs = ConfigStore.instance()
    register_stage_config("prepare_data", PrepareDataConfig)
    cs.store(group="vocoder", name="schema", node=VocoderConfig)
    cs.store(group="asr", name="schema", node=ConformerConfig)
    cs.store(group="ssl", name="schema", node=EncoderConfig)
    cs.store(group="data", name="schema", node=DataConfig)


_register_shared()

# --------------------------------------------------------------------------------------------
# Composition and overrides
# --------------------------------------------------------------------------------------------


def _parse(overrides: list[str]):
    hint = "Use key=value, e.g. trainer.max_steps=100"
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra raises OverrideParseException with a useful text
        word = getattr(err, "override", None)
        raise GrammarError(
            f"Malformed override {word!r}: {err}. {hint}"
            if word
            else f"Malformed override in {' '.join(map(repr, overrides))}: {err}. {hint}"
        ) from err
    for override in parsed:
        if not override.key_or_group:
            raise GrammarError(f"Malformed override {override.input_line!r}: no key. {hint}")
    return parsed


def compose_config(stage: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<stage>.yaml`` with Hydra overrides; errors become ConfigError. Adding keys
    (``+key=v``, ``++key=v``) works only under free-form dict fields (``+tracking.tags.team=asr``):
    the schema's own sections keep exactly their fields, and no key is ever deleted (``~key``)."""
    parsed = _parse(overrides)  # clear message for syntax errors before Hydra's own
    for override in parsed:
        if override.is_delete():
            raise ConfigError(
                f"Override {override.input_line!r}: deleting keys is not supported; set the key's value instead"
            )
    stage_schema(stage)  # the stage's module registers its schema
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=stage, overrides=overrides)
    except Exception as err:
        cause = str(err.__cause__).splitlines()[0] if err.__cause__ is not None else ""  # e.g. not an Integer
        raise ConfigError(f"Invalid configuration override: {err}" + (f" ({cause})" if cause else "")) from err
    finally:
        GlobalHydra.instance().clear()
    for override in parsed:
        if override.is_add() or override.is_force_add():
            parent_key = override.key_or_group.rpartition(".")[0]
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if isinstance(parent, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(parent)):
                raise ConfigError(
                    f"Override {override.input_line!r}: {parent_key or 'the config'} has a fixed set of "
                    "keys; set an existing key (without '+'), or add under a dict field such as "
                    "+tracking.tags.<name>=<value>"
                )
    OmegaConf.set_struct(cfg, True)
    return cfg


def accepts(stage: str, word: str) -> bool:
    """Whether ``stage``'s config takes the override ``word``."""
    try:
        compose_config(stage, [word])
    except ConfigError:
        return False
    return True


def route_overrides(words: list[str], stages: tuple[str, ...], what: str) -> dict[str, list[str]]:
    """Overrides for jobs of several stages at once (``main``, ``import_checkpoint``): ``<stage>.key=v``
    goes to that stage only, a plain ``key=v`` to every stage whose config has the key; a word that
    fits none is refused (``what`` names the jobs in the message)."""
    out: dict[str, list[str]] = {stage: [] for stage in stages}
    for word in words:
        stage, _, rest = word.partition(".")
        if stage in stages and rest:
            out[stage].append(rest)
            continue
        targets = [s for s in stages if accepts(s, word)]
        if not targets:
            for stage in stages:  # a key some stage has, with a value it refuses: say what is wrong with it
                if _has_key(stage, word):
                    compose_config(stage, [word])  # raises the schema's message, naming the key and value
            raise ConfigError(
                f"Override {word!r} fits no {what} ({', '.join(stages)}); "
                "check the key, or give it to one of them as <stage>.key=value"
            )
        for target in targets:
            out[target].append(word)
    return out


def _has_key(stage: str, word: str) -> bool:
    """Whether ``stage``'s default config has the key (or group) that the override ``word`` sets."""
    key = _parse([word])[0].key_or_group
    return key in group_names() or OmegaConf.select(compose_config(stage, []), key, default=None) is not None


def group_names() -> set[str]:
    """Config groups (sub-directories of configs/) that can be chosen with group=option."""
    return {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}


def apply_overrides(stage: str, base: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply Hydra overrides on top of an existing config (the checkpoint's, on resume).

    ``key=value`` sets a value (type-checked by the schema); ``group=option`` replaces that whole
    node with the option's preset, composed exactly as a fresh start would.
    """
    cfg = base.copy()
    OmegaConf.set_struct(cfg, True)
    groups = group_names()
    for override in _parse(overrides):
        key = override.key_or_group
        if override.is_delete() or override.is_add() or override.is_force_add():
            raise ConfigError(
                f"Override {override.input_line!r}: adding or deleting keys is not "
                "supported on resume; set the key's value instead"
            )
        if key in GLOBAL_GROUPS:
            raise ConfigError(
                f"Override {override.input_line!r}: a {key} sets many keys at once and is chosen on a "
                "fresh start; on resume the checkpoint's values are the base, so set the keys you "
                "want to change one by one (e.g. optim.lr=2e-4)"
            )
        if key in groups:
            fresh = compose_config(stage, [override.input_line])
            cfg[key] = fresh[key]
            continue
        try:
            OmegaConf.update(cfg, key, override.value(), merge=True)
        except Exception as err:
            raise ConfigError(f"Invalid override {override.input_line!r}: {err}") from err
    return cfg
