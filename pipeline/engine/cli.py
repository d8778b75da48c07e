"""What every command-line entry point shares: its exit codes, its logging set-up, and how it exits.

Light on purpose (no MLflow, no torch): the launcher and the entry points import it before anything heavy.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline.config import RedactingFilter

# The exit codes of every entry point (README, "Exit codes"; docs/reliability.md)
EXIT_OK = 0  # done
EXIT_FAILED = 1  # the job failed; its run says why
EXIT_BAD_INPUT = 2  # bad input (a run ID, a config, a file) refused before anything was written
EXIT_STOPPED = 3  # stopped on request (a signal, the stop tag, a pruned trial); resumable
EXIT_STORAGE = 4  # the tracking or artifact store kept failing; resumable
EXIT_REQUEUE = 75  # stopped by SIGUSR1 (pre-emption) with a checkpoint: requeue the job (Slurm: RequeueExit=75)
EXIT_ABORTED = 130  # a second signal: stopped at once, without the checkpoint


def setup_logging(rank: int = 0) -> None:
    """INFO on stderr; under torchrun, ranks other than 0 say only warnings and errors, marked with their rank."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    marker = f"[rank {rank}] " if rank else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s {marker}%(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # no secret reaches the log, whichever logger writes it
    for noisy in ("alembic", "mlflow.store", "urllib3", "botocore", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_now(code: int, dist=None) -> None:
    """End the process with ``code``; after an abort (a second signal), without waiting for the checkpoint
    upload thread: the user asked to stop now. Only command-line entry points call this.

    A torchrun worker leaves the process group first and then exits without the interpreter's clean-up:
    everything of the run is stored and ended by then, and a gloo or DDP object freed during that clean-up can
    abort the process ("terminate called without an active exception"), which torchrun reports as a failure."""
    if dist is not None and dist.enabled:
        dist.shutdown()
    if code == EXIT_ABORTED or (dist is not None and dist.enabled):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
