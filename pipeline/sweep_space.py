"""What a sweep searches: its spec (``configs/sweep/<stage>.yaml``), the search space, the checks made before
any trial runs, and the Optuna study in its storage (pipeline/sweep.py runs the trials)."""

from __future__ import annotations

import ast
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from pipeline.config import CONFIG_DIR, ConfigError, apply_overrides, compose_config, mask_secrets
from pipeline.engine.launch import parse_launch
from pipeline.engine.stage import Stage
from pipeline.stages import TRAINING_STAGES
from pipeline.stages import stage_class as registered_stage

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat retry callback


@dataclass
class SweepSpec:
    """configs/sweep/<stage>.yaml"""

    metric: str = "val/loss"  # the stage's validation metric to optimise
    direction: str = "minimize"  # minimize | maximize
    space: dict[str, str] = field(default_factory=dict)  # config key -> distribution, e.g. loguniform(1e-5, 1e-3)
    pruner: str = "median"  # median | successive_halving | none
    pruner_startup_trials: int = 2  # median: trials to finish before pruning starts
    pruner_warmup_steps: int = 0  # median: steps before a trial can be pruned
    min_resource: int = 1  # successive_halving: steps before the first rung
    reduction_factor: int = 3  # successive_halving
    sampler_seed: int | None = None  # TPE seed (leave null with several workers)
    heartbeat_seconds: int = 30  # a trial whose worker is silent for 4x this is a crash, and is retried
    max_retries: int = 3  # how often one interrupted trial is resumed


DISTRIBUTIONS = {
    "uniform": lambda lo, hi: optuna.distributions.FloatDistribution(lo, hi),
    "loguniform": lambda lo, hi: optuna.distributions.FloatDistribution(lo, hi, log=True),
    "int": lambda lo, hi: optuna.distributions.IntDistribution(lo, hi),
    "logint": lambda lo, hi: optuna.distributions.IntDistribution(lo, hi, log=True),
}


def parse_distribution(key: str, text: str) -> optuna.distributions.BaseDistribution:
    """``loguniform(1e-5, 1e-3)``, ``uniform(a, b)``, ``int(a, b)``, ``logint(a, b)``, ``choice(x, y, ...)``."""
    match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", str(text))
    hint = f"use one of {', '.join(sorted([*DISTRIBUTIONS, 'choice']))}, e.g. loguniform(1e-5, 1e-3)"
    if not match:
        raise ConfigError(f"Malformed distribution for {key}: {text!r}; {hint}")
    name, args_text = match.groups()
    try:
        args = ast.literal_eval(f"[{args_text}]")
    except (ValueError, SyntaxError) as err:
        raise ConfigError(f"Malformed distribution for {key}: {text!r} ({err}); {hint}") from err
    if name == "choice":
        if not args:
            raise ConfigError(f"Malformed distribution for {key}: choice() needs at least one value")
        return optuna.distributions.CategoricalDistribution(args)
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"Unknown distribution {name!r} for {key}; {hint}")
    if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
        raise ConfigError(f"Malformed distribution for {key}: {text!r} needs two numbers low < high")
    if name in ("int", "logint") and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"Malformed distribution for {key}: {text!r} needs integer bounds")
    try:
        return DISTRIBUTIONS[name](*args)
    except ValueError as err:  # e.g. log scale with low <= 0
        raise ConfigError(f"Malformed distribution for {key}: {text!r} ({err})") from err


def suggest(trial: optuna.Trial, key: str, dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)


def override_value(value: Any) -> str:
    """A sampled value as a Hydra override value."""
    return json.dumps(value) if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def stage_class(name: str) -> type[Stage]:
    """The registered training stage ``name`` (pipeline.stages.TRAINING_STAGES)."""
    if name not in TRAINING_STAGES:
        raise ConfigError(f"Unknown stage {name!r}; stages that can be swept: {', '.join(sorted(TRAINING_STAGES))}")
    return registered_stage(name)


def load_spec(stage: str, overrides: list[str]) -> SweepSpec:
    """The stage's sweep file with ``key=value`` overrides; ``space.<config key>=<distribution>``
    adds or replaces one parameter and ``space.<config key>=none`` removes it."""
    path = CONFIG_DIR / "sweep" / f"{stage}.yaml"
    if not path.is_file():
        raise ConfigError(f"No search space for stage {stage!r}: create {path.relative_to(CONFIG_DIR.parent)}")
    spec = OmegaConf.merge(OmegaConf.structured(SweepSpec), OmegaConf.load(path))
    space_changes = [o for o in overrides if o.startswith("space.")]
    try:
        spec = OmegaConf.merge(spec, OmegaConf.from_dotlist([o for o in overrides if o not in space_changes]))
    except Exception as err:
        raise ConfigError(f"Invalid sweep override: {err}") from err
    spec = OmegaConf.to_object(spec)
    for change in space_changes:
        key, _, value = change[len("space.") :].partition("=")
        if value.strip().lower() in ("none", "null", ""):
            spec.space.pop(key, None)
        else:
            spec.space[key] = value
    return spec


def validate(stage_cls: type[Stage], spec: SweepSpec, stage_overrides: list[str]) -> dict[str, Any]:
    """Every mistake that would waste a trial, caught now: returns the parsed search space."""
    base = compose_config(stage_cls.name, parse_launch(stage_overrides, stage_cls.run_inputs).overrides)
    if not spec.space:
        raise ConfigError(f"The search space in configs/sweep/{stage_cls.name}.yaml is empty")
    space = {}
    for key, text in spec.space.items():
        if OmegaConf.select(base, key, default="__missing__") == "__missing__":
            raise ConfigError(f"Sweep parameter {key!r} is not a key of the {stage_cls.name} config")
        space[key] = dist = parse_distribution(key, text)
        probes = (
            dist.choices if isinstance(dist, optuna.distributions.CategoricalDistribution) else (dist.low, dist.high)
        )
        for probe in probes:  # the schema type-checks every value the sampler may propose
            apply_overrides(stage_cls.name, base, [f"{key}={override_value(probe)}"])
    if spec.metric not in stage_cls.val_metric_names:
        raise ConfigError(
            f"Objective metric {spec.metric!r} is never logged by {stage_cls.name}; "
            f"it logs {', '.join(stage_cls.val_metric_names)}"
        )
    if base.validation.interval <= 0:
        raise ConfigError(
            f"validation.interval={base.validation.interval}: the objective {spec.metric} would never "
            "be logged; set validation.interval > 0"
        )
    if spec.direction not in ("minimize", "maximize"):
        raise ConfigError(f"sweep.direction must be minimize or maximize, not {spec.direction!r}")
    if spec.pruner not in ("median", "successive_halving", "none"):
        raise ConfigError(f"sweep.pruner must be median, successive_halving or none, not {spec.pruner!r}")
    return space


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=spec.pruner_warmup_steps
        )
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_resource, reduction_factor=spec.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(storage_url: str, name: str, spec: SweepSpec) -> tuple[optuna.Study, bool]:
    """Create the study (True) or load it (False): creation is atomic in the storage."""
    storage = None
    for attempt in range(5):  # workers started together race to create Optuna's tables; the loser retries
        try:
            storage = RDBStorage(
                storage_url,
                heartbeat_interval=spec.heartbeat_seconds,
                grace_period=4 * spec.heartbeat_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retries),
            )
            break
        except (SQLAlchemyError, ImportError) as err:
            if attempt == 4 or not _creation_race(err):
                raise ConfigError(
                    f"Cannot open the Optuna storage {mask_secrets({'s': storage_url})['s']}: "
                    f"{mask_secrets({'s': str(err).splitlines()[0]})['s']}"
                ) from err
            log.info("Optuna storage not ready (%s); retrying", type(err).__name__)
            time.sleep(0.5 + attempt)
    sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=spec.direction, sampler=sampler, pruner=make_pruner(spec)
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=make_pruner(spec))
    if study.direction.name.lower() != spec.direction:
        raise ConfigError(
            f"Study {name!r} exists with direction {study.direction.name.lower()}, "
            f"not {spec.direction}; use another study name"
        )
    return study, False


def _creation_race(err: Exception) -> bool:
    """Whether opening the storage failed because another worker was creating Optuna's tables at the
    same moment (a duplicate in PostgreSQL, a lock in SQLite) rather than because of the URL, the
    driver, the server or the credentials, which no retry mends."""
    if isinstance(err, (ImportError, ArgumentError)):
        return False
    if isinstance(err, OperationalError):
        return any(word in str(err).lower() for word in ("locked", "deadlock"))
    return True


def check_space_unchanged(study: optuna.Study, space: dict[str, Any]) -> None:
    """A continued study must keep its search space: Optuna cannot mix distribution kinds."""
    used: dict[str, optuna.distributions.BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        used.update(trial.distributions)
    for key, dist in used.items():
        new = space.get(key)
        if new is None:
            continue
        changed_kind = type(new) is not type(dist)
        lost_choices = (
            isinstance(dist, optuna.distributions.CategoricalDistribution)
            and not changed_kind
            and (set(dist.choices) - set(new.choices))
        )
        if changed_kind or lost_choices:
            raise ConfigError(
                f"Study {study.study_name!r} was searched with {key}: {dist}; the search space now "
                f"says {new}. Keep the original space or use a new study name."
            )
