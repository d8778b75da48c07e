"""Auto-resume by job key: a job that a scheduler restarts continues its own run (docs/distributed.md, Slurm).

A batch script that Slurm requeues (pre-emption, ``scontrol requeue``, a node failure) starts again with the same
command and the same ``SLURM_JOB_ID``, but knows no MLflow run ID. With ``resume=auto`` the job looks for the
run of its stage tagged ``job.key=<key>`` (``job_key=<name>``, by default ``slurm:<cluster>:<job id>``):

- none: start a new run, tagged with the key (a fresh start, or ``resume_from=`` as given);
- one that is not FINISHED: resume it exactly as ``resume_run=<its id>`` would (same run, same lease rules);
- one that is FINISHED: nothing to train; the job says so and exits 0;
- one with no committed checkpoint (its first job died before the first checkpoint): if its job is gone, the
  run is ended FAILED, its key moved to ``job.key.abandoned``, and a new run starts; if it is alive, refused;
- two or more: refused, naming them (a key must name one run).

Without ``resume=auto`` nothing here runs: a job starts fresh unless it is given a run ID.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipeline.engine import tags as tag
from pipeline.engine.launch import LaunchArgs
from pipeline.engine.lease import LeaseHeld, held_by_live_job, run_timeout
from pipeline.engine.resume import LEASE_TIMEOUT_S, ResumeError, RunCheckpoints

log = logging.getLogger(__name__)

ABANDONED_KEY = "job.key.abandoned"  # the key of a run that died before its first checkpoint


class AlreadyFinished(Exception):
    """The job key's run is FINISHED: nothing to train (the job exits 0 and says so)."""


def keyed_runs(client: MlflowClient, stage: str, key: str) -> list:
    """The active runs of ``stage`` tagged with ``key``, in every experiment (a key names one run anywhere)."""
    experiments, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        experiments += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    if not experiments:
        return []
    found = f"tags.`{tag.JOB_KEY}` = '{key}' AND tags.`{tag.STAGE}` = '{stage}'"
    return list(
        client.search_runs(
            experiments,
            found,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10,
            order_by=["attributes.start_time ASC"],
        )
    )


def apply(client: MlflowClient, stage: str, launch: LaunchArgs) -> LaunchArgs:
    """The launch arguments with the job key's run to resume filled in (``resume_run``), unchanged when the key
    has no run yet; AlreadyFinished, ResumeError (several runs) or LeaseHeld (a live job without checkpoint)."""
    if not launch.auto_resume:
        return launch
    key = launch.job_key
    runs = keyed_runs(client, stage, key)
    if len(runs) > 1:
        raise ResumeError(
            f"Job key {key!r} names {len(runs)} runs of {stage}: "
            + ", ".join(f"{r.info.run_id} ({r.info.status})" for r in runs)
            + f". A key must name one run: delete the runs that are not this job's, or remove their "
            f"{tag.JOB_KEY} tag, or give this job another job_key"
        )
    if not runs:
        log.info("Job key %s: no run of %s has it yet; starting a new run tagged %s=%s", key, stage, tag.JOB_KEY, key)
        return launch
    run = runs[0]
    run_id, status, tags = run.info.run_id, run.info.status, run.data.tags
    if status == "FINISHED":
        raise AlreadyFinished(
            f"Job key {key}: run {run_id} of {stage} is already FINISHED ({tags.get(tag.PROGRESS, 'done')}); nothing "
            f"to train. To train it further: resume_run={run_id} with a larger trainer.max_steps"
        )
    if not tags.get(tag.CHECKPOINT_LATEST_STEP):
        _abandon(client, run, stage, key)
        return launch
    log.info(
        "Job key %s: resuming run %s of %s (%s, left %s)",
        key,
        run_id,
        stage,
        tags.get(tag.PROGRESS, "no progress yet"),
        status,
    )
    return replace(launch, resume_run=run_id, resume_from=None)


def _abandon(client: MlflowClient, run, stage: str, key: str) -> None:
    """A keyed run without a committed checkpoint: nothing to resume from. Refused while its job is alive;
    otherwise it gives its key up and is ended FAILED, as a resume of it would end it, and this job starts a new
    run with the key."""
    run_id, tags = run.info.run_id, run.data.tags
    if held_by_live_job(tags, run_timeout(run, LEASE_TIMEOUT_S)):
        raise LeaseHeld(
            f"Job key {key}: run {run_id} is being trained by another job ({tags.get('lease.holder')}) "
            "and has no checkpoint yet. Only one job may train a run at a time: stop that job, or give "
            "this one another job_key"
        )
    log.warning(
        "Job key %s: run %s ended before its first checkpoint (left %s); a new run starts with the key",
        key,
        run_id,
        run.info.status,
    )
    client.set_tag(run_id, ABANDONED_KEY, key)
    client.delete_tag(run_id, tag.JOB_KEY)
    RunCheckpoints(client, run_id, (stage,)).end_if_abandoned()  # FAILED, saying why on the run, if left RUNNING
