"""How a job ended, in one table: the run's MLflow status, the tags that say so, and the process's exit code
(docs/architecture.md, Outcomes).

Code that ends a job looks its outcome up here instead of choosing a status and an exit code where it catches an
error: the training job (engine/job.py) by ``outcome_of(err)`` or ``outcome_of_stop(stopped_by)``, the session's
refusals before a run is trained (engine/session.py) by ``refusal_of(err, REFUSED_WHILE_...)``, and the corpus
cleaning job (clean_corpus.py) ends its runs with the same outcomes. ``exit_code`` is what the process exits with,
the one place where Slurm's ``scontrol requeue`` is asked for.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.config import ConfigError
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.cli import (
    EXIT_ABORTED,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_STOPPED,
    EXIT_STORAGE,
)
from pipeline.engine.lease import LeaseHeld, LeaseLost
from pipeline.engine.outage import StorageError
from pipeline.engine.resume import ResumeError
from pipeline.engine.stopping import REQUEUE, AbortTraining
from pipeline.engine.tracking import AccessError
from pipeline.engine.trainer import DataWorkerDied, NonFiniteTraining

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # each outcome is one object: compared with ``is``
class Outcome:
    """One way a job can end."""

    name: str
    status: str | None  # the run's MLflow status; None: the job leaves its run as it is (none, or another job's)
    code: int  # the process's exit code (engine/cli.py)
    tags: Mapping[str, str] = field(default_factory=dict)  # set on the run as soon as the job ends so
    stopped_by: str | None = None  # the ``stopped_by`` tag it always has; a stop on request has the request's

    def __repr__(self) -> str:
        return f"Outcome({self.name})"


# A stopped run's ``stopped_by`` tag (and a requeued one's ``requeue=waiting``) is written when the run is ended
# (attempts.finish); a stop is resumable from its last checkpoint.
FINISHED = Outcome("finished", "FINISHED", EXIT_OK)
STOPPED = Outcome("stopped", "KILLED", EXIT_STOPPED)  # on request: a signal, the stop tag, a pruned trial
REQUEUED = Outcome("requeued", "KILLED", EXIT_REQUEUE, stopped_by=REQUEUE)  # SIGUSR1 (a pre-emption)
ABORTED = Outcome("aborted", "KILLED", EXIT_ABORTED, tags={tag.STOP_ABORTED: "true"}, stopped_by="signal")
BAD_INPUT = Outcome("bad input", None, EXIT_BAD_INPUT)  # refused before any run was written
DIVERGED = Outcome("non-finite training", "FAILED", EXIT_FAILED)  # losses or gradients kept being non-finite
DATA_FAILED = Outcome("failed by data", "FAILED", EXIT_FAILED)  # a data loader worker died; resumable
STORAGE_FAILED = Outcome("storage kept failing", "FAILED", EXIT_STORAGE)  # resumable once the storage is fixed
LEASE_LOST = Outcome("lost its lease", None, EXIT_FAILED)  # another job took the run over: its status is theirs
FAILED = Outcome("failed", "FAILED", EXIT_FAILED)  # any other error (a bug): raised with its traceback

# What an error raised while a job trains means; any other error is FAILED.
RAISED_WHILE_TRAINING: dict[type[BaseException], Outcome] = {
    AbortTraining: ABORTED,
    NonFiniteTraining: DIVERGED,
    DataWorkerDied: DATA_FAILED,
    StorageError: STORAGE_FAILED,
    LeaseLost: LEASE_LOST,
}

# The errors that refuse a job before it trains, at each step of the session; any other error is raised.
REFUSED_WHILE_PLANNING: dict[type[BaseException], Outcome] = {
    ConfigError: BAD_INPUT,
    ResumeError: BAD_INPUT,
    CheckpointError: BAD_INPUT,
    ValueError: BAD_INPUT,
    AccessError: BAD_INPUT,
    LeaseHeld: BAD_INPUT,
}
REFUSED_WHILE_BUILDING: dict[type[BaseException], Outcome] = {ValueError: BAD_INPUT, OSError: BAD_INPUT}
REFUSED_WHILE_OPENING: dict[type[BaseException], Outcome] = {
    LeaseHeld: BAD_INPUT,
    AccessError: BAD_INPUT,  # the server's auth refused to write the run
    CheckpointError: FAILED,
    OSError: STORAGE_FAILED,  # the artifact store cannot be written (a full or read-only disk)
}


def outcome_of(err: BaseException) -> Outcome:
    """How a job that was training ended when ``err`` was raised: RAISED_WHILE_TRAINING's outcome, else FAILED."""
    return _look_up(err, RAISED_WHILE_TRAINING) or FAILED


def refusal_of(err: BaseException, refusals: Mapping[type[BaseException], Outcome]) -> Outcome | None:
    """The outcome of a job refused by ``err`` (``refusals``: one of the REFUSED_WHILE_... tables), or None
    when ``err`` is not a refusal and should be raised."""
    return _look_up(err, refusals)


def _look_up(err: BaseException, table: Mapping[type[BaseException], Outcome]) -> Outcome | None:
    """The outcome of ``err``'s own class or of the nearest base class ``table`` names."""
    for cls in type(err).__mro__:
        if cls in table:
            return table[cls]
    return None


def outcome_of_stop(stopped_by: str | None) -> Outcome:
    """How a training loop that ran to its end (None) or stopped for ``stopped_by`` ended."""
    if stopped_by is None:
        return FINISHED
    return REQUEUED if stopped_by == REQUEUE else STOPPED


def exit_code(outcome: Outcome, requeue: str, rank0: bool = True) -> int:
    """The process's exit code: the outcome's, but for a job requeued with ``requeue=scontrol`` rank 0 asks Slurm
    to requeue the job (0 once it has) and the other ranks exit 0 (a non-zero exit would make torchrun end rank 0
    before it could)."""
    if outcome is not REQUEUED or requeue != "scontrol":
        return outcome.code
    return scontrol_requeue() if rank0 else EXIT_OK


def scontrol_requeue() -> int:
    """``scontrol requeue $SLURM_JOB_ID``, once the run is ended and its lease released: EXIT_OK when Slurm took
    the request (it then ends this job and starts it again), else EXIT_REQUEUE with the reason logged."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        log.error(
            "requeue=scontrol, but this job is not a Slurm job (SLURM_JOB_ID is not set): exiting with code %d "
            "for the caller to requeue it",
            EXIT_REQUEUE,
        )
        return EXIT_REQUEUE
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("Could not run `scontrol requeue %s` (%s): exiting with code %d", job_id, err, EXIT_REQUEUE)
        return EXIT_REQUEUE
    if done.returncode != 0:
        log.error(
            "`scontrol requeue %s` failed (%s): exiting with code %d (is the job submitted with --requeue?)",
            job_id,
            (done.stderr or done.stdout).strip(),
            EXIT_REQUEUE,
        )
        return EXIT_REQUEUE
    log.warning("Asked Slurm to requeue job %s: it starts again and continues this run (resume=auto)", job_id)
    return EXIT_OK
