"""Optuna sweeps over any training stage, tracked in MLflow (docs/architecture.md, Scale and sweeps).

    python -m pipeline.sweep stage=train_adapter n_trials=20 storage=sqlite:///optuna.db study=lr-search \
        ssl=tiny trainer.max_steps=200
    mlflow run . -e sweep --env-manager local -P stage=train_adapter -P n_trials=20 -P overrides="ssl=tiny"

The search space, objective metric, direction and pruner come from ``configs/sweep/<stage>.yaml``
(``sweep.<key>=...`` overrides them). The study lives in the storage, so running the same command
again continues it, and any number of workers (processes or machines) can share one study.

MLflow: one parent run per study; each trial is a run nested under it, trained in-process by the
stage's engine, with a status that mirrors the trial (COMPLETE -> FINISHED, PRUNED -> KILLED,
FAIL -> FAILED) and a ``trial.state`` tag. The child run ID is the trial's user attribute
``mlflow_run_id``. A trial interrupted by a signal (its checkpoint committed) or by a crash (found
stale through Optuna's heartbeat) is re-queued with the same parameters and resumes into its own
child run when the study continues.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from pipeline.config import CONFIG_DIR, ConfigError, apply_overrides, compose_config, mask_secrets, split_overrides
from pipeline.engine.distributed import Dist
from pipeline.engine.launch import parse_launch
from pipeline.engine import launcher_watch
from pipeline.engine import tags as tag
from pipeline.engine.launcher_watch import note_stop_requested
from pipeline.engine.cli import EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED, exit_now, setup_logging
from pipeline.engine.session import TrainingHooks, run_stage
from pipeline.engine.stage import Stage
from pipeline.engine.tracking import start_or_adopt_run
from pipeline.stages import TRAINING_STAGES
from pipeline.stages import stage_class as registered_stage

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SWEEP_KEYS = ("stage", "n_trials", "storage", "study")
# Trials that count towards n_trials. Re-queued (WAITING) trials do not: they replace failed ones,
# and Optuna hands them out first.
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


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
    sampler_seed: Optional[int] = None  # TPE seed (leave null with several workers)
    heartbeat_seconds: int = 30  # a trial whose worker is silent for 4x this is a crash, and is retried
    max_retries: int = 3  # how often one interrupted trial is resumed


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Validation before any trial runs
# --------------------------------------------------------------------------------------------


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
        key, _, value = change[len("space."):].partition("=")
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
        probes = dist.choices if isinstance(dist, optuna.distributions.CategoricalDistribution) else (dist.low, dist.high)
        for probe in probes:  # the schema type-checks every value the sampler may propose
            apply_overrides(stage_cls.name, base, [f"{key}={override_value(probe)}"])
    if spec.metric not in stage_cls.val_metric_names:
        raise ConfigError(f"Objective metric {spec.metric!r} is never logged by {stage_cls.name}; "
                          f"it logs {', '.join(stage_cls.val_metric_names)}")
    if base.validation.interval <= 0:
        raise ConfigError(f"validation.interval={base.validation.interval}: the objective {spec.metric} would never "
                          "be logged; set validation.interval > 0")
    if spec.direction not in ("minimize", "maximize"):
        raise ConfigError(f"sweep.direction must be minimize or maximize, not {spec.direction!r}")
    if spec.pruner not in ("median", "successive_halving", "none"):
        raise ConfigError(f"sweep.pruner must be median, successive_halving or none, not {spec.pruner!r}")
    return space


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials,
                                           n_warmup_steps=spec.pruner_warmup_steps)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_resource,
                                                      reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------


class TrialInterrupted(Exception):
    """The trial was stopped by a signal or the stop tag; its checkpoint is committed."""

    def __init__(self, message: str, code: int = EXIT_STOPPED):
        super().__init__(message)
        self.code = code  # EXIT_STOPPED, or EXIT_ABORTED after a second signal


class TrialHooks(TrainingHooks):
    def __init__(self, trial: optuna.Trial, metric: str, client: MlflowClient, resumed_from: int | None):
        self.trial, self.metric, self.client, self.resumed_from = trial, metric, client, resumed_from
        self.run_id: str | None = None
        self.last_value: float | None = None

    def on_run_started(self, run_id: str) -> None:
        self.run_id = run_id
        self.trial.set_user_attr("mlflow_run_id", run_id)
        tags = {tag.TRIAL_NUMBER: str(self.trial.number), tag.TRIAL_STATE: "RUNNING",
                tag.SWEEP_STUDY: self.trial.study.study_name}
        if self.resumed_from is not None:
            tags[tag.TRIAL_RESUMED_FROM] = str(self.resumed_from)
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def on_validation(self, step: int, metrics: dict[str, float]) -> str | None:
        self.last_value = metrics[self.metric]
        self.trial.report(self.last_value, step)
        return "pruned" if self.trial.should_prune() else None


@dataclass
class Sweep:
    stage_cls: type[Stage]
    spec: SweepSpec
    space: dict[str, Any]
    stage_overrides: list[str]
    study: optuna.Study
    parent_run: str
    experiment: str
    client: MlflowClient

    def objective(self, trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, dist) for key, dist in self.space.items()}
        # A re-queued trial (after a signal: our user attrs; after a crash: Optuna's heartbeat retry,
        # which copies the user attrs) carries the child run it resumes.
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        resumed_from = trial.user_attrs.get("resume_of", frozen.system_attrs.get("failed_trial"))
        child = trial.user_attrs.get("mlflow_run_id")
        args = list(self.stage_overrides) + [f"{k}={override_value(v)}" for k, v in params.items()] + [
            f"tracking.parent_run={self.parent_run}", f"tracking.experiment={self.experiment}",
            f"tracking.run_name=trial-{trial.number:04d}-{self.study.study_name}",
        ]
        if child and self._has_checkpoint(child):
            args.append(f"resume_run={child}")
            log.info("Trial %d resumes trial %d in its child run %s", trial.number, resumed_from, child)
        hooks = TrialHooks(trial, self.spec.metric, self.client, resumed_from)
        log.info("Trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
        try:
            Dist.from_env().broadcast((self.stage_cls.name, args))  # under torchrun: every rank trains the trial
            code = run_stage(self.stage_cls, args, hooks=hooks)
        except Exception as err:
            self._finish_child(hooks, "FAIL")
            raise RuntimeError(f"trial {trial.number} crashed: {err}") from err
        if code == EXIT_OK and hooks.last_value is not None:
            self._finish_child(hooks, "COMPLETE")
            return hooks.last_value
        if code == EXIT_STOPPED and self._stopped_by(hooks) == "pruned":
            self._finish_child(hooks, "PRUNED")
            raise optuna.TrialPruned()
        if code in (EXIT_STOPPED, EXIT_ABORTED):
            self._finish_child(hooks, "FAIL", interrupted=True)
            self.study.enqueue_trial(trial.params, user_attrs={"resume_of": trial.number, "mlflow_run_id": hooks.run_id})
            raise TrialInterrupted(f"trial {trial.number} {'aborted' if code == EXIT_ABORTED else 'stopped'}; it "
                                   "resumes from its last committed checkpoint when the study continues", code)
        self._finish_child(hooks, "FAIL")
        raise RuntimeError(f"trial {trial.number} failed (exit code {code})")

    def _has_checkpoint(self, run_id: str) -> bool:
        try:
            return bool(self.client.get_run(run_id).data.tags.get(tag.CHECKPOINT_LATEST))
        except Exception:
            return False

    def _stopped_by(self, hooks: TrialHooks) -> str | None:
        return self.client.get_run(hooks.run_id).data.tags.get(tag.STOPPED_BY) if hooks.run_id else None

    def _finish_child(self, hooks: TrialHooks, state: str, interrupted: bool = False) -> None:
        if hooks.run_id is None:
            return
        self.client.set_tag(hooks.run_id, tag.TRIAL_STATE, "INTERRUPTED" if interrupted else state)
        if not interrupted:
            self.client.set_terminated(hooks.run_id, RUN_STATUS[state])


# --------------------------------------------------------------------------------------------
# Study, parent run, summary
# --------------------------------------------------------------------------------------------


def open_study(storage_url: str, name: str, spec: SweepSpec) -> tuple[optuna.Study, bool]:
    """Create the study (True) or load it (False): creation is atomic in the storage."""
    storage = None
    for attempt in range(5):  # workers started together race to create Optuna's tables; the loser retries
        try:
            storage = RDBStorage(
                storage_url, heartbeat_interval=spec.heartbeat_seconds, grace_period=4 * spec.heartbeat_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retries),
            )
            break
        except (SQLAlchemyError, ImportError) as err:
            if attempt == 4 or not _creation_race(err):
                raise ConfigError(f"Cannot open the Optuna storage {mask_secrets({'s': storage_url})['s']}: "
                                  f"{mask_secrets({'s': str(err).splitlines()[0]})['s']}") from err
            log.info("Optuna storage not ready (%s); retrying", type(err).__name__)
            time.sleep(0.5 + attempt)
    sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=spec.direction,
                                    sampler=sampler, pruner=make_pruner(spec))
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=make_pruner(spec))
        if study.direction.name.lower() != spec.direction:
            raise ConfigError(f"Study {name!r} exists with direction {study.direction.name.lower()}, "
                              f"not {spec.direction}; use another study name")
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
        lost_choices = isinstance(dist, optuna.distributions.CategoricalDistribution) and not changed_kind and (
            set(dist.choices) - set(new.choices))
        if changed_kind or lost_choices:
            raise ConfigError(f"Study {study.study_name!r} was searched with {key}: {dist}; the search space now "
                              f"says {new}. Keep the original space or use a new study name.")


def parent_run_for(client: MlflowClient, study: optuna.Study, created: bool, stage: str, experiment: str,
                   params: dict[str, Any]) -> str:
    if not created:
        for _ in range(300):  # the creating worker sets it within moments
            parent = study.user_attrs.get("mlflow_parent_run")
            if parent:
                client.update_run(parent, status="RUNNING")
                return parent
            time.sleep(0.1)
        raise ConfigError(f"Study {study.study_name!r} has no MLflow parent run; was it created by this pipeline?")
    parent = start_or_adopt_run(
        client, experiment=experiment, run_name=f"sweep-{study.study_name}",
        tags={tag.STAGE: "sweep", tag.SWEEP_STAGE: stage, tag.SWEEP_STUDY: study.study_name}, params=params,
        launcher=os.environ.get("MLFLOW_RUN_ID"))
    study.set_user_attr("mlflow_parent_run", parent)
    return parent


def set_shared_tag(client: MlflowClient, run_id: str, key: str, value: str, tries: int = 3) -> None:
    """``set_tag`` on a run that other workers write too (the study's parent run). MLflow's SQL store inserts a
    tag it did not find a moment before, so two workers setting the same new tag at once collide on the tag's
    primary key (seen with PostgreSQL); the loser writes again, which is then an update."""
    for attempt in range(1, tries + 1):
        try:
            client.set_tag(run_id, key, value)
            return
        except MlflowException as err:
            if attempt == tries or "unique" not in str(err).lower():
                raise
            log.info("Tag %s of run %s was written by another worker at the same moment; writing it again", key, run_id)


def summarise(client: MlflowClient, study: optuna.Study, parent: str, metric: str) -> None:
    """Best trial, a table of all trials and Optuna's plots, on the parent run."""
    trials = study.get_trials(deepcopy=False)
    rows = [{
        "number": t.number, "state": t.state.name, "value": t.value,
        "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "resume_of": t.user_attrs.get("resume_of"),
        **{f"params.{k}": v for k, v in t.params.items()},
    } for t in trials]
    import pandas as pd

    client.log_table(parent, pd.DataFrame(rows), "trials.json")
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"**Optuna study `{study.study_name}`** · objective `{metric}` ({study.direction.name.lower()})",
             "", f"Trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed", ""]
    if completed:
        best = study.best_trial
        set_shared_tag(client, parent, tag.BEST_TRIAL, str(best.number))
        set_shared_tag(client, parent, tag.BEST_RUN_ID, best.user_attrs.get("mlflow_run_id", ""))
        client.log_metric(parent, f"best/{metric}", best.value, step=len(trials))
        client.log_text(parent, json.dumps({"number": best.number, "value": best.value, "params": best.params,
                                            "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}, indent=2),
                        "best_trial.json")
        lines += [f"Best: trial {best.number}, {metric} = {best.value:.6g}, run "
                  f"`{best.user_attrs.get('mlflow_run_id')}`", "", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in best.params.items()]
    _log_plots(client, study, parent, len(completed))
    set_shared_tag(client, parent, tag.NOTE, "\n".join(lines))


def _log_plots(client: MlflowClient, study: optuna.Study, parent: str, completed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots = {"optimization_history": vis.plot_optimization_history}
    if completed >= 2 and len(study.best_trial.params) > 0:
        plots["param_importances"] = vis.plot_param_importances
        importances = optuna.importance.get_param_importances(study)
        client.log_text(parent, json.dumps(importances, indent=2), "param_importances.json")
    with tempfile.TemporaryDirectory() as tmp:
        for name, plot in plots.items():
            try:
                ax = plot(study)
                ax.figure.savefig(Path(tmp) / f"{name}.png", dpi=90, bbox_inches="tight")
                plt.close(ax.figure)
            except Exception as err:  # a plot must never fail the sweep
                log.warning("Could not draw %s: %s", name, err)
        client.log_artifacts(parent, tmp, "plots")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Split words into sweep arguments, ``sweep.*`` spec overrides and stage overrides."""
    sweep_args, spec_overrides, stage_overrides = {}, [], []
    for word in split_overrides(argv):
        key, _, value = word.partition("=")
        if key in SWEEP_KEYS:
            sweep_args[key] = value
        elif key.startswith("sweep."):
            spec_overrides.append(word[len("sweep."):])
        else:
            stage_overrides.append(word)
    return sweep_args, spec_overrides, stage_overrides


def run_sweep(argv: list[str]) -> int:
    """The sweep. Under torchrun (``-P nproc=N``) every trial trains on all the ranks: rank 0 runs the study
    and hands each trial's words to the others, which train it with it (``follow_trials``)."""
    dist = Dist.from_env()
    setup_logging(dist.rank)
    dist.init()
    if not dist.is_main:
        return follow_trials(dist)
    try:
        return _run_study(argv)
    finally:
        dist.broadcast(None)  # no more trials: the other ranks leave


def follow_trials(dist: Dist) -> int:
    """A rank other than 0 of a sweep under torchrun: train each trial rank 0 hands out, until it says done.
    Between trials a signal is rank 0's to handle (it stops the sweep and tells the others)."""
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (trial := dist.broadcast(None)) is not None:
            stage, args = trial
            run_stage(stage_class(stage), args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _run_study(argv: list[str]) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        args, spec_overrides, stage_overrides = parse_args(argv)
        stage = args.get("stage") or "train_adapter"
        try:
            n_trials = int(float(args.get("n_trials") or 20))
        except ValueError as err:
            raise ConfigError(f"n_trials must be a number, not {args.get('n_trials')!r}") from err
        storage = args.get("storage") or "sqlite:///optuna.db"
        study_name = args.get("study") or f"{stage}-sweep"
        stage_cls = stage_class(stage)
        spec = load_spec(stage, spec_overrides)
        space = validate(stage_cls, spec, stage_overrides)
        study, created = open_study(storage, study_name, spec)
        check_space_unchanged(study, space)
    except (ConfigError, ValueError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT

    client = MlflowClient()
    launch = parse_launch(stage_overrides, stage_cls.run_inputs)  # e.g. finetune_vocoder's adapter_run=, vocoder_run=
    experiment = compose_config(stage, launch.overrides).tracking.experiment or stage
    if os.environ.get("MLFLOW_RUN_ID") and created:
        experiment = client.get_experiment(client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id).name
    params = {"sweep.stage": stage, "sweep.n_trials": n_trials, "sweep.storage": storage, "sweep.study": study_name,
              "sweep.metric": spec.metric, "sweep.direction": spec.direction, "sweep.pruner": spec.pruner,
              "sweep.overrides": " ".join(stage_overrides),
              **{f"space.{k}": v for k, v in spec.space.items()}}
    parent = parent_run_for(client, study, created, stage, experiment, params)
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
    sweep = Sweep(stage_cls, spec, space, stage_overrides, study, parent, experiment, client)
    log.info("Study %r in %s: %d trials wanted; MLflow parent run %s", study_name, mask_secrets({"s": storage})["s"],
             n_trials, parent)

    stop = {"requested": False}

    def between_trials(signum, frame):  # a trial installs its own handlers while it runs
        note_stop_requested()
        stop["requested"] = True
        log.warning("%s received between trials: stopping the sweep", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, between_trials) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = EXIT_OK
    # Trials already running when this worker starts belong to other workers, alive or crashed. Optuna
    # can call a crashed one stale only a grace period after its last heartbeat, so before leaving, this
    # worker waits until that much time has passed since its start: a crashed trial is then resumed
    # here, also when the same command is run again right after a crash.
    started, grace = time.monotonic(), 4 * spec.heartbeat_seconds
    found_running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    waiting_logged = False
    try:
        while not stop["requested"]:
            optuna.storages.fail_stale_trials(study)  # crashed workers' trials: FAIL + re-queued for resume
            if len(study.get_trials(deepcopy=False, states=COUNTED_STATES)) >= n_trials:
                unsure = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                          if t.number in found_running]
                left = grace - (time.monotonic() - started)
                if not unsure or left <= 0:
                    break
                if not waiting_logged:
                    log.info("Trials %s were running before this worker started; waiting up to %.0f s to learn "
                             "whether their worker crashed (then they resume here)", unsure, left)
                    waiting_logged = True
                time.sleep(min(left, 1.0))
                continue
            try:
                study.optimize(sweep.objective, n_trials=1, catch=(RuntimeError,))
            except TrialInterrupted as err:
                log.warning("%s. Run the same command again to continue the study.", err)
                code = err.code
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        summarise(client, study, parent, spec.metric)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        stopped = code in (EXIT_STOPPED, EXIT_ABORTED)
        status = "KILLED" if stopped else "RUNNING" if running else "FINISHED"
        if status == "RUNNING":
            log.info("Other workers still run trials of this study; the parent run stays RUNNING")
        else:
            client.set_terminated(parent, status)
        launcher = os.environ.get("MLFLOW_RUN_ID")
        if launcher and launcher != parent:  # this worker's own `mlflow run` record, nested under the study
            client.set_tag(launcher, tag.PARENT_RUN, parent)
            client.set_tag(launcher, tag.SWEEP_WORKER, "true")
            client.set_terminated(launcher, "KILLED" if stopped else "FINISHED")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    log.info("Study %r: %d trials finished; parent run %s", study_name, len(done), parent)
    return code


def main() -> None:
    launcher_watch.watch()  # the sweep stops (its trial with a checkpoint) when its launcher is gone
    exit_now(run_sweep(sys.argv[1:]), Dist.from_env())


if __name__ == "__main__":
    main()
