"""One job's collaborators around the engine, created in a defined order and closed in the reverse one.

A ``Job`` owns what a job opens around the engine: the stop controller, the metric logger and checkpoint store,
the engine, and what a subclass adds (rank 0's lease, system-metrics monitor and tag writer: engine/job.py). Each
closer is pushed on one ``ExitStack`` as its collaborator is created, so the close order is the creation order
reversed, whatever happens.
"""

from __future__ import annotations

from contextlib import ExitStack

from mlflow import MlflowClient

from pipeline.engine import startup
from pipeline.engine.checkpoint_files import staging_root
from pipeline.engine.checkpointing import CheckpointStore, RetentionPolicy
from pipeline.engine.distributed import Dist
from pipeline.engine.outcomes import FAILED
from pipeline.engine.resume import ResumePoint, rank_state
from pipeline.engine.senders import MetricLogger
from pipeline.engine.stage import Stage
from pipeline.engine.stopping import StopController
from pipeline.engine.trainer import Engine, Position


class Job:
    """One job's collaborators around the engine, closed in the reverse order of their creation.

    ``with Job(...) as job``: each ``open_*`` method creates a collaborator and pushes its closer on the
    job's ExitStack; leaving the block closes them, last opened first. ``outcome`` is how the job ended
    (engine/outcomes.py: the run's status, the exit code).
    """

    def __init__(self, stage: Stage, run_id: str, client: MlflowClient | None = None):
        self.stage, self.cfg, self.run_id, self.client = stage, stage.cfg, run_id, client
        self.stack = ExitStack()
        self.stopper: StopController | None = None
        self.metrics: MetricLogger | None = None
        self.store: CheckpointStore | None = None
        self.engine: Engine | None = None
        self.outcome = FAILED

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> bool:
        return self.stack.__exit__(*exc)

    @property
    def code(self) -> int:
        return self.outcome.code

    @property
    def pos(self) -> Position:
        return self.engine.pos if self.engine is not None else Position()

    def open_stopper(self, poll_seconds: float) -> StopController:
        """Signals (and, with a client, the stop tag): the handlers stay installed until everything opened
        after them is closed, so no signal leaves the run RUNNING."""
        self.stopper = self.stack.enter_context(StopController(self.client, self.run_id, poll_seconds))
        return self.stopper

    def open_logging(self, **options) -> None:
        """The metric logger and the checkpoint store (``options``: CheckpointStore's); the metric logger is
        closed after the store is drained."""
        cfg = self.cfg
        policy = RetentionPolicy(
            cfg.checkpoint.keep_last_n, cfg.checkpoint.keep_best_k, cfg.checkpoint.monitor, cfg.checkpoint.mode
        )
        logged = options.pop("already_logged", None)
        limit = {"outage_limit_s": options["outage_limit_s"]} if "outage_limit_s" in options else {}
        self.metrics = MetricLogger(
            self.client, self.run_id, cfg.tracking.flush_seconds, already_logged=logged, **limit
        )
        self.stack.callback(self.metrics.close)
        self.store = CheckpointStore(
            self.client, self.run_id, staging_root(cfg.checkpoint.staging_dir), policy, **options
        )

    def drain(self) -> None:
        """Wait for the checkpoint uploads and the metrics still queued."""
        self.store.close()
        self.metrics.flush(wait=True)

    def restore(self, resume: ResumePoint | None, dist: Dist) -> None:
        """Load the checkpoint's state into the engine, then let it go: nothing holds it for the whole run."""
        if resume is not None:
            self.engine.load_state_dict(rank_state(resume, dist))
            startup.mark("restore")
