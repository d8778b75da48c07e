"""One job from the command line to a finished run, on every rank: plan, build, open the run, train.

``run_stage(StageClass, argv)`` is what every training entry point calls (``main`` from the command
line). Rank 0 plans the job (engine/plan.py), builds the stage, opens the run (engine/attempts.py) and
trains in it (engine/job.py); under torchrun the other ranks get the plan from it, build their own stage
and train their share of the data (docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.engine import launcher_watch, startup
from pipeline.engine import tags as tag
from pipeline.engine.attempts import RunContext, experiment_name, open_run
from pipeline.engine.auto_resume import AlreadyFinished
from pipeline.engine.cli import EXIT_OK, EXIT_REQUEUE, EXIT_STOPPED, exit_now, setup_logging
from pipeline.engine.distributed import Dist, handed_over_run, max_restarts, remember_run, restart_count
from pipeline.engine.job import TrainingHooks, train_in_run, train_other_rank
from pipeline.engine.outage import configure_http
from pipeline.engine.outcomes import (
    REFUSED_WHILE_BUILDING,
    REFUSED_WHILE_OPENING,
    REFUSED_WHILE_PLANNING,
    STORAGE_FAILED,
    refusal_of,
)
from pipeline.engine.plan import JobPlan, plan_job
from pipeline.engine.stage import Precision, Stage
from pipeline.engine.tracking import access_error, check_access

log = logging.getLogger(__name__)

__all__ = ["TrainingHooks", "main", "plan_job", "run_stage", "seed_everything", "torch_deterministic"]


def main(stage_cls: type[Stage]) -> None:
    """The command-line entry of a training stage (``python -m pipeline.stages.<stage> key=value ...``)."""
    dist = Dist.from_env()
    setup_logging(dist.rank)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until training starts (the engine's stop handler takes it then)
    launcher_watch.watch()  # a job whose launcher is gone stops as if it had been sent SIGTERM
    code = run_stage(stage_cls, sys.argv[1:], continue_run=_elastic_restart_run() if dist.is_main else None)
    if code in (EXIT_STOPPED, EXIT_REQUEUE) and max_restarts() > 0:
        # torchrun's agent restarts a group whose worker exits non-zero: a run stopped on purpose (the stop tag, a
        # pruned trial, SIGUSR1) would be resumed at once. The run's status (KILLED), its stopped_by tag and the
        # requeue tag say it was stopped.
        code = EXIT_OK
    exit_now(code, dist)


def run_stage(
    stage_cls: type[Stage], argv: list[str], hooks: TrainingHooks | None = None, continue_run: str | None = None
) -> int:
    """Entry point body of every training stage: plan, build, open the run, train in it; returns the exit
    code (EXIT_ABORTED after a second signal: the command-line entry then exits at once, see exit_now).
    ``continue_run``: the run an elastic restart continues from its latest checkpoint, whatever ``argv`` says.

    Under torchrun every rank runs this: rank 0 plans, opens the run and talks to MLflow, the other ranks
    get the plan from it and train their share (docs/distributed.md)."""
    startup.begin()
    dist = Dist.from_env()
    setup_logging(dist.rank)
    configure_http()  # short HTTP retries: the engine retries what it must store (engine/outage.py)
    dist.init()  # once per process: a sweep's trials share the process group
    client, plan, code = _plan(stage_cls, argv, dist, continue_run)
    if code != EXIT_OK or plan is None:  # refused, or nothing to train (resume=auto: the key's run is finished)
        return code
    try:
        return _run_rank(stage_cls, client, plan, hooks, dist)
    finally:
        if dist.is_main and plan.resume is not None:
            plan.resume.remove_download()  # every rank has read it by now (resume.rank_state)


def _plan(
    stage_cls: type[Stage], argv: list[str], dist: Dist, continue_run: str | None
) -> tuple[MlflowClient | None, JobPlan | None, int]:
    """Rank 0 plans the job; the other ranks get the plan without the checkpoint's state (they read the
    verified checkpoint files themselves)."""
    client, plan, code = None, None, EXIT_OK
    if dist.is_main:
        try:
            client = MlflowClient()
            check_access(client)
            plan = plan_job(stage_cls, argv, client, continue_run)
        except AlreadyFinished as err:
            log.info("%s", err)
            if os.environ.get("MLFLOW_RUN_ID"):  # the run `mlflow run` made for this launch says why it is empty
                client.set_tag(os.environ["MLFLOW_RUN_ID"], tag.NOTE, str(err))
        except Exception as err:
            refused = refusal_of(err, REFUSED_WHILE_PLANNING)
            if refused is None:
                raise
            log.error("%s", err)
            code = refused.code
    shared, code = dist.broadcast((plan.for_other_ranks() if plan else None, code))
    return client, plan if dist.is_main else shared, code  # plan None with EXIT_OK: nothing to train


def _elastic_restart_run() -> str | None:
    """In a group torchrun restarted (``--max-restarts``): the run the failed group trained, which this one
    continues from its latest committed checkpoint (its ID is in torchrun's rendezvous store). This is the one
    automatic resume; a job's first group starts as asked."""
    run_id = handed_over_run()
    if run_id is not None:
        log.warning(
            "Elastic restart %d of at most %d: continuing run %s from its latest committed checkpoint",
            restart_count(),
            max_restarts(),
            run_id,
        )
    return run_id


def _run_rank(
    stage_cls: type[Stage], client: MlflowClient | None, plan: JobPlan, hooks: TrainingHooks | None, dist: Dist
) -> int:
    startup.mark("config")
    cfg = plan.cfg
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch_deterministic()
    seed_everything(int(cfg.seed) + dist.rank)  # rank 0 draws what one process would; the others their own streams
    stage, code = _build_on_every_rank(stage_cls, plan, dist)
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
    return train_in_run(client, stage, plan, ctx, hooks or TrainingHooks())


def _build_on_every_rank(stage_cls: type[Stage], plan: JobPlan, dist: Dist) -> tuple[Stage | None, int]:
    """Rank 0 builds first: what it pins while building (finetune_vocoder's adapter checkpoint step) is what the
    other ranks then build with, even if an input run commits a newer checkpoint in between."""
    precision = replace(plan.precision, device=dist.device(plan.precision.device))
    stage, code, inputs = None, EXIT_OK, plan.inputs
    if dist.is_main:
        stage, code = _build(stage_cls, plan, precision, dist, inputs)
    code, inputs = dist.broadcast((code, stage.inputs if stage else inputs))
    if code == EXIT_OK and not dist.is_main:
        stage, code = _build(stage_cls, plan, precision, dist, inputs)
    return stage, max(dist.all_gather(code))  # a rank that cannot build stops them all


def _build(
    stage_cls: type[Stage], plan: JobPlan, precision: Precision, dist: Dist, inputs: dict[str, str]
) -> tuple[Stage | None, int]:
    """The stage with its parts built, or the exit code of why it cannot be."""
    stage = stage_cls(plan.cfg, precision, inputs=inputs, resuming=plan.resume is not None, dist=dist)
    try:
        stage.build()
        stage.check_data()  # e.g. a batch larger than the training set: refused before the run is opened
    except Exception as err:
        refused = refusal_of(err, REFUSED_WHILE_BUILDING)
        if refused is None:
            raise
        log.error("%s", err)
        return None, refused.code
    return stage, EXIT_OK


def _open(client: MlflowClient, stage: Stage, plan: JobPlan) -> tuple[RunContext | None, int]:
    """The job's run (fresh, resumed or a branch), or the exit code of why it cannot be opened."""
    resume = plan.resume
    if resume is None:
        log.info("Starting fresh training (no checkpoint specified)")
    else:
        log.info("Resuming from %s", resume.source)
        log.info("Resuming from step %d", resume.step)
    try:
        return _open_run(client, stage, plan), EXIT_OK
    except Exception as err:
        refused = refusal_of(err, REFUSED_WHILE_OPENING)
        if refused is None:
            raise
        if refused is STORAGE_FAILED:
            log.error("Cannot write the run's files to the artifact store: %s; nothing was trained", err)
        else:
            log.error("%s", err)
        return None, refused.code


def _open_run(client: MlflowClient, stage: Stage, plan: JobPlan) -> RunContext:
    """open_run, with a refusal by the server's auth (401/403) raised as an AccessError naming what was refused."""
    try:
        return open_run(client, stage, plan)
    except MlflowException as err:
        what = (
            f"write runs in experiment {experiment_name(plan.cfg, stage.name)!r}"
            if plan.resume is None
            else f"write to run {plan.resume.run_id}"
        )
        refused = access_error(err, what)
        if refused is None:
            raise
        raise refused from None


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
