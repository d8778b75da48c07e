"""The MLflow run a job logs into, and its attempts.

``open_run`` opens the run the plan chose (``JobPlan.mode``): a new run, a branch nested under the
checkpoint's run, or the resumed run itself, whose next attempt it records (``config/attempt-<n>.yaml``,
the resume tags, and the run `mlflow run` created kept as the attempt's own record). ``finish`` ends
it with its status, progress and description, and updates the attempt's record.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.common import faults
from pipeline.common.provenance import utc_now
from pipeline.config import flatten, redact, to_container
from pipeline.engine import status_guard
from pipeline.engine import tags as tag
from pipeline.engine.checkpointing import index_row, list_checkpoints, read_index, rows_from_meta
from pipeline.engine.lease import Lease
from pipeline.engine.outage import first_line
from pipeline.engine.plan import BRANCH, CONTINUE, JobPlan, effective_batch, resume_label
from pipeline.engine.stage import Stage
from pipeline.engine.stopping import REQUEUE
from pipeline.engine.tracking import copy_history, default_run_name, describe_run, latest_steps, start_or_adopt_run
from pipeline.engine.trainer import Engine, Position

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """The run a job logs into, as opened: its attempt, history and what earlier attempts left in it."""

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
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags when it was opened
    nproc: int = 1  # processes (torchrun ranks) this attempt trains with


def experiment_name(cfg: DictConfig, stage: str) -> str:
    return cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or stage


def launcher_run(cfg: DictConfig) -> str | None:
    """The run `mlflow run` created for this process, unless this job is nested under another run."""
    return None if cfg.tracking.parent_run else os.environ.get("MLFLOW_RUN_ID")


def new_lease(client: MlflowClient, run_id: str, cfg: DictConfig) -> Lease:
    return Lease(client, run_id, float(cfg.tracking.lease_timeout_seconds), float(cfg.tracking.lease_heartbeat_seconds))


# --- the attempt records (config/attempt-<n>.yaml) -----------------------------------------------


def attempt_record(
    attempt: int, started: str, source: str | None, overrides: list[str], status: str = "RUNNING"
) -> dict[str, Any]:
    """One attempt's record: when it started, from where, with which overrides, and how it ended."""
    return {"attempt": attempt, "started": started, "from": source, "overrides": overrides, "status": status}


def write_attempt(
    client: MlflowClient, run_id: str, entry: dict[str, Any], changes: dict[str, tuple[Any, Any]]
) -> None:
    """Store ``entry`` (with the config changes of its attempt) as ``config/attempt-<n>.yaml``."""
    data = dict(entry, changes={k: {"old": old, "new": new} for k, (old, new) in changes.items()})
    client.log_text(run_id, yaml.safe_dump(redact(data), sort_keys=False), f"config/attempt-{entry['attempt']}.yaml")


ATTEMPTS_SHOWN = 20  # the newest attempts a resume reads back for the description; every record stays in config/


def _attempt_number(path: str) -> int | None:
    name = Path(path).name
    if name.startswith("attempt-") and name.endswith(".yaml") and name[len("attempt-") : -len(".yaml")].isdigit():
        return int(name[len("attempt-") : -len(".yaml")])
    return None


def read_history(client: MlflowClient, run_id: str, newest: int = ATTEMPTS_SHOWN) -> tuple[list[dict[str, Any]], int]:
    """The run's newest ``newest`` attempt records (config/attempt-<n>.yaml), oldest first, and the highest attempt
    number recorded. Only those are downloaded, so a resume costs the same after 3 attempts or 300. An unreadable
    record is skipped with a warning (its number still counts)."""
    try:
        entries = client.list_artifacts(run_id, "config")
    except Exception:
        return [], 0
    numbered = sorted((n, e.path) for e in entries if (n := _attempt_number(e.path)) is not None)
    history = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, path in numbered[-newest:]:
            try:
                entry = yaml.safe_load(Path(client.download_artifacts(run_id, path, tmp)).read_text())
                int(entry["attempt"])
            except Exception as err:  # truncated, not YAML, not a record
                log.warning(
                    "Run %s: %s is unreadable (%s); the description lists the other attempts", run_id, path, err
                )
                continue
            history.append(entry)
    return sorted(history, key=lambda h: int(h["attempt"])), max((n for n, _ in numbered), default=0)


def _count_tag(tags: dict[str, str]) -> int:
    """The run's resume.count tag; 0 when missing or not a number (then the attempt records count)."""
    try:
        return max(int(tags.get(tag.RESUME_COUNT, "0")), 0)
    except ValueError:
        log.warning(
            "Tag %s=%r is not a number; attempts are counted from their records",
            tag.RESUME_COUNT,
            tags.get(tag.RESUME_COUNT),
        )
        return 0


# --- opening the run -------------------------------------------------------------------------------


def start_new_run(
    client: MlflowClient, stage: Stage, cfg: DictConfig, experiment: str, extra_tags: dict[str, str]
) -> tuple[str, str]:
    """The job's own run: the one `mlflow run` created, or a new one. Returns (id, name)."""
    tags = stage.tags()
    written = to_container(cfg)["tracking"]  # the name and tags as written: what they resolve to may be a secret
    name = written["run_name"] or (lambda run_id: default_run_name(run_id, tags[tag.MODEL], tags[tag.DATASET]))
    if cfg.tracking.parent_run:
        extra_tags = {tag.PARENT_RUN: cfg.tracking.parent_run, **extra_tags}
    all_tags = {
        tag.STAGE: stage.name,
        **tags,
        tag.RESUME_COUNT: "0",
        tag.STOP_REQUESTED: "false",
        **written["tags"],
        **extra_tags,
    }
    world = stage.dist.world_size  # the first attempt's; the tags follow later attempts
    params = {
        **flatten(to_container(cfg)),
        **stage.inputs,
        tag.WORLD_SIZE: world,
        tag.EFFECTIVE_BATCH: int(cfg.batch_size) * world,
    }
    run_id = start_or_adopt_run(
        client, experiment=experiment, run_name=name, tags=all_tags, params=params, launcher=launcher_run(cfg)
    )
    try:
        client.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(redact(to_container(cfg)))), "config/config.yaml")
    except BaseException:  # e.g. a full artifact disk: the run must not stay RUNNING with nothing to resume
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id, name(run_id) if callable(name) else name


def open_run(client: MlflowClient, stage: Stage, plan: JobPlan) -> RunContext:
    """The run the plan chose: a new run (fresh, from a checkpoint, or a branch of an older checkpoint nested
    under its run) with its first attempt, or the resumed run with its next attempt; its lease is held."""
    cfg, resume, started = plan.cfg, plan.resume, utc_now()
    if plan.mode == CONTINUE:
        return _continue_run(client, plan, started)
    if plan.mode == BRANCH:  # the original history stays untouched
        resumed_from = resume_label(cfg, resume)
        extra = {
            tag.PARENT_RUN: resume.run_id,
            tag.RESUME_BRANCH_OF: resume.run_id,
            tag.RESUME_FROM: f"{resumed_from} of run {resume.run_id}",
        }
        experiment = client.get_experiment(resume.run.info.experiment_id).name
    else:
        resumed_from = None if resume is None else resume.source
        extra = {} if resume is None else {tag.RESUME_FROM: resume.source}
        if plan.launch.auto_resume:  # a later launch with this key continues this run
            extra[tag.JOB_KEY] = plan.launch.job_key
        experiment = experiment_name(cfg, stage.name)
    run_id, name = start_new_run(client, stage, cfg, experiment, extra)
    lease = new_lease(client, run_id, cfg).acquire({}, contended=False)
    try:
        if plan.mode == BRANCH:
            copied = copy_history(client, resume.run_id, run_id, resume.step)
            log.info(
                "Branching into new run %s nested under %s (copied %d metric values up to step %d)",
                run_id,
                resume.run_id,
                copied,
                resume.step,
            )
        entry = attempt_record(1, started, resume.source if resume else None, plan.overrides)
        write_attempt(client, run_id, entry, plan.changes)
        run = client.get_run(run_id)
    except BaseException:
        lease.release()
        raise
    return RunContext(
        run_id,
        name,
        1,
        None,
        resumed_from,
        [entry],
        lease=lease,
        experiment_id=run.info.experiment_id,
        tags=dict(run.data.tags),
    )


def _continue_run(client: MlflowClient, plan: JobPlan, started: str) -> RunContext:
    """The resumed run itself: what it holds (read first: a store that cannot be read changes nothing), then
    its lease, the attempt's record and tags. The run is read again here, not taken from the plan: its lease
    is taken on its tags as they are now (a job may have started training it while this one was building)."""
    resume = plan.resume
    run_id = resume.run_id
    original = client.get_run(run_id)
    logged = latest_steps(original)
    last = logged.get("train/loss")
    index_rows = _index_rows(client, run_id, resume.step, resume.meta, original.data.tags)
    history, recorded = read_history(client, run_id)
    lease = new_lease(client, run_id, plan.cfg).acquire(original.data.tags)  # LeaseHeld while another job trains it
    try:
        attempt, resumed_from, attempt_run = _record_attempt(client, plan, original, history, recorded, lease, started)
    except BaseException:
        lease.release()
        raise
    if last is not None and last > resume.step:
        if plan.changes:
            log.warning(
                "Steps %d-%d were logged by the interrupted attempt; they are trained again with changed "
                "settings and logged again, so the charts show two values at those steps",
                resume.step + 1,
                last,
            )
            logged = {}
        else:
            log.info(
                "Steps %d-%d were logged by the interrupted attempt; training them again gives the same values, "
                "which are not logged twice",
                resume.step + 1,
                last,
            )
    return RunContext(
        run_id,
        original.info.run_name,
        attempt,
        attempt_run,
        resumed_from,
        history,
        index_rows,
        logged,
        lease,
        experiment_id=original.info.experiment_id,
        tags=dict(original.data.tags),
    )


def _index_rows(
    client: MlflowClient, run_id: str, step: int, meta: dict[str, Any], tags: dict[str, str]
) -> list[dict[str, Any]]:
    """The rows of the checkpoints up to the one resumed from: a newer one is corrupted (the resume fell back)
    or was never committed, and this job writes its step again; the one resumed from is committed, but a crash
    between the commit and the index write may have kept it out of index.csv."""
    index_rows = [row for row in read_index(client, run_id) if int(row["step"]) <= step]
    if step not in {int(row["step"]) for row in index_rows}:
        index_rows.append(index_row(meta, tags))
    # Older stored checkpoints missing from the index (the same crash, hit by a job whose successor
    # then committed a newer one) get their rows back, or retention would never delete them.
    indexed = {int(row["step"]) for row in index_rows}
    orphans = [s for s in list_checkpoints(client, run_id) if s < step and s not in indexed]
    if orphans:
        log.info(
            "Checkpoints at steps %s are stored but missing from checkpoints/index.csv; their rows are "
            "rebuilt from their meta.json",
            ", ".join(map(str, orphans)),
        )
        index_rows += rows_from_meta(client, run_id, orphans)
    return index_rows


def _record_attempt(
    client: MlflowClient,
    plan: JobPlan,
    original,
    history: list[dict[str, Any]],
    recorded: int,
    lease: Lease,
    started: str,
) -> tuple[int, str, str | None]:
    """The attempt's record first, numbered after every record there is (``recorded``: the highest number; a
    crash between the record and the tags leaves the count behind, never two attempts under one number), then
    the run's tags and the attempt run `mlflow run` made. Returns the attempt number, where it resumed from and
    the attempt run."""
    resume = plan.resume
    run_id = resume.run_id
    attempt = max(recorded, 1, _count_tag(original.data.tags) + 1) + 1
    resumed_from = resume_label(plan.cfg, resume)
    source = resumed_from if not lease.took_over else f"{resumed_from}; took over the run from {lease.took_over}"
    if plan.launch.auto_resume:
        source += f"; resume=auto, job key {plan.launch.job_key}"
    entry = attempt_record(attempt, started, source, plan.overrides)
    history.append(entry)
    write_attempt(client, run_id, entry, plan.changes)
    faults.point("startup.attempt")
    client.update_run(run_id, status="RUNNING")
    for stale in (tag.STOPPED_BY, tag.REQUEUE):  # this attempt has not been stopped (yet), nor is it waiting
        if stale in original.data.tags:
            client.delete_tag(run_id, stale)
    for key, value in {
        tag.RESUME_COUNT: str(attempt - 1),
        tag.RESUME_FROM: resumed_from,
        tag.STOP_REQUESTED: "false",
    }.items():
        client.set_tag(run_id, key, value)
    launcher = launcher_run(plan.cfg)
    if not launcher or launcher == run_id:
        return attempt, resumed_from, None
    for key, value in {
        tag.PARENT_RUN: run_id,
        tag.RUN_NAME: f"{original.info.run_name} · attempt {attempt}",
        tag.ATTEMPT_NUMBER: str(attempt),
        tag.ATTEMPT_OF: run_id,
        tag.ATTEMPT_CHECKPOINT: resume.source,
        tag.ATTEMPT_OVERRIDES: " ".join(redact(plan.overrides)) or "(none)",
        tag.ATTEMPT_CHANGES: "; ".join(f"{k}: {o} -> {n}" for k, (o, n) in plan.changes.items()) or "(none)",
    }.items():
        client.set_tag(launcher, key, value)
    return attempt, resumed_from, launcher


# --- ending the run --------------------------------------------------------------------------------


def progress_text(cfg: DictConfig, pos: Position, resumed_from: str | None, engine: Engine | None = None) -> str:
    """The `progress` tag. Epoch-based: "Epoch 5/10 · Step 150/200 · resumed from epoch 3" (Step is the
    batch in the epoch); step-based: "step 150/200 · epoch 3 · resumed from step 100"."""
    if cfg.trainer.epochs is not None and engine is not None:
        epochs = int(cfg.trainer.epochs)
        text = f"Epoch {min(pos.epoch + 1, epochs)}/{epochs} · Step {pos.batch_in_epoch}/{engine.batches_per_epoch()}"
    else:
        total = engine.total_steps if engine is not None else cfg.trainer.max_steps
        text = f"step {pos.step}/{total} · epoch {pos.epoch + 1}"
    return text + (f" · resumed from {resumed_from}" if resumed_from else "")


def finish(
    client: MlflowClient,
    ctx: RunContext,
    stage_name: str,
    cfg: DictConfig,
    status: str,
    pos: Position,
    latest: str | None,
    stopped_by: str | None,
    changes,
    engine: Engine | None = None,
) -> None:
    """End the run in the tracking store first (tags, description, status), then update the attempt's record,
    an artifact: an artifact store that cannot be written (a full disk) must not leave the run RUNNING."""
    ctx.history[-1]["status"] = status if stopped_by is None else f"{status} ({stopped_by})"
    shown = status
    if stopped_by:
        client.set_tag(ctx.run_id, tag.STOPPED_BY, stopped_by)
    if stopped_by == REQUEUE:  # SIGUSR1: the scheduler is asked to start the job again
        client.set_tag(ctx.run_id, tag.REQUEUE, "waiting")
        shown = f"{status} · waiting to be requeued"
    progress = progress_text(cfg, pos, ctx.resumed_from, engine)
    client.set_tag(ctx.run_id, tag.PROGRESS, progress)
    client.set_tag(
        ctx.run_id,
        tag.NOTE,
        describe_run(
            stage=stage_name,
            run_id=ctx.run_id,
            progress=progress,
            status=shown,
            latest_checkpoint=latest,
            history=ctx.history,
            experiment_id=ctx.experiment_id,
            nproc=ctx.nproc,
            batch=effective_batch(cfg, ctx.nproc),
            job_key=ctx.tags.get(tag.JOB_KEY, ""),
        ),
    )
    client.set_terminated(ctx.run_id, status)
    if ctx.attempt_run_id:
        client.set_terminated(ctx.attempt_run_id, status)
    launcher = launcher_run(cfg)
    if launcher and status == "KILLED":
        status_guard.spawn(launcher, status)  # `mlflow run` would turn KILLED into FAILED
    try:
        faults.point("finish.record")
        write_attempt(client, ctx.run_id, ctx.history[-1], changes)
    except Exception as err:  # the artifact store's own exception types vary
        log.error(
            "Run %s is ended %s, but its attempt record config/attempt-%d.yaml could not be updated (%s); it "
            "still says RUNNING",
            ctx.run_id,
            status,
            ctx.attempt,
            first_line(err),
        )
