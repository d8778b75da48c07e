"""Planning a job: what it trains and where it starts, decided before anything is written anywhere.

``plan_job`` parses the launch words once (``LaunchArgs``), finds and verifies the checkpoint a resume
starts from (``ResumePoint``, with the run it belongs to fetched once), composes the config, checks every
setting and takes the resume decision: a fresh run, a new run from a checkpoint, a branch of an older
checkpoint into a nested run, or the resumed run itself (``JobPlan.mode``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.config import (
    STORED_AS_WRITTEN,
    ConfigError,
    apply_overrides,
    check_values,
    compose_config,
    config_diff,
    from_container,
)
from pipeline.engine import auto_resume
from pipeline.engine.launch import LaunchArgs, parse_launch
from pipeline.engine.resume import ResumePoint, resolve, stored_inputs
from pipeline.engine.stage import Precision, Stage
from pipeline.engine.tracking import latest_steps

log = logging.getLogger(__name__)

# JobPlan.mode: where the job logs
FRESH = "fresh"  # a new run, from nothing
NEW = "new"  # a new run, from a checkpoint that belongs to no run of this tracking store
BRANCH = "branch"  # a new run nested under the checkpoint's run: an older checkpoint than its latest steps
CONTINUE = "continue"  # the checkpoint's own run, as its next attempt


@dataclass
class JobPlan:
    """What a job will do, decided before anything is written anywhere."""

    launch: LaunchArgs  # how the user started it: resume point, runs it builds on, config overrides
    cfg: DictConfig  # the resolved config (the checkpoint's, with the overrides on top, when resuming)
    changes: dict[str, tuple[Any, Any]]  # keys this attempt changes (resume)
    resume: ResumePoint | None  # where training continues from; None for a fresh start
    inputs: dict[str, str]  # the runs the stage builds on (the checkpoint's when resuming)
    precision: Precision
    mode: str = FRESH  # FRESH, NEW, BRANCH or CONTINUE

    @property
    def overrides(self) -> list[str]:
        return self.launch.overrides

    def for_other_ranks(self) -> JobPlan:
        """What rank 0 hands the other ranks under torchrun: the plan without the checkpoint's state and run."""
        return self if self.resume is None else replace(self, resume=self.resume.for_other_ranks())


def plan_job(stage_cls: type[Stage], argv: list[str], client: MlflowClient, continue_run: str | None = None) -> JobPlan:
    """Parse, compose, find the checkpoint to resume from and check every setting; it only reads (but for
    ``resume=auto`` giving up a dead keyed run that has no checkpoint, auto_resume.py). Every
    mistake the user can make surfaces here (ConfigError, ResumeError, CheckpointError, ValueError).
    ``continue_run``: the run an elastic restart continues from its latest checkpoint, whatever the words say.
    With ``resume=auto``, the job key's run is found first (auto_resume.AlreadyFinished when it is done)."""
    launch = parse_launch(argv, stage_cls.run_inputs)
    if continue_run is not None:
        launch = replace(launch, resume_run=continue_run, resume_step=None, resume_from=None)
    else:
        launch = auto_resume.apply(client, stage_cls.name, launch)
    resume = resolve(client, stage_cls.name, launch)
    try:
        if resume is None:
            cfg = stage_cls.resolve_config(compose_config(stage_cls.name, launch.overrides))
            cfg, changes, inputs = stage_cls.adopt_inputs(cfg, launch.inputs), {}, dict(launch.inputs)
        else:
            cfg, changes = build_config(stage_cls, launch.overrides, resume)
            inputs = _resumed_inputs(stage_cls, launch, resume)
        check_settings(stage_cls, cfg)
        if resume is not None:
            _check_something_to_train(cfg, resume)
    except BaseException:
        if resume is not None:
            resume.remove_download()
        raise
    precision = Precision.from_config(cfg.trainer.device, cfg.trainer.precision)
    return JobPlan(launch, cfg, changes, resume, inputs, precision, _mode(resume))


def _mode(resume: ResumePoint | None) -> str:
    """Where the job logs. A checkpoint the user picked (a step or a URI) that is older than the steps its run
    logged branches into a nested run, so the original history stays untouched."""
    if resume is None:
        return FRESH
    if resume.run is None:
        return NEW
    last = latest_steps(resume.run).get("train/loss")
    if not resume.latest and last is not None and resume.step < last:
        return BRANCH
    return CONTINUE


def build_config(
    stage_cls: type[Stage], overrides: list[str], resume: ResumePoint
) -> tuple[DictConfig, dict[str, tuple[Any, Any]]]:
    """The checkpoint's config with the overrides on top, and what they change; an architecture change
    is refused."""
    base = from_container(stage_cls.schema, resume.meta["config"], as_written=resume.meta.get(STORED_AS_WRITTEN, False))
    cfg = stage_cls.resolve_config(apply_overrides(stage_cls.name, base, overrides))
    changes = config_diff(base, cfg)
    incompatible = [
        key
        for key in changes
        if key.startswith(stage_cls.architecture_keys) and key not in stage_cls.architecture_exempt
    ]
    if incompatible:
        raise ConfigError(
            "Refusing to resume: these overrides change the model architecture, so the checkpoint's "
            "weights cannot be loaded: "
            + ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in incompatible)
            + ". Start a fresh run for a different architecture."
        )
    if changes:
        log.warning(
            "Configuration changes detected:\n%s",
            "\n".join(f"  - {k}: {old} -> {new}" for k, (old, new) in changes.items()),
        )
    return cfg, changes


def _resumed_inputs(stage_cls: type[Stage], launch: LaunchArgs, resume: ResumePoint) -> dict[str, str]:
    """The checkpoint's run inputs; naming other runs on resume is refused (the weights were trained for these)."""
    inputs = stored_inputs(resume.meta, stage_cls.run_inputs)
    changed = {key: value for key, value in launch.inputs.items() if inputs.get(key) != value}
    if changed:
        raise ConfigError(
            "Refusing to resume: the checkpoint was trained on other runs than "
            + ", ".join(f"{key}={value} (the checkpoint's: {inputs.get(key)})" for key, value in changed.items())
            + ". Leave them out to resume, or start a fresh run to build on other runs."
        )
    return inputs


def check_settings(stage_cls: type[Stage], cfg: DictConfig) -> None:
    """Settings whose wrong value would otherwise act silently (a misspelt mode ranking checkpoints the
    wrong way, a monitored metric the stage never logs) or fail only hours in; refused at start-up."""
    check_values(stage_cls.schema, cfg)  # interpolations resolve, numbers in range (config/stored.py)
    choices = {"checkpoint.mode": ("min", "max"), "optim.schedule": ("cosine", "constant")}
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(allowed)}")
    monitor = cfg.checkpoint.monitor
    if monitor not in stage_cls.val_metric_names:
        raise ConfigError(
            f"checkpoint.monitor={monitor!r} is never logged by {stage_cls.name}, so no checkpoint could "
            f"be ranked by it; choose one of {', '.join(stage_cls.val_metric_names)}"
        )


def _check_something_to_train(cfg: DictConfig, resume: ResumePoint) -> None:
    """Refuse a resume whose checkpoint already reached the end, unless the run was never ended (a job
    killed after its last checkpoint was committed): the job then only ends the run, as FINISHED."""
    if cfg.trainer.epochs is not None:
        done = float(resume.meta.get("epoch", 0))
        if done < cfg.trainer.epochs:
            return
        where, advice = f"epoch {done:g} and trainer.epochs={cfg.trainer.epochs}", "a larger trainer.epochs"
    else:
        if resume.step < cfg.trainer.max_steps:
            return
        where = f"step {resume.step} and trainer.max_steps={cfg.trainer.max_steps}"
        advice = "a larger trainer.max_steps"
    status = resume.run.info.status if resume.latest else None
    if status is not None and status != "FINISHED":
        log.warning(
            "The run's latest checkpoint is at %s, but the run was left %s (its job ended before it "
            "could end the run): this job only ends it",
            where,
            status,
        )
        return
    raise ConfigError(f"Nothing to train: the checkpoint is at {where}. Pass {advice} to train further.")


def effective_batch(cfg: DictConfig, nproc: int) -> str:
    """ "8 (4 per rank x 2 ranks)" under torchrun; "" on one process (the batch_size param says it)."""
    size = int(cfg.batch_size)
    return f"{size * nproc} ({size} per rank × {nproc} ranks)" if nproc > 1 else ""


def resume_label(cfg: DictConfig, resume: ResumePoint) -> str:
    """Where a resume starts, in the stage's unit: "epoch 3" (epoch-based) or "step 100"."""
    if cfg.trainer.epochs is not None:
        return f"epoch {float(resume.meta.get('epoch', 0)):g}"
    return f"step {resume.step}"
