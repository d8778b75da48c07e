"""A config as it is logged, stored in checkpoints, read back, compared and checked at start-up.

Stored configs keep every value as written (an interpolation unresolved, secrets masked: ``to_container``);
``from_container`` reads one back, also one an earlier release stored. ``check_values`` refuses, before a job
writes anything, a setting that does not resolve and a number out of its range.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, InterpolationValidationError

from pipeline.config.compose import ConfigError
from pipeline.config.secrets import redact

# Launch arguments (pipeline/engine/launch.py) that configs stored by earlier releases hold as keys;
# dropped when such a config is read back (a resume of an old checkpoint).
LEGACY_LAUNCH_KEYS = ("resume_run", "resume_step", "adapter_run", "vocoder_run", "checkpoint.resume_from")

# meta.json key: true when the checkpoint's config is stored as written (``to_container``); earlier releases stored
# it resolved, so a checkpoint without the key is read back with ``from_container(..., as_written=False)``.
STORED_AS_WRITTEN = "config_as_written"


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as it is logged (params, ``config/config.yaml``), stored (every checkpoint's meta.json),
    hashed and compared on resume: every value as written, so an interpolation (``${oc.env:VAR}``,
    ``${oc.decode:...}``, any resolver, ``${other.key}``) is kept unresolved, since what it resolves to may be
    a secret (the job itself uses the resolved value; a resume resolves it again), and secrets masked
    (``redact``). ``from_container`` reads it back."""
    return redact(OmegaConf.to_container(cfg, resolve=False))


def from_container(stage_schema: type, data: dict[str, Any], as_written: bool = True) -> DictConfig:
    """Rebuild a typed config from a plain dict (e.g. a checkpoint's stored config): by default one stored as
    written (``to_container``); ``as_written=False`` for a config an earlier release stored resolved, in which a
    ``${`` is literal text. Launch arguments that earlier releases stored as keys are dropped
    (``legacy_launch_values`` reads them)."""
    data = {key: value for key, value in data.items() if key not in LEGACY_LAUNCH_KEYS}
    if isinstance(data.get("checkpoint"), dict):
        data["checkpoint"] = {k: v for k, v in data["checkpoint"].items() if k != "resume_from"}
    cfg = OmegaConf.merge(OmegaConf.structured(stage_schema), data if as_written else _literal_strings(data))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _literal_strings(data: Any) -> Any:
    """A config stored resolved (by an earlier release) as OmegaConf input: a ``${`` in a string is literal
    text there, so it is escaped (with the backslashes before it doubled) instead of read as an interpolation."""
    if isinstance(data, dict):
        return {key: _literal_strings(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_literal_strings(value) for value in data]
    if isinstance(data, str) and "${" in data:
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", data)
    return data


def legacy_launch_values(data: dict[str, Any]) -> dict[str, Any]:
    """The launch arguments a config stored by an earlier release holds (e.g. finetune_vocoder's
    ``adapter_run``), by name; values that were not set are left out."""
    flat = flatten(data)
    return {key: flat[key] for key in LEGACY_LAUNCH_KEYS if flat.get(key) not in (None, "")}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(old: DictConfig, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Changed keys -> (old value, new value)."""
    a, b = flatten(to_container(old)), flatten(to_container(new))
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if not _same(a.get(key), b.get(key))}


def _same(x: Any, y: Any) -> bool:
    """Equal, with NaN equal to NaN (a key set to ``nan`` is unchanged when both configs hold NaN)."""
    both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
    return both_nan or x == y


def config_hash(cfg: DictConfig) -> str:
    data = flatten(to_container(cfg))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Values checked at start-up (session.check_settings, on a fresh start and on resume)

# Numbers whose wrong value fails only later (a crop of no samples, a poll loop that never waits, a lease taken
# over while its job lives) or acts silently. A key the stage's config lacks is skipped; so is an unset value.
POSITIVE_KEYS = (
    "batch_size",
    "checkpoint.save_interval",
    "trainer.log_interval",
    "trainer.max_steps",
    "tracking.metric_interval",
    "trainer.epochs",
    "trainer.max_nonfinite_steps",
    "data.segment_seconds",
    "degradation.packet_ms",
    "light_max_seconds",
    "max_seconds",
    "tracking.outage_limit_seconds",
    "tracking.stop_poll_seconds",
    "tracking.lease_heartbeat_seconds",
    "tracking.lease_timeout_seconds",
)
AT_LEAST_ZERO_KEYS = (
    "checkpoint.keep_last_n",
    "checkpoint.keep_best_k",
    "validation.interval",
    "validation.num_samples",
    "optim.warmup_steps",
    "optim.grad_clip",
    "optim.lr",
    "optim.weight_decay",
    "optim.min_lr_ratio",
    "loss.discriminator_lr",
    "data.val_size",
    "data.num_workers",
    "data.max_clipped_fraction",
    "tracking.flush_seconds",
)


def check_values(schema: type, cfg: DictConfig) -> None:
    """Refuse, naming the key and what to do, a setting whose interpolation does not resolve and a number out
    of its range (``POSITIVE_KEYS``, ``AT_LEAST_ZERO_KEYS``); ``schema`` gives the defaults the message cites."""
    _check_resolves(cfg)
    defaults = OmegaConf.structured(schema)
    for key in POSITIVE_KEYS + AT_LEAST_ZERO_KEYS:
        value = OmegaConf.select(cfg, key)
        positive = key in POSITIVE_KEYS
        if value is not None and (value <= 0 if positive else value < 0):
            default = OmegaConf.select(defaults, key)
            raise ConfigError(
                f"{key}={value} must be {'positive' if positive else 'zero or more'}; pass "
                f"{key}=<a value {'above 0' if positive else 'of 0 or more'}>"
                + (f" (the default is {default})" if default is not None else " or leave it unset")
            )
    heartbeat = OmegaConf.select(cfg, "tracking.lease_heartbeat_seconds")
    timeout = OmegaConf.select(cfg, "tracking.lease_timeout_seconds")
    if heartbeat is not None and timeout is not None and timeout <= heartbeat:
        raise ConfigError(
            f"tracking.lease_timeout_seconds={timeout} must be longer than "
            f"tracking.lease_heartbeat_seconds={heartbeat}: a lease not renewed within the timeout is "
            "taken over, so another job could take the run from this live one between two heartbeats; "
            "raise the timeout or lower the heartbeat"
        )


def _check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves now, not when the job first reads the setting (maybe hours in, or never
    for a setting that is only logged). The message never shows what a setting resolves to: it may be a secret."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        key = err.full_key or "a setting"
        written = flatten(to_container(cfg)).get(key)
        setting = key if written is None else f"{key}={written}"
        reason = (
            "what it resolves to does not fit the setting's type (not shown: it may be a secret)"
            if isinstance(err, InterpolationValidationError)
            else redact(str(err).splitlines()[0])
        )
        raise ConfigError(
            f"{setting} cannot be resolved: {reason}. Set what it refers to (e.g. the environment "
            "variable), or give the value itself"
        ) from err
