"""The three kinds of training job, each a ``Job`` (engine/collaborators.py: its collaborators closed in the
reverse order of their creation), and how each ends (engine/outcomes.py).

Rank 0 trains in the opened run (``train_in_run``, a ``RunJob``): it adds the lease, the system-metrics monitor
and the tag writer, and always ends the run, with its status, progress, description and attempt record. The
other ranks under torchrun train their share with no MLflow (``train_other_rank``); ``import_checkpoint`` has the
engine write an imported checkpoint into a run of its own (``record_imported_run``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipeline.common.provenance import utc_now
from pipeline.config import flatten, to_container
from pipeline.engine import startup
from pipeline.engine import tags as tag
from pipeline.engine.attempts import (
    RunContext,
    attempt_record,
    experiment_name,
    finish,
    launcher_run,
    progress_text,
    start_new_run,
    write_attempt,
)
from pipeline.engine.checkpoint_files import checkpoint_name
from pipeline.engine.checkpointing import download_checkpoint
from pipeline.engine.collaborators import Job
from pipeline.engine.lease import FencedClient
from pipeline.engine.logged_models import CheckpointModels
from pipeline.engine.outage import first_line
from pipeline.engine.outcomes import (
    ABORTED,
    DATA_FAILED,
    DIVERGED,
    FAILED,
    FINISHED,
    LEASE_LOST,
    STORAGE_FAILED,
    Outcome,
    exit_code,
    outcome_of,
    outcome_of_stop,
)
from pipeline.engine.plan import JobPlan, effective_batch
from pipeline.engine.private_apis import start_system_metrics
from pipeline.engine.senders import TagWriter
from pipeline.engine.stage import Stage
from pipeline.engine.tracking import (
    dashboard_hint,
    describe_run,
    ensure_runs_view,
    log_dataset_inputs,
    resume_command,
)
from pipeline.engine.trainer import Engine, Position

log = logging.getLogger(__name__)


class TrainingHooks:
    """Callbacks for code that drives training in-process (e.g. a sweep trial)."""

    def on_run_started(self, run_id: str) -> None:
        """The job's MLflow run is chosen and set up."""

    def on_validation(self, step: int, metrics: dict[str, float]) -> str | None:
        """After each validation; return a reason (e.g. "pruned") to stop like a stop request."""
        return None


def train_other_rank(stage: Stage, plan: JobPlan, run_id: str) -> int:
    """A rank other than 0 under torchrun: the same loop on its share of the data, with no MLflow (rank 0
    logs, checkpoints and polls the stop tag; a signal here stops every rank at the same step)."""
    with Job(stage, run_id) as job:
        stopper = job.open_stopper(0)
        try:
            job.engine = Engine(stage, None, None, stopper, run_id)
            job.restore(plan.resume, stage.dist)
            result = job.engine.fit()
            stopper.abortable = False
            job.outcome = outcome_of_stop(result.stopped_by)
        except BaseException as err:
            outcome = outcome_of(err)
            if outcome not in (ABORTED, DIVERGED, DATA_FAILED):
                raise  # nothing else is expected of a rank that writes nothing (no store, no lease)
            if outcome is not ABORTED:
                log.error("%s", err)
            job.outcome = outcome
    return exit_code(job.outcome, plan.launch.requeue, rank0=False)


def record_imported_run(stage: Stage, cfg, tags: dict[str, str], source: str) -> str:
    """A FINISHED run of ``stage`` whose one committed checkpoint (step 0) holds the stage's weights as
    they are now, written by the engine itself: the run then trains on (``resume_run`` with a larger
    ``trainer.max_steps``), feeds other stages and is browsed like any run trained here."""
    client = MlflowClient()
    run_id, _ = start_new_run(client, stage, cfg, experiment_name(cfg, stage.name), tags)
    try:
        with Job(stage, run_id, client) as job:
            job.open_logging()
            Engine(stage, job.metrics, job.store, stopper=None, run_id=run_id).save_checkpoint()
            job.drain()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    entry = attempt_record(1, utc_now(), f"imported from {source}", [], status="FINISHED")
    write_attempt(client, run_id, entry, {})
    progress = "step 0 · imported"
    client.set_tag(run_id, tag.PROGRESS, progress)
    client.set_tag(
        run_id,
        tag.NOTE,
        describe_run(
            stage=stage.name,
            run_id=run_id,
            progress=progress,
            status="FINISHED",
            latest_checkpoint=f"checkpoints/{checkpoint_name(0)}",
            history=[entry],
            experiment_id=client.get_run(run_id).info.experiment_id,
        ),
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id


class RunJob(Job):
    """Rank 0's job: trains in the opened run and always ends it (status, stopped_by, progress, description,
    the attempt record), whatever happens; the lease is released last."""

    def __init__(self, client: MlflowClient, stage: Stage, plan: JobPlan, ctx: RunContext, hooks: TrainingHooks):
        super().__init__(stage, ctx.run_id, client)
        self.plan, self.ctx, self.hooks = plan, ctx, hooks
        self.stopped_by: str | None = None
        self.resume_command = resume_command(stage.name, ctx.run_id, ctx.nproc)
        self.shown = {"progress": ctx.tags.get(tag.PROGRESS, ""), "latest": ctx.tags.get(tag.CHECKPOINT_LATEST)}
        self.models: CheckpointModels | None = None
        self.monitor = None
        self.tag_writer: TagWriter | None = None
        if ctx.lease is not None:
            self.stack.callback(ctx.lease.release)
            self.client = FencedClient(client, ctx.lease)  # after a takeover this job writes nothing more to the run

    def train(self) -> int:
        """Set the run up, open the collaborators, train; the exit code."""
        self._set_up_run()
        self.open_stopper(self.cfg.tracking.stop_poll_seconds)
        self.stack.callback(self._end_run)
        outage_limit = float(self.cfg.tracking.outage_limit_seconds)
        models = self.models
        self.open_logging(
            index_rows=self.ctx.index_rows,
            on_commit=self._on_commit,
            outage_limit_s=outage_limit,
            fence=self.ctx.lease.fence if self.ctx.lease else None,
            already_logged=self.ctx.logged_steps,
            on_delete=models.deleted if models else None,
            on_save=models.link if models else None,
            on_abandon=models.abandoned if models else None,
        )
        self.stack.callback(self._drain)
        self.monitor = _system_metrics(self.run_id, self.cfg, resumed=self.plan.resume is not None)
        self.stack.callback(self._stop_monitor)
        self.tag_writer = TagWriter(self.client, self.run_id)  # the progress tag and the description, off the loop
        self.stack.callback(self.tag_writer.close, timeout=5.0)  # before _end_run sets the final progress itself
        if self.ctx.lease is not None:
            self.ctx.lease.on_lost = self._on_lease_lost
        self.stack.callback(self._end_training)
        self._fit()
        return self.code

    def _set_up_run(self) -> None:
        client, ctx, cfg = self.client, self.ctx, self.cfg
        self.hooks.on_run_started(ctx.run_id)
        datasets = self.stage.dataset_inputs()
        if datasets:
            log_dataset_inputs(client, ctx.run_id, datasets, "training")
        ensure_runs_view(client, ctx.experiment_id)  # the columns the experiment's links open
        if cfg.tracking.checkpoint_models:
            self.models = CheckpointModels(
                client, ctx.run_id, ctx.experiment_id, ctx.run_name, flatten(to_container(cfg)), ctx.tags
            )
            resume = self.plan.resume
            if resume is not None and resume.run_id == ctx.run_id:  # what an earlier attempt left half made
                latest = ctx.tags.get(tag.CHECKPOINT_LATEST_STEP, "").strip()
                self.models.resumed(max(resume.step, int(latest) if latest.isdigit() else -1))
        client.set_tag(ctx.run_id, tag.WORLD_SIZE, str(ctx.nproc))
        client.set_tag(ctx.run_id, tag.EFFECTIVE_BATCH, str(int(cfg.batch_size) * ctx.nproc))
        client.set_tag(ctx.run_id, tag.NOTE, self._description())

    def _fit(self) -> None:
        """The training loop; how it ended (engine/outcomes.py) decides the run's status and the exit code."""
        try:
            self.engine = Engine(self.stage, self.metrics, self.store, self.stopper, self.run_id, hooks=self.hooks)
            self.engine.on_progress = self._on_progress
            startup.mark("run setup")
            self.restore(self.plan.resume, self.stage.dist)
            result = self.engine.fit()
            self.stopper.abortable = False
            self._trained(result)
        except BaseException as err:
            outcome = outcome_of(err)
            self._report(outcome, err)
            if outcome is FAILED:
                raise  # an error of no known kind: the outcome stays FAILED, or what the loop's end decided
            self._ended(outcome)

    def _ended(self, outcome: Outcome) -> None:
        """The job ended so: the run's status and the exit code, and the outcome's tags set on the run now."""
        self.outcome = outcome
        self.stopped_by = outcome.stopped_by or self.stopped_by
        for key, value in outcome.tags.items():
            self.client.set_tag(self.run_id, key, value)

    def _report(self, outcome: Outcome, err: BaseException) -> None:
        """Say why the job ended by ``err`` and, where a resume helps, how to resume it."""
        if outcome is STORAGE_FAILED:
            self._log_storage_failure(err)
        elif outcome is DATA_FAILED:
            log.error("%s. Stopped at step %d; resume with: %s", err, self.pos.step, self.resume_command)
        elif outcome is FAILED:
            log.exception("Training failed")
        elif outcome is not ABORTED:  # non-finite training; a lost lease (the run is the other job's now)
            log.error("%s", err)

    def _trained(self, result) -> None:
        self.stopped_by = result.stopped_by
        step = result.position.step
        self._ended(outcome_of_stop(self.stopped_by))
        if self.stopped_by:
            hint = "the same command with resume=auto (a requeued job) or: " if self.plan.launch.auto_resume else ""
            log.warning(
                "Stopped (%s) at step %d; checkpoint committed. Resume with: %s%s",
                self.stopped_by,
                step,
                hint,
                self.resume_command,
            )
            if launcher_run(self.cfg):
                log.warning(
                    '`mlflow run` reports every exit code but 0 as "failed"; this job exits %d because it '
                    "was stopped on request: its run is KILLED, not FAILED, and resumes as above",
                    self.code,
                )
            return
        log.info("Training finished at step %d", step)
        if (
            self.cfg.tracking.log_model
            and _log_final_model(self.client, self.run_id, self.stage, step)
            and self.models is not None
        ):
            self.models.final(step, self.metrics.at_step(step))

    # --- callbacks while training ------------------------------------------------------------------
    def _description(self) -> str:
        ctx = self.ctx
        return describe_run(
            stage=self.stage.name,
            run_id=ctx.run_id,
            progress=self.shown["progress"],
            status="RUNNING",
            latest_checkpoint=self.shown["latest"],
            history=ctx.history,
            experiment_id=ctx.experiment_id,
            nproc=ctx.nproc,
            batch=effective_batch(self.cfg, ctx.nproc),
            job_key=ctx.tags.get(tag.JOB_KEY, ""),
        )

    def _on_progress(self, pos: Position) -> None:  # the description follows the progress tag, in the same batch
        self.shown["progress"] = progress_text(self.cfg, pos, self.ctx.resumed_from, self.engine)
        self.tag_writer.set({tag.PROGRESS: self.shown["progress"], tag.NOTE: self._description()})

    def _on_commit(self, step: int, row: dict[str, Any], link) -> None:
        self.shown["latest"] = f"checkpoints/{checkpoint_name(step)}"
        self.tag_writer.set({tag.NOTE: self._description()})
        if self.models is not None:
            self.models.committed(step, row, link)

    def _on_lease_lost(self) -> None:
        self.stopper.request("lease lost")
        self._stop_monitor()  # MLflow's system metrics are written with a client of their own

    # --- closers, in the order they run ------------------------------------------------------------
    def _end_training(self) -> None:
        self.stopper.abortable = False  # ending the run takes a second; a signal now must not cut it

    def _stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()

    def _drain(self) -> None:
        """The uploads and metrics still queued, unless the user aborted: then do not wait for them."""
        if self.outcome is ABORTED:
            return
        try:
            self.drain()
        except Exception as err:
            outcome = outcome_of(err)
            if outcome is STORAGE_FAILED:
                self._log_storage_failure(err)
            elif outcome is not LEASE_LOST:
                log.exception("Could not finish the checkpoint upload or metric logging")
                outcome = FAILED
            self.outcome = outcome

    def _end_run(self) -> None:
        """End the run as the job ended, unless another job took it over."""
        self.stopper.abortable = False
        ctx, status = self.ctx, self.outcome.status
        if ctx.lease is not None and not ctx.lease.held:
            log.error(
                "Run %s is trained by another job now; this job leaves its status and description to it", ctx.run_id
            )
            self.outcome = LEASE_LOST
            return
        try:
            latest = self.client.get_run(ctx.run_id).data.tags.get(tag.CHECKPOINT_LATEST)
            finish(
                self.client,
                ctx,
                self.stage.name,
                self.cfg,
                status,
                self.pos,
                latest,
                self.stopped_by,
                self.plan.changes,
                self.engine,
            )
            log.info(
                "Run %s ended %s. Dashboard: %s", ctx.run_id, status, dashboard_hint(ctx.experiment_id, ctx.run_id)
            )
        except Exception as err:  # the tracking store is down: the run stays RUNNING, a resume ends it
            log.error(
                "Could not end run %s as %s in the tracking store (%s); it shows RUNNING until a resume ends it: %s",
                ctx.run_id,
                status,
                first_line(err),
                self.resume_command,
            )
            if self.outcome is FINISHED:  # trained to the end, but the run shows RUNNING: exit as a storage failure
                self.outcome = STORAGE_FAILED

    def _log_storage_failure(self, err: Exception) -> None:
        try:
            kept = self.client.get_run(self.run_id).data.tags.get(tag.CHECKPOINT_LATEST_STEP)
            kept = (
                f"the committed checkpoint at step {kept} (still the latest)"
                if kept
                else "no checkpoint was committed yet"
            )
        except Exception:  # the tracking store does not answer either
            kept = (
                "the checkpoints committed before (the tracking store does not answer: the latest cannot be named now)"
            )
        log.error(
            "%s. Stopped at step %d. Kept: %s. When the storage is fixed, resume with: %s",
            err,
            self.pos.step,
            kept,
            self.resume_command,
        )


def train_in_run(client: MlflowClient, stage: Stage, plan: JobPlan, ctx: RunContext, hooks: TrainingHooks) -> int:
    """Train ``stage`` in the opened run and always end the run, whatever happens; returns the exit code. A stop
    to be requeued with ``requeue=scontrol`` then asks Slurm to requeue the job (0 once it has)."""
    with RunJob(client, stage, plan, ctx, hooks) as job:
        job.train()
    return exit_code(job.outcome, plan.launch.requeue)


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


def _system_metrics(run_id: str, cfg, resumed: bool):
    if not cfg.tracking.system_metrics:
        return None
    try:
        return start_system_metrics(run_id, sampling_interval=10, resumed=resumed)
    except Exception as err:  # optional: never block training on it
        log.warning("System metrics disabled: %s", err)
        return None
