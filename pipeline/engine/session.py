"""One job from the command line to a finished run: config, resume, the MLflow run, the loop.

``run_stage(StageClass, argv)`` is what every training entry point calls. It decides which run the
job logs into (fresh, the resumed run, or a branch), turns the run ``mlflow run`` created into the
attempt record when resuming, and ends every run it touched with the right status.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from pipeline.config import (
    STORED_AS_WRITTEN,
    ConfigError,
    apply_overrides,
    check_values,
    compose_config,
    config_diff,
    flatten,
    from_container,
    redact,
    to_container,
)
from pipeline.common import faults
from pipeline.engine import launcher_watch, startup
from pipeline.engine.cli import (EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_STOPPED, EXIT_STORAGE,
                                 exit_now, setup_logging)
from pipeline.engine import tags as tag
from pipeline.engine.checkpointing import (
    CheckpointError,
    CheckpointStore,
    RetentionPolicy,
    StorageError,
    checkpoint_name,
    download_checkpoint,
    index_row,
    list_checkpoints,
    read_index,
    rows_from_meta,
    utc_now,
)
from pipeline.engine.distributed import Dist, handed_over_run, max_restarts, remember_run, restart_count
from pipeline.engine.launch import RESUME_KEYS, LaunchArgs, parse_launch
from pipeline.engine.lease import FencedClient, Lease, LeaseHeld, LeaseLost
from pipeline.engine.logged_models import CheckpointModels
from pipeline.engine.outage import configure_http, first_line
from pipeline.engine.resume import ResumeError, ResumePoint, resolve, stored_inputs
from pipeline.engine import status_guard
from pipeline.engine.stage import Precision, Stage
from pipeline.engine.stopping import AbortTraining, StopController
from pipeline.engine.tracking import (AccessError, MetricLogger, TagWriter, access_error, check_access, copy_history,
                                      dashboard_hint, default_run_name, describe_run, ensure_runs_view, latest_steps,
                                      log_dataset_inputs, resume_command, start_or_adopt_run)
from pipeline.engine.trainer import DataWorkerDied, Engine, NonFiniteTraining, Position

log = logging.getLogger(__name__)



@dataclass
class RunContext:
    run_id: str
    run_name: str
    attempt: int
    attempt_run_id: str | None  # the run `mlflow run` created, kept as this attempt's record
    resumed_from: str | None  # e.g. "step 100"
    history: list[dict[str, Any]] = field(default_factory=list)
    index_rows: list[dict[str, Any]] = field(default_factory=list)
    logged_steps: dict[str, int] = field(default_factory=dict)  # metric -> last step an earlier attempt logged
    lease: Lease | None = None  # this job's lease on the run (one job per run)
    experiment_id: str = ""  # for the links in the run description
    nproc: int = 1  # processes (torchrun ranks) this attempt trains with


# --------------------------------------------------------------------------------------------
# Configuration on start and on resume
# --------------------------------------------------------------------------------------------


def build_config(stage_cls: type[Stage], overrides: list[str],
                 resume: ResumePoint) -> tuple[DictConfig, dict[str, tuple[Any, Any]]]:
    """The checkpoint's config with the overrides on top, and what they change; an architecture change
    is refused."""
    base = from_container(stage_cls.schema, resume.meta["config"], as_written=resume.meta.get(STORED_AS_WRITTEN, False))
    cfg = stage_cls.resolve_config(apply_overrides(stage_cls.name, base, overrides))
    changes = config_diff(base, cfg)
    incompatible = [
        key for key in changes
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
        log.warning("Configuration changes detected:\n%s",
                    "\n".join(f"  - {k}: {old} -> {new}" for k, (old, new) in changes.items()))
    return cfg, changes


# --------------------------------------------------------------------------------------------
# Choosing and preparing the run
# --------------------------------------------------------------------------------------------


def _experiment_name(cfg: DictConfig, stage: str) -> str:
    return cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or stage


def launcher_run(cfg: DictConfig) -> str | None:
    """The run `mlflow run` created for this process, unless this job is nested under another run."""
    return None if cfg.tracking.parent_run else os.environ.get("MLFLOW_RUN_ID")


def _base_tags(stage: Stage) -> dict[str, str]:
    return {tag.STAGE: stage.name, **stage.tags()}


def _attempt_yaml(entry: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> str:
    data = dict(entry, changes={k: {"old": old, "new": new} for k, (old, new) in changes.items()})
    return yaml.safe_dump(redact(data), sort_keys=False)


def _read_history(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    """The run's attempt records (config/attempt-<n>.yaml); an unreadable one is skipped with a warning."""
    history = []
    try:
        entries = client.list_artifacts(run_id, "config")
    except Exception:
        return history
    with tempfile.TemporaryDirectory() as tmp:
        for e in entries:
            if Path(e.path).name.startswith("attempt-"):
                try:
                    entry = yaml.safe_load(Path(client.download_artifacts(run_id, e.path, tmp)).read_text())
                    int(entry["attempt"])
                except Exception as err:  # truncated, not YAML, not a record
                    log.warning("Run %s: %s is unreadable (%s); the description lists the other attempts",
                                run_id, e.path, err)
                    continue
                history.append(entry)
    return sorted(history, key=lambda h: int(h["attempt"]))


def _count_tag(tags: dict[str, str]) -> int:
    """The run's resume.count tag; 0 when missing or not a number (then the attempt records count)."""
    try:
        return max(int(tags.get(tag.RESUME_COUNT, "0")), 0)
    except ValueError:
        log.warning("Tag %s=%r is not a number; attempts are counted from their records", tag.RESUME_COUNT,
                    tags.get(tag.RESUME_COUNT))
        return 0


def _start_new_run(client: MlflowClient, stage: Stage, cfg: DictConfig, experiment: str,
                   extra_tags: dict[str, str]) -> tuple[str, str]:
    """The job's own run: the one `mlflow run` created, or a new one. Returns (id, name)."""
    tags = stage.tags()
    written = to_container(cfg)["tracking"]  # the name and tags as written: what they resolve to may be a secret
    name = written["run_name"] or (lambda run_id: default_run_name(run_id, tags[tag.MODEL], tags[tag.DATASET]))
    if cfg.tracking.parent_run:
        extra_tags = {tag.PARENT_RUN: cfg.tracking.parent_run, **extra_tags}
    all_tags = {**_base_tags(stage), tag.RESUME_COUNT: "0", tag.STOP_REQUESTED: "false",
                **written["tags"], **extra_tags}
    world = stage.dist.world_size  # the first attempt's; the tags follow later attempts
    params = {**flatten(to_container(cfg)), **stage.inputs, tag.WORLD_SIZE: world,
              tag.EFFECTIVE_BATCH: int(cfg.batch_size) * world}
    run_id = start_or_adopt_run(client, experiment=experiment, run_name=name, tags=all_tags, params=params,
                                launcher=launcher_run(cfg))
    try:
        client.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(redact(to_container(cfg)))), "config/config.yaml")
    except BaseException:  # e.g. a full artifact disk: the run must not stay RUNNING with nothing to resume
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id, name(run_id) if callable(name) else name


def open_run(client: MlflowClient, stage: Stage, cfg: DictConfig, resume: ResumePoint | None,
             overrides: list[str], changes: dict[str, tuple[Any, Any]], explicit_step: bool) -> RunContext:
    launcher = launcher_run(cfg)
    started = utc_now()
    if resume is None or resume.run_id is None:
        extra = {} if resume is None else {tag.RESUME_FROM: resume.source}
        run_id, name = _start_new_run(client, stage, cfg, _experiment_name(cfg, stage.name), extra)
        lease = _lease(client, run_id, cfg).acquire({}, contended=False)
        entry = {"attempt": 1, "started": started, "from": resume.source if resume else None,
                 "overrides": overrides, "status": "RUNNING"}
        client.log_text(run_id, _attempt_yaml(entry, changes), "config/attempt-1.yaml")
        return RunContext(run_id, name, 1, None, None if resume is None else resume.source, [entry], lease=lease)

    original = client.get_run(resume.run_id)
    last = latest_steps(original).get("train/loss")
    if explicit_step and last is not None and resume.step < last:
        # Older checkpoint: branch into a nested run so the original history stays untouched.
        extra = {tag.PARENT_RUN: resume.run_id, tag.RESUME_BRANCH_OF: resume.run_id,
                 tag.RESUME_FROM: f"{_resume_label(cfg, resume)} of run {resume.run_id}"}
        run_id, name = _start_new_run(client, stage, cfg, client.get_experiment(original.info.experiment_id).name, extra)
        lease = _lease(client, run_id, cfg).acquire({}, contended=False)
        copied = copy_history(client, resume.run_id, run_id, resume.step)
        log.info("Branching into new run %s nested under %s (copied %d metric values up to step %d)",
                 run_id, resume.run_id, copied, resume.step)
        entry = {"attempt": 1, "started": started, "from": resume.source, "overrides": overrides,
                 "status": "RUNNING"}
        client.log_text(run_id, _attempt_yaml(entry, changes), "config/attempt-1.yaml")
        return RunContext(run_id, name, 1, None, _resume_label(cfg, resume), [entry], lease=lease)
    return _continue_run(client, cfg, resume, original, overrides, changes, launcher, started)


def _continue_run(client: MlflowClient, cfg: DictConfig, resume: ResumePoint, original, overrides: list[str],
                  changes: dict[str, tuple[Any, Any]], launcher: str | None, started: str) -> RunContext:
    """The resumed run itself: what it holds (read first: a store that cannot be read changes nothing),
    then its lease, the attempt's record and tags."""
    run_id = resume.run_id
    logged = latest_steps(original)
    last = logged.get("train/loss")
    # The rows of the checkpoints up to the one resumed from: a newer one is corrupted (the resume fell
    # back) or was never committed, and this job writes its step again; the one resumed from is
    # committed, but a crash between the commit and the index write may have kept it out of index.csv.
    index_rows = [row for row in read_index(client, run_id) if int(row["step"]) <= resume.step]
    if resume.step not in {int(row["step"]) for row in index_rows}:
        index_rows.append(index_row(resume.meta, original.data.tags))
    # Older stored checkpoints missing from the index (the same crash, hit by a job whose successor
    # then committed a newer one) get their rows back, or retention would never delete them.
    indexed = {int(row["step"]) for row in index_rows}
    orphans = [step for step in list_checkpoints(client, run_id) if step < resume.step and step not in indexed]
    if orphans:
        log.info("Checkpoints at steps %s are stored but missing from checkpoints/index.csv; their rows are "
                 "rebuilt from their meta.json", ", ".join(map(str, orphans)))
        index_rows += rows_from_meta(client, run_id, orphans)
    history = _read_history(client, run_id)
    lease = _lease(client, run_id, cfg).acquire(original.data.tags)  # LeaseHeld while another job trains it
    try:
        attempt, resumed_from, attempt_run = _record_attempt(client, cfg, resume, original, history, lease, overrides,
                                                             changes, launcher, started)
    except BaseException:
        lease.release()
        raise
    if last is not None and last > resume.step:
        if changes:
            log.warning("Steps %d-%d were logged by the interrupted attempt; they are trained again with changed "
                        "settings and logged again, so the charts show two values at those steps",
                        resume.step + 1, last)
            logged = {}
        else:
            log.info("Steps %d-%d were logged by the interrupted attempt; training them again gives the same values, "
                     "which are not logged twice", resume.step + 1, last)
    return RunContext(run_id, original.info.run_name, attempt, attempt_run, resumed_from, history, index_rows,
                      logged, lease)


def _record_attempt(client: MlflowClient, cfg: DictConfig, resume: ResumePoint, original, history: list[dict[str, Any]],
                    lease: Lease, overrides: list[str], changes: dict[str, tuple[Any, Any]], launcher: str | None,
                    started: str) -> tuple[int, str, str | None]:
    """The attempt's record first, numbered after every record there is (a crash between the record and
    the tags leaves the count behind, never two attempts under one number), then the run's tags and the
    attempt run `mlflow run` made. Returns the attempt number, where it resumed from and the attempt run."""
    run_id = resume.run_id
    recorded = max([int(h["attempt"]) for h in history], default=1)
    attempt = max(recorded, _count_tag(original.data.tags) + 1) + 1
    resumed_from = _resume_label(cfg, resume)
    entry = {"attempt": attempt, "started": started, "from": resumed_from, "overrides": overrides,
             "status": "RUNNING"}
    if lease.took_over:
        entry["from"] = f"{resumed_from}; took over the run from {lease.took_over}"
    history.append(entry)
    client.log_text(run_id, _attempt_yaml(entry, changes), f"config/attempt-{attempt}.yaml")
    faults.point("startup.attempt")
    client.update_run(run_id, status="RUNNING")
    if tag.STOPPED_BY in original.data.tags:
        client.delete_tag(run_id, tag.STOPPED_BY)  # this attempt has not been stopped (yet)
    for key, value in {tag.RESUME_COUNT: str(attempt - 1), tag.RESUME_FROM: resumed_from,
                       tag.STOP_REQUESTED: "false"}.items():
        client.set_tag(run_id, key, value)
    attempt_run = None
    if launcher and launcher != run_id:
        attempt_run = launcher
        for key, value in {
            tag.PARENT_RUN: run_id,
            tag.RUN_NAME: f"{original.info.run_name} · attempt {attempt}",
            tag.ATTEMPT_NUMBER: str(attempt),
            tag.ATTEMPT_OF: run_id,
            tag.ATTEMPT_CHECKPOINT: resume.source,
            tag.ATTEMPT_OVERRIDES: " ".join(redact(overrides)) or "(none)",
            tag.ATTEMPT_CHANGES: "; ".join(f"{k}: {o} -> {n}" for k, (o, n) in changes.items()) or "(none)",
        }.items():
            client.set_tag(attempt_run, key, value)
    return attempt, resumed_from, attempt_run


def _lease(client: MlflowClient, run_id: str, cfg: DictConfig) -> Lease:
    return Lease(client, run_id, float(cfg.tracking.lease_timeout_seconds), float(cfg.tracking.lease_heartbeat_seconds))


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _progress(cfg: DictConfig, pos: Position, resumed_from: str | None, engine: Engine | None = None) -> str:
    """The `progress` tag. Epoch-based: "Epoch 5/10 · Step 150/200 · resumed from epoch 3" (Step is the
    batch in the epoch); step-based: "step 150/200 · epoch 3 · resumed from step 100"."""
    if cfg.trainer.epochs is not None and engine is not None:
        epochs = int(cfg.trainer.epochs)
        text = f"Epoch {min(pos.epoch + 1, epochs)}/{epochs} · Step {pos.batch_in_epoch}/{engine.batches_per_epoch()}"
    else:
        total = engine.total_steps if engine is not None else cfg.trainer.max_steps
        text = f"step {pos.step}/{total} · epoch {pos.epoch + 1}"
    return text + (f" · resumed from {resumed_from}" if resumed_from else "")


def _resume_label(cfg: DictConfig, resume: ResumePoint) -> str:
    """Where a resume starts, in the stage's unit: "epoch 3" (epoch-based) or "step 100"."""
    if cfg.trainer.epochs is not None:
        return f"epoch {float(resume.meta.get('epoch', 0)):g}"
    return f"step {resume.step}"


def check_settings(stage_cls: type[Stage], cfg: DictConfig) -> None:
    """Settings whose wrong value would otherwise act silently (a misspelt mode ranking checkpoints the
    wrong way, a monitored metric the stage never logs) or fail only hours in; refused at start-up."""
    check_values(stage_cls.schema, cfg)  # interpolations resolve, numbers in range (config.py)
    choices = {"checkpoint.mode": ("min", "max"), "optim.schedule": ("cosine", "constant")}
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(allowed)}")
    monitor = cfg.checkpoint.monitor
    if monitor not in stage_cls.val_metric_names:
        raise ConfigError(f"checkpoint.monitor={monitor!r} is never logged by {stage_cls.name}, so no checkpoint could "
                          f"be ranked by it; choose one of {', '.join(stage_cls.val_metric_names)}")


def _check_something_to_train(client: MlflowClient, cfg: DictConfig, launch: LaunchArgs, resume: ResumePoint) -> None:
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
    status = client.get_run(resume.run_id).info.status if launch.resume_run and not launch.explicit_step else None
    if status is not None and status != "FINISHED":
        log.warning("The run's latest checkpoint is at %s, but the run was left %s (its job ended before it "
                    "could end the run): this job only ends it", where, status)
        return
    raise ConfigError(f"Nothing to train: the checkpoint is at {where}. Pass {advice} to train further.")


def _finish(client: MlflowClient, ctx: RunContext, stage_name: str, cfg: DictConfig, status: str,
            pos: Position, latest: str | None, stopped_by: str | None, changes, engine: Engine | None = None) -> None:
    """End the run in the tracking store first (tags, description, status), then update the attempt's record,
    an artifact: an artifact store that cannot be written (a full disk) must not leave the run RUNNING."""
    ctx.history[-1]["status"] = status if stopped_by is None else f"{status} ({stopped_by})"
    if stopped_by:
        client.set_tag(ctx.run_id, tag.STOPPED_BY, stopped_by)
    client.set_tag(ctx.run_id, tag.PROGRESS, _progress(cfg, pos, ctx.resumed_from, engine))
    client.set_tag(ctx.run_id, tag.NOTE, describe_run(
        stage=stage_name, run_id=ctx.run_id, progress=_progress(cfg, pos, ctx.resumed_from, engine), status=status,
        latest_checkpoint=latest, history=ctx.history, experiment_id=ctx.experiment_id, nproc=ctx.nproc,
        batch=effective_batch(cfg, ctx.nproc)))
    client.set_terminated(ctx.run_id, status)
    if ctx.attempt_run_id:
        client.set_terminated(ctx.attempt_run_id, status)
    launcher = launcher_run(cfg)
    if launcher and status == "KILLED":
        status_guard.spawn(launcher, status)  # `mlflow run` would turn KILLED into FAILED
    record = f"config/attempt-{ctx.attempt}.yaml"
    try:
        faults.point("finish.record")
        client.log_text(ctx.run_id, _attempt_yaml(ctx.history[-1], changes), record)
    except Exception as err:  # the artifact store's own exception types vary
        log.error("Run %s is ended %s, but its attempt record %s could not be updated (%s); it still says RUNNING",
                  ctx.run_id, status, record, first_line(err))


def effective_batch(cfg: DictConfig, nproc: int) -> str:
    """"8 (4 per rank x 2 ranks)" under torchrun; "" on one process (the batch_size param says it)."""
    size = int(cfg.batch_size)
    return f"{size * nproc} ({size} per rank × {nproc} ranks)" if nproc > 1 else ""


class TrainingHooks:
    """Callbacks for code that drives training in-process (e.g. a sweep trial)."""

    def on_run_started(self, run_id: str) -> None:
        """The job's MLflow run is chosen and set up."""

    def on_validation(self, step: int, metrics: dict[str, float]) -> str | None:
        """After each validation; return a reason (e.g. "pruned") to stop like a stop request."""
        return None


@dataclass
class JobPlan:
    """What a job will do, decided before anything is written anywhere."""

    launch: LaunchArgs  # how the user started it: resume point, runs it builds on, config overrides
    cfg: DictConfig  # the resolved config (the checkpoint's, with the overrides on top, when resuming)
    changes: dict[str, tuple[Any, Any]]  # keys this attempt changes (resume)
    resume: ResumePoint | None  # where training continues from; None for a fresh start
    inputs: dict[str, str]  # the runs the stage builds on (the checkpoint's when resuming)
    precision: Precision

    @property
    def overrides(self) -> list[str]:
        return self.launch.overrides


def plan_job(stage_cls: type[Stage], argv: list[str], client: MlflowClient) -> JobPlan:
    """Parse, compose, find the checkpoint to resume from and check every setting; it only reads. Every
    mistake the user can make surfaces here (ConfigError, ResumeError, CheckpointError, ValueError)."""
    launch = parse_launch(argv, stage_cls.run_inputs)
    resume = resolve(client, stage_cls.name, launch)
    if resume is None:
        cfg = stage_cls.resolve_config(compose_config(stage_cls.name, launch.overrides))
        cfg, changes, inputs = stage_cls.adopt_inputs(cfg, launch.inputs), {}, dict(launch.inputs)
    else:
        cfg, changes = build_config(stage_cls, launch.overrides, resume)
        inputs = _resumed_inputs(launch, resume)
    check_settings(stage_cls, cfg)
    if resume is not None:
        _check_something_to_train(client, cfg, launch, resume)
    return JobPlan(launch, cfg, changes, resume, inputs, Precision.from_config(cfg.trainer.device, cfg.trainer.precision))


def _resumed_inputs(launch: LaunchArgs, resume: ResumePoint) -> dict[str, str]:
    """The checkpoint's run inputs; naming other runs on resume is refused (the weights were trained for these)."""
    inputs = stored_inputs(resume.meta)
    changed = {key: value for key, value in launch.inputs.items() if inputs.get(key) != value}
    if changed:
        raise ConfigError(
            "Refusing to resume: the checkpoint was trained on other runs than "
            + ", ".join(f"{key}={value} (the checkpoint's: {inputs.get(key)})" for key, value in changed.items())
            + ". Leave them out to resume, or start a fresh run to build on other runs.")
    return inputs


def run_stage(stage_cls: type[Stage], argv: list[str], hooks: TrainingHooks | None = None) -> int:
    """Entry point body of every training stage: plan, build, open the run, train in it; returns the exit
    code (EXIT_ABORTED after a second signal: the command-line entry then exits at once, see exit_now).

    Under torchrun every rank runs this: rank 0 plans, opens the run and talks to MLflow, the other ranks
    get the plan from it and train their share (docs/distributed.md)."""
    startup.begin()
    dist = Dist.from_env()
    setup_logging(dist.rank)
    configure_http()  # short HTTP retries: the engine retries what it must store (engine/outage.py)
    dist.init()  # once per process: a sweep's trials share the process group
    return _run_rank(stage_cls, argv, hooks, dist)


def _run_rank(stage_cls: type[Stage], argv: list[str], hooks: TrainingHooks | None, dist: Dist) -> int:
    client, plan, code = None, None, EXIT_OK
    if dist.is_main:
        try:
            client = MlflowClient()
            check_access(client)
            plan = plan_job(stage_cls, argv, client)
        except (ConfigError, ResumeError, CheckpointError, ValueError, AccessError) as err:
            log.error("%s", err)
            code = EXIT_BAD_INPUT
    plan, code = dist.broadcast((plan, code))  # the other ranks train what rank 0 planned
    if code != EXIT_OK:
        return code
    startup.mark("config")
    cfg = plan.cfg
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch_deterministic()
    seed_everything(int(cfg.seed) + dist.rank)  # rank 0 draws what one process would; the others their own streams
    precision = replace(plan.precision, device=dist.device(plan.precision.device))
    # Rank 0 builds first: what it pins while building (finetune_vocoder's adapter checkpoint step) is what the
    # other ranks then build with, even if an input run commits a newer checkpoint in between.
    stage, inputs = None, plan.inputs
    if dist.is_main:
        stage, code = _build(stage_cls, plan, precision, dist, inputs)
    code, inputs = dist.broadcast((code, stage.inputs if stage else inputs))
    if code == EXIT_OK and not dist.is_main:
        stage, code = _build(stage_cls, plan, precision, dist, inputs)
    code = max(dist.all_gather(code))  # a rank that cannot build stops them all
    if code != EXIT_OK:
        return code
    startup.mark("build")

    ctx = None
    if dist.is_main:
        ctx, code = _open(client, stage, plan)
    run_id, code = dist.broadcast((ctx.run_id if ctx else None, code))
    if code != EXIT_OK:
        return code
    if not dist.is_main:
        return train_other_rank(stage, plan, run_id)
    log.info("MLflow run %s (%s) in %s", ctx.run_id, ctx.run_name, mlflow.get_tracking_uri())
    ctx.nproc = dist.world_size
    remember_run(ctx.run_id)  # where an elastic restart of this torchrun job finds the run
    try:
        return train_in_run(client, stage, plan, ctx, hooks or TrainingHooks())
    finally:
        if ctx.lease is not None:
            ctx.lease.release()


def _build(stage_cls: type[Stage], plan: JobPlan, precision: Precision, dist: Dist,
           inputs: dict[str, str]) -> tuple[Stage | None, int]:
    """The stage with its parts built, or the exit code of why it cannot be."""
    stage = stage_cls(plan.cfg, precision, inputs=inputs, resuming=plan.resume is not None, dist=dist)
    try:
        stage.build()
        stage.check_data()  # e.g. a batch larger than the training set: refused before the run is opened
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return None, EXIT_BAD_INPUT
    return stage, EXIT_OK


def _open(client: MlflowClient, stage: Stage, plan: JobPlan) -> tuple[RunContext | None, int]:
    """The job's run (fresh, resumed or a branch), or the exit code of why it cannot be opened."""
    cfg, resume = plan.cfg, plan.resume
    if resume is None:
        log.info("Starting fresh training (no checkpoint specified)")
    else:
        log.info("Resuming from %s", resume.source)
        log.info("Resuming from step %d", resume.step)
    try:
        return open_run(client, stage, cfg, resume, plan.overrides, plan.changes,
                        explicit_step=plan.launch.explicit_step), EXIT_OK
    except LeaseHeld as err:
        log.error("%s", err)
        return None, EXIT_BAD_INPUT
    except MlflowException as err:
        refused = access_error(err, f"write runs in experiment {_experiment_name(cfg, stage.name)!r}" if resume is None
                               else f"write to run {resume.run_id}")
        if refused is None:
            raise
        log.error("%s", refused)
        return None, EXIT_BAD_INPUT
    except CheckpointError as err:
        log.error("%s", err)
        return None, EXIT_FAILED
    except OSError as err:  # the artifact store cannot be written (a full or read-only disk)
        log.error("Cannot write the run's files to the artifact store: %s; nothing was trained", err)
        return None, EXIT_STORAGE


def elastic_argv(argv: list[str]) -> list[str]:
    """In a group torchrun restarted (``--max-restarts``): the job's words, continuing the run the failed
    group trained from its latest committed checkpoint (its ID is in torchrun's rendezvous store). This is
    the one automatic resume; a job's first group starts as asked."""
    run_id = handed_over_run()
    if run_id is None:
        return argv
    log.warning("Elastic restart %d of at most %d: continuing run %s from its latest committed checkpoint",
                restart_count(), max_restarts(), run_id)
    kept = [word for word in argv if word.partition("=")[0] not in RESUME_KEYS + ("checkpoint.resume_from",)]
    return [*kept, f"resume_run={run_id}"]


def train_other_rank(stage: Stage, plan: JobPlan, run_id: str) -> int:
    """A rank other than 0 under torchrun: the same loop on its share of the data, with no MLflow (rank 0
    logs, checkpoints and polls the stop tag; a signal here stops every rank at the same step)."""
    code = EXIT_FAILED
    with StopController(None, run_id, 0) as stopper:
        try:
            engine = Engine(stage, None, None, stopper, run_id)
            if plan.resume is not None:
                engine.load_state_dict(plan.resume.state)
            result = engine.fit()
            stopper.abortable = False
            code = EXIT_STOPPED if result.stopped_by else EXIT_OK
        except AbortTraining:
            code = EXIT_ABORTED
        except (NonFiniteTraining, DataWorkerDied) as err:
            log.error("%s", err)
    return code


def train_in_run(client: MlflowClient, stage: Stage, plan: JobPlan, ctx: RunContext, hooks: TrainingHooks) -> int:
    """Train ``stage`` in the opened run and always end the run, whatever happens (status, stopped_by,
    progress, description, the attempt record); returns the exit code."""
    cfg, resume = plan.cfg, plan.resume
    hooks.on_run_started(ctx.run_id)
    if ctx.lease is not None:
        client = FencedClient(client, ctx.lease)  # after a takeover this job writes nothing more to the run
    datasets = stage.dataset_inputs()
    if datasets:
        log_dataset_inputs(client, ctx.run_id, datasets, "training")

    run = client.get_run(ctx.run_id)
    ctx.experiment_id = run.info.experiment_id
    ensure_runs_view(client, ctx.experiment_id)  # the columns the experiment's links open
    shown = {"progress": run.data.tags.get(tag.PROGRESS, ""), "latest": run.data.tags.get(tag.CHECKPOINT_LATEST)}

    def description() -> str:
        return describe_run(stage=stage.name, run_id=ctx.run_id, progress=shown["progress"], status="RUNNING",
                            latest_checkpoint=shown["latest"], history=ctx.history, experiment_id=ctx.experiment_id,
                            nproc=ctx.nproc, batch=effective_batch(cfg, ctx.nproc))

    def on_progress(pos: Position) -> None:  # the description follows the progress tag, in the same batch
        shown["progress"] = _progress(cfg, pos, ctx.resumed_from, engine)
        tags.set({tag.PROGRESS: shown["progress"], tag.NOTE: description()})

    models = (CheckpointModels(client, ctx.run_id, ctx.experiment_id, ctx.run_name, flatten(to_container(cfg)),
                               run.data.tags) if cfg.tracking.checkpoint_models else None)

    def on_commit(step: int, row: dict[str, Any], linked: list) -> None:
        shown["latest"] = f"checkpoints/{checkpoint_name(step)}"
        tags.set({tag.NOTE: description()})
        if models is not None:
            models.committed(step, row, linked)

    client.set_tag(ctx.run_id, tag.WORLD_SIZE, str(ctx.nproc))
    client.set_tag(ctx.run_id, tag.EFFECTIVE_BATCH, str(int(cfg.batch_size) * ctx.nproc))
    client.set_tag(ctx.run_id, tag.NOTE, description())

    policy = RetentionPolicy(cfg.checkpoint.keep_last_n, cfg.checkpoint.keep_best_k, cfg.checkpoint.monitor,
                             cfg.checkpoint.mode)
    outage_limit = float(cfg.tracking.outage_limit_seconds)
    store = CheckpointStore(client, ctx.run_id, Path(cfg.checkpoint.staging_dir), policy, ctx.index_rows, on_commit,
                            fence=ctx.lease.fence if ctx.lease else None, outage_limit_s=outage_limit,
                            on_delete=models.deleted if models is not None else None)
    metrics = MetricLogger(client, ctx.run_id, cfg.tracking.flush_seconds, already_logged=ctx.logged_steps,
                           outage_limit_s=outage_limit)
    monitor = _system_metrics(ctx.run_id, cfg, resumed=resume is not None)
    status, stopped_by, code = "FAILED", None, EXIT_FAILED
    engine = None
    stopper = StopController(client, ctx.run_id, cfg.tracking.stop_poll_seconds)
    tags = TagWriter(client, ctx.run_id)  # the progress tag and the description, off the training thread
    if ctx.lease:
        def on_lost() -> None:
            stopper.request("lease lost")
            if monitor is not None:
                monitor.finish()  # MLflow's system metrics are written with a client of their own

        ctx.lease.on_lost = on_lost
    with stopper:  # handlers stay installed until the run is ended, so no signal leaves it RUNNING
        try:
            engine = Engine(stage, metrics, store, stopper, ctx.run_id, hooks=hooks)
            engine.on_progress = on_progress
            startup.mark("run setup")
            if resume is not None:
                engine.load_state_dict(resume.state)
                startup.mark("restore")
            result = engine.fit()
            stopper.abortable = False
            stopped_by = result.stopped_by
            status, code = ("KILLED", EXIT_STOPPED) if stopped_by else ("FINISHED", EXIT_OK)
            if stopped_by:
                log.warning("Stopped (%s) at step %d; checkpoint committed. Resume with: %s", stopped_by,
                            result.position.step, resume_command(stage.name, ctx.run_id, ctx.nproc))
            else:
                log.info("Training finished at step %d", result.position.step)
                if cfg.tracking.log_model and _log_final_model(client, ctx.run_id, stage, result.position.step) \
                        and models is not None:
                    models.final(result.position.step, metrics.at_step(result.position.step))
        except AbortTraining:
            status, stopped_by, code = "KILLED", "signal", EXIT_ABORTED
            client.set_tag(ctx.run_id, tag.STOP_ABORTED, "true")
        except NonFiniteTraining as err:
            log.error("%s", err)  # status FAILED, code EXIT_FAILED: the run ends with what it committed
        except DataWorkerDied as err:
            log.error("%s. Stopped at step %d; resume with: %s", err, engine.pos.step if engine else 0,
                      resume_command(stage.name, ctx.run_id, ctx.nproc))
        except StorageError as err:
            code = EXIT_STORAGE
            _log_storage_failure(client, err, ctx.run_id, resume_command(stage.name, ctx.run_id, ctx.nproc),
                                 engine.pos.step if engine else 0)
        except LeaseLost as err:
            log.error("%s", err)  # code EXIT_FAILED; the run is the other job's now
        except BaseException:
            log.exception("Training failed")
            raise
        finally:
            stopper.abortable = False  # ending the run takes a second; a signal now must not cut it
            if monitor is not None:
                monitor.finish()
            tags.close(timeout=5.0)  # before _finish sets the final progress itself
            pos = engine.pos if engine else Position()
            if code != EXIT_ABORTED:  # after an abort, do not wait for the upload: the user asked to stop now
                try:
                    store.close()
                    metrics.flush(wait=True)
                except StorageError as err:
                    _log_storage_failure(client, err, ctx.run_id, resume_command(stage.name, ctx.run_id, ctx.nproc),
                                         pos.step)
                    status, code = "FAILED", EXIT_STORAGE
                except LeaseLost:
                    code = EXIT_FAILED
                except Exception:
                    log.exception("Could not finish the checkpoint upload or metric logging")
                    status, code = "FAILED", EXIT_FAILED
            metrics.close()
            if ctx.lease is not None and not ctx.lease.held:
                log.error("Run %s is trained by another job now; this job leaves its status and description to it",
                          ctx.run_id)
                code = EXIT_FAILED
            else:
                try:
                    latest = client.get_run(ctx.run_id).data.tags.get(tag.CHECKPOINT_LATEST)
                    _finish(client, ctx, stage.name, cfg, status, pos, latest, stopped_by, plan.changes, engine)
                    log.info("Run %s ended %s. Dashboard: %s", ctx.run_id, status,
                             dashboard_hint(ctx.experiment_id, ctx.run_id))
                except Exception as err:  # the tracking store is down: the run stays RUNNING, a resume ends it
                    log.error("Could not end run %s as %s in the tracking store (%s); it shows RUNNING until a resume "
                              "ends it: %s", ctx.run_id, status, first_line(err),
                              resume_command(stage.name, ctx.run_id, ctx.nproc))
                    code = EXIT_STORAGE if code == EXIT_OK else code
    return code


def _log_storage_failure(client: MlflowClient, err: Exception, run_id: str, resume: str, step: int) -> None:
    try:
        kept = client.get_run(run_id).data.tags.get(tag.CHECKPOINT_LATEST_STEP)
        kept = (f"the committed checkpoint at step {kept} (still the latest)" if kept
                else "no checkpoint was committed yet")
    except Exception:  # the tracking store does not answer either
        kept = "the checkpoints committed before (the tracking store does not answer: the latest cannot be named now)"
    log.error("%s. Stopped at step %d. Kept: %s. When the storage is fixed, resume with: %s", err, step, kept, resume)


def _log_final_model(client: MlflowClient, run_id: str, stage: Stage, step: int) -> bool:
    """``model/``: an MLflow model of the final checkpoint, for stages that override ``export_model``;
    True when it was logged."""
    if type(stage).export_model is Stage.export_model:
        return False
    try:
        with tempfile.TemporaryDirectory(prefix="model-") as tmp:
            checkpoint = download_checkpoint(client, run_id, step, Path(tmp) / "checkpoint")
            out = Path(tmp) / "model"
            if stage.export_model(checkpoint, out):
                client.log_artifacts(run_id, str(out), "model")
                log.info("Logged the final model: runs:/%s/model", run_id)
                return True
    except Exception:  # the training is done and its checkpoint committed; do not fail the run for this
        log.exception("Could not log the final model of run %s; its checkpoints are intact", run_id)
    return False


def _system_metrics(run_id: str, cfg: DictConfig, resumed: bool):
    if not cfg.tracking.system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed)
        monitor.start()
        return monitor
    except Exception as err:  # optional: never block training on it
        log.warning("System metrics disabled: %s", err)
        return None


def torch_deterministic() -> None:
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    # The fused attention kernels (cuDNN, memory-efficient, flash) have non-deterministic backward
    # passes on CUDA; the math kernel is exact. trainer.deterministic=false gives the fused ones back.
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_flash_sdp(False)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(stage_cls: type[Stage]) -> None:
    dist = Dist.from_env()
    setup_logging(dist.rank)
    launcher_watch.watch()  # a job whose launcher is gone stops as if it had been sent SIGTERM
    argv = sys.argv[1:]
    code = run_stage(stage_cls, elastic_argv(argv) if dist.is_main else argv)  # rank 0 plans the job
    if code == EXIT_STOPPED and max_restarts() > 0:
        # torchrun's agent restarts a group whose worker exits non-zero: a run stopped on purpose (the stop tag, a
        # pruned trial) would be resumed at once. The run's status (KILLED) and stopped_by tag say it was stopped.
        code = EXIT_OK
    exit_now(code, dist)


# --------------------------------------------------------------------------------------------
# Runs made from weights trained elsewhere (import_checkpoint)
# --------------------------------------------------------------------------------------------


def record_imported_run(stage: Stage, cfg: DictConfig, tags: dict[str, str], source: str) -> str:
    """A FINISHED run of ``stage`` whose one committed checkpoint (step 0) holds the stage's weights as
    they are now, written by the engine itself: the run then trains on (``resume_run`` with a larger
    ``trainer.max_steps``), feeds other stages and is browsed like any run trained here."""
    client = MlflowClient()
    run_id, _ = _start_new_run(client, stage, cfg, _experiment_name(cfg, stage.name), tags)
    policy = RetentionPolicy(cfg.checkpoint.keep_last_n, cfg.checkpoint.keep_best_k, cfg.checkpoint.monitor,
                             cfg.checkpoint.mode)
    store = CheckpointStore(client, run_id, Path(cfg.checkpoint.staging_dir), policy)
    metrics = MetricLogger(client, run_id, cfg.tracking.flush_seconds)
    try:
        Engine(stage, metrics, store, stopper=None, run_id=run_id).save_checkpoint()
        store.close()
        metrics.flush(wait=True)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        metrics.close()
    entry = {"attempt": 1, "started": utc_now(), "from": f"imported from {source}", "overrides": [],
             "status": "FINISHED"}
    client.log_text(run_id, _attempt_yaml(entry, {}), "config/attempt-1.yaml")
    progress = "step 0 · imported"
    client.set_tag(run_id, tag.PROGRESS, progress)
    client.set_tag(run_id, tag.NOTE, describe_run(
        stage=stage.name, run_id=run_id, progress=progress, status="FINISHED",
        latest_checkpoint=f"checkpoints/{checkpoint_name(0)}", history=[entry],
        experiment_id=client.get_run(run_id).info.experiment_id))
    client.set_terminated(run_id, "FINISHED")
    return run_id
