"""The one training loop shared by every stage.

Step semantics: ``step`` counts finished optimizer steps. The k-th step's training metrics are
logged at step k; a checkpoint named step-k holds the state after k steps, and a resume from it
logs its first metrics at step k+1, so every chart is one continuous line.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from pipeline.common import faults
from pipeline.common.provenance import code_version, utc_now
from pipeline.config import STORED_AS_WRITTEN, config_hash, redact, to_container
from pipeline.engine import startup
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import FORMAT_VERSION, checkpoint_name
from pipeline.engine.checkpointing import CheckpointStore
from pipeline.engine.metric_window import MetricWindow
from pipeline.engine.rng import capture_rng
from pipeline.engine.stage import LRSchedule, Stage, data_workers
from pipeline.engine.stopping import StopController
from pipeline.engine.tracking import MetricLogger
from pipeline.engine.training_state import Position, restore_rank_rng, restore_stage, resumed_position
from pipeline.engine.validation import evaluating, merge_ranks, validation_totals, write_samples

log = logging.getLogger(__name__)

LOG_LINE_EVERY_S = 30.0  # a progress line at least this often, between trainer.log_interval steps too


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient: the job stops, its checkpoints intact."""


class DataWorkerDied(RuntimeError):
    """A DataLoader worker process died (killed, out of memory): the job stops, its checkpoints intact."""


@dataclass
class TrainResult:
    position: Position
    stopped_by: str | None = None  # None when training reached max_steps


class Engine:
    def __init__(
        self,
        stage: Stage,
        metrics: MetricLogger,
        store: CheckpointStore,
        stopper: StopController,
        run_id: str,
        on_progress=None,
        hooks=None,
    ):
        self.stage = stage
        self.cfg = stage.cfg
        self.metrics = metrics
        self.store = store
        self.stopper = stopper
        self.run_id = run_id
        self.on_progress = on_progress  # callback(position) when the progress tag should change
        self.hooks = hooks  # TrainingHooks: on_validation may ask to stop (e.g. a pruned sweep trial)
        # Under torchrun: rank 0 logs, validates' totals and writes checkpoints; every rank trains and validates
        # its share (the other ranks get metrics=None, store=None).
        self.dist = stage.dist
        self.pos = Position()
        self.val_metrics: dict[str, float] = {}
        self.nonfinite_steps = 0  # steps whose update was skipped (loss or gradient not finite), all attempts
        self.nonfinite_streak = 0  # of them, the ones in a row up to now
        self.total_steps = int(self.cfg.trainer.max_steps)  # set from the position when fit() starts
        self._code_version = code_version()
        self._config_cache: dict[str, Any] | None = None
        self._window_start, self._window_samples, self._first_step = 0.0, 0, True  # _fit's throughput window
        self.metric_window = MetricWindow(int(self.cfg.tracking.metric_interval))

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The training state; under torchrun, with every rank's random state (a collective: every rank calls it).
        Each of its keys is in every checkpoint from format version 2 on (checkpoint_migrate.STATE_KEYS)."""
        s = self.stage
        rngs = self.dist.all_gather(capture_rng())
        return {
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "batch_in_epoch": self.pos.batch_in_epoch,  # global batches (all ranks' shares) done in the epoch
            "batch_size": int(self.cfg.batch_size),  # per rank
            "world_size": self.dist.world_size,
            "data_workers": self._workers(),
            "seed": int(self.cfg.seed),
            "modules": {k: m.state_dict() for k, m in s.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in s.optimizers.items()},
            "schedulers": {k: sch.state_dict() for k, sch in s.schedulers.items()},
            "scaler": s.precision.scaler.state_dict() if s.precision.scaler is not None else {},
            "rng": rngs[0],
            "rank_rng": rngs,  # rank r's random state at rank_rng[r]; the data position is the same on every rank
            "val_metrics": dict(self.val_metrics),
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_streak": self.nonfinite_streak,
            "metric_window": self.metric_window.state_dict(),  # training metrics not logged yet (metric_interval)
        }

    def load_state_dict(self, state: dict[str, Any], *, restore_data_position: bool = True) -> None:
        """Restore a checkpoint's state as ``checkpoint_migrate.read_state`` gives it: every key present."""
        restore_stage(self.stage, state)
        restore_rank_rng(state, self.dist.rank)
        self.pos = resumed_position(state, int(self.cfg.batch_size), self.dist.world_size, self._workers(), self.stage)
        self.val_metrics = dict(state["val_metrics"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.metric_window.load_state_dict(state["metric_window"])
        log.info("Restored model, optimizer, and scheduler states")

    # --- checkpoints --------------------------------------------------------------------------
    def epochs_done(self) -> float:
        return round(self.pos.epoch + self.pos.batch_in_epoch / self.batches_per_epoch(), 4)

    def save_checkpoint(self) -> None:
        tags = self._config_meta()["tags"]
        meta = {
            "format_version": FORMAT_VERSION,
            "stage": self.stage.name,
            "step": self.pos.step,
            "epoch": self.epochs_done(),
            "created": utc_now(),
            "run_id": self.run_id,
            "config": self._config_meta()["config"],
            STORED_AS_WRITTEN: True,
            "config_hash": self._config_meta()["config_hash"],
            "model_args": self.stage.model_args(),
            "inputs": dict(self.stage.inputs),
            "metrics": dict(self.val_metrics),
            "code_version": self._code_version,
        }
        row = {
            "name": checkpoint_name(self.pos.step),
            "model": tags.get(tag.MODEL),
            "dataset": tags.get(tag.DATASET),
            "epoch": self.epochs_done(),
            "step": self.pos.step,
            "created": meta["created"],
            **self.val_metrics,
        }
        state = self.state_dict()  # on every rank: it gathers their random states
        if self.dist.is_main:
            self.store.save(self.pos.step, state, meta, row, flush_metrics=self.metrics.flush)
        self._saved_at = self.pos.step

    def _config_meta(self) -> dict[str, Any]:
        """The config, its hash and the stage's tags for every checkpoint; computed once, the config does not
        change in a job."""
        if self._config_cache is None:
            # as written: interpolations unresolved, secrets masked (a resume needs masked ones passed again)
            self._config_cache = {
                "config": to_container(self.cfg),
                "config_hash": config_hash(self.cfg),
                "tags": redact(self.stage.tags()),
            }
        return self._config_cache

    # --- data ---------------------------------------------------------------------------------
    def planned_total_steps(self) -> int:
        """Total optimizer steps of the job: ``trainer.max_steps``, or with ``trainer.epochs`` the steps
        done plus the batches left to finish that many epochs at the current batch size."""
        epochs = self.cfg.trainer.epochs
        if epochs is None:
            return int(self.cfg.trainer.max_steps)
        per_epoch = self.batches_per_epoch()
        left_in_epoch = max(per_epoch - self.pos.batch_in_epoch, 0)
        return self.pos.step + left_in_epoch + max(int(epochs) - self.pos.epoch - 1, 0) * per_epoch

    def _plan_lr_schedules(self) -> None:
        """Give every LR schedule the job's horizon; a changed horizon on resume continues the curve
        from the restored learning rate instead of jumping to where the new horizon would put it."""
        for name, sch in self.stage.schedulers.items():
            for fn in getattr(sch, "lr_lambdas", []):
                if isinstance(fn, LRSchedule) and fn.retarget(self.pos.step, self.total_steps):
                    log.info(
                        "LR schedule %s: horizon is now %d steps; continuing from lr=%.4g at step %d",
                        name,
                        self.total_steps,
                        sch.get_last_lr()[0],
                        self.pos.step,
                    )

    def _workers(self) -> int:
        return data_workers(self.cfg)

    def _epoch_loader(self):
        """The rest of the current epoch, from the data position (this rank's share of each global batch)."""
        return self.stage.train_source.loader(
            self.pos.epoch,
            self.pos.batch_in_epoch,
            int(self.cfg.batch_size),
            self._workers(),
            self.stage.collate,
            rank=self.dist.rank,
            world=self.dist.world_size,
        )

    def batches_per_epoch(self) -> int:
        """Steps per epoch (global batches: every rank's share of the epoch)."""
        return self.stage.train_source.num_batches(
            int(self.cfg.batch_size), self._workers(), world=self.dist.world_size
        )

    # --- validation ---------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """The stage's validation step over the whole validation set (under the job's autocast), then
        its samples (in full precision), both in eval mode; logs ``val/*`` and returns them. Under torchrun
        each rank validates every world-th batch and the totals are summed; rank 0 logs and writes samples."""
        faults.point("validation")
        with evaluating(self.stage):
            mine = validation_totals(
                self.stage, int(self.cfg.batch_size), self._workers(), int(self.cfg.seed), self.dist
            )
            totals, sums, count = merge_ranks(self.dist, *mine)
            self.val_metrics = {f"val/{k}": v / count for k, v in totals.items()}
            self.val_metrics.update({f"val/{k}": num / den for k, (num, den) in sums.items() if den > 0})
            if self.dist.is_main:
                self.metrics.log(self.val_metrics, self.pos.step)
                log.info(
                    "validation at step %d: %s",
                    self.pos.step,
                    ", ".join(f"{k}={v:.4f}" for k, v in self.val_metrics.items()),
                )
                write_samples(self.stage, self.store, self.pos.step)
        reason = self.hooks.on_validation(self.pos.step, dict(self.val_metrics)) if self.hooks else None
        if reason:
            self.stopper.request(reason)
        return self.val_metrics

    # --- non-finite steps ----------------------------------------------------------------------
    def _count_nonfinite(self) -> int:
        self.nonfinite_steps += 1
        self.nonfinite_streak += 1
        log.warning(
            "Step %d: the loss or a gradient is not finite; its update was skipped (%d in a row, %d in all)",
            self.pos.step,
            self.nonfinite_streak,
            self.nonfinite_steps,
        )
        return self.nonfinite_steps

    def _stop_if_diverged(self) -> None:
        limit = int(self.cfg.trainer.max_nonfinite_steps)
        if self.nonfinite_streak >= limit:
            raise NonFiniteTraining(
                f"{self.nonfinite_streak} steps in a row (up to step {self.pos.step}) had a non-finite loss or "
                f"gradient, trainer.max_nonfinite_steps={limit}: stopping. No update of those steps was applied and "
                "the committed checkpoints are intact; resume from one with a lower optim.lr (or a larger "
                "optim.warmup_steps), e.g. resume_run=<this run> resume_step=<an earlier step> optim.lr=<lower>"
            )

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the planned end or a stop request; a DataLoader worker's death becomes DataWorkerDied."""
        try:
            return self._fit()
        except RuntimeError as err:
            # torch raises this from its SIGCHLD handler, wherever the main thread happens to be
            if not str(err).startswith("DataLoader worker"):
                raise
            raise DataWorkerDied(self._worker_died(err)) from err
        except (ConnectionResetError, EOFError, BrokenPipeError) as err:
            # or, when the worker dies while handing a batch over, the batch's shared memory cannot be fetched
            if not self._workers():
                raise
            raise DataWorkerDied(self._worker_died(err)) from err

    @staticmethod
    def _worker_died(err: Exception) -> str:
        return (
            f"A data loader worker died ({str(err).strip() or type(err).__name__}). Most often the machine ran "
            "out of memory (`dmesg` shows the kernel's OOM killer) or the worker was killed. The committed "
            "checkpoints are intact; resume the run, with fewer data.num_workers or a smaller batch_size if "
            "memory is short"
        )

    def _fit(self) -> TrainResult:
        max_steps = self.total_steps = self.planned_total_steps()
        self._plan_lr_schedules()
        val_interval, save_interval = int(self.cfg.validation.interval), int(self.cfg.checkpoint.save_interval)
        per_epoch = self.batches_per_epoch()
        self._saved_at = self.pos.step
        for m in self.stage.modules.values():
            m.train()
        self.stage.distribute()  # under torchrun: DDP wrappers, after the restore (they start from rank 0's weights)
        bar = tqdm(
            total=max_steps,
            initial=self.pos.step,
            desc=self.stage.name,
            unit="step",
            disable=not (self.dist.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        self._window_start, self._window_samples = time.perf_counter(), 0
        self._last_line = time.monotonic()
        self._first_step = True
        stopped_by = None
        while self.pos.step < max_steps and stopped_by is None:
            if self.pos.batch_in_epoch >= per_epoch:
                self.pos.epoch, self.pos.batch_in_epoch = self.pos.epoch + 1, 0
            for batch in self._epoch_loader():
                self._train_step(batch, per_epoch, max_steps)
                bar.update(1)
                last = self.pos.step >= max_steps
                if val_interval > 0 and (self.pos.step % val_interval == 0 or last):
                    self.validate()
                if self.pos.step % save_interval == 0 or last:
                    self.save_checkpoint()
                # after the last step, the run is simply finished; under torchrun, a request on any rank (a
                # signal; the stop tag and a pruned trial are seen by rank 0) stops every rank at this step
                if self.dist.any(self.stopper.requested) and not last:
                    stopped_by = self.stopper.reason or "signal"
                    break
                if last or self.pos.batch_in_epoch >= per_epoch:
                    break
        bar.close()
        self._finish()
        return TrainResult(self.pos, stopped_by)

    def _train_step(self, batch, per_epoch: int, max_steps: int) -> None:
        """One optimizer step on ``batch`` and its metrics (loss parts, epoch, LR; throughput at each log
        interval; non-finite steps) logged at the new step; stops when too many in a row were not finite."""
        stage = self.stage
        batch = stage.to_device(batch)
        skipped_before = stage.nonfinite_updates
        stage.step = self.pos.step
        with stage.precision.autocast():  # Stage.optimize leaves it for the backward pass
            out = stage.training_step(batch)
        self.pos.step += 1
        self.pos.batch_in_epoch += 1
        self._window_samples += int(self.cfg.batch_size) * self.dist.world_size  # every rank's share of the batch
        metrics = self.dist.mean({k: float(v) for k, v in out.items()})  # over the ranks' batches
        metrics["epoch"] = self.pos.epoch + self.pos.batch_in_epoch / per_epoch  # epochs done
        for name, sch in stage.schedulers.items():
            sch.step()
            metrics["lr" if len(stage.schedulers) == 1 else f"lr/{name}"] = sch.get_last_lr()[0]
        if self.pos.step % int(self.cfg.trainer.log_interval) == 0 or self.pos.step == max_steps:
            self._report_progress(metrics, max_steps)
        elif self.dist.is_main and time.monotonic() - self._last_line > LOG_LINE_EVERY_S:
            self._log_line(
                metrics, max_steps
            )  # slow steps: a sign of life between log intervals (not logged to MLflow)
        if stage.nonfinite_updates != skipped_before:
            metrics["train/nonfinite_steps"] = self._count_nonfinite()
        else:
            self.nonfinite_streak = 0
        if self.dist.is_main:
            point = self.metric_window.add(self.pos.step, metrics, final=self.pos.step == max_steps)
            if point is not None:
                self.metrics.log(point, self.pos.step)
        if self._first_step:
            startup.first_step(self.pos.step)
            self._first_step = False
        self._stop_if_diverged()

    def _report_progress(self, metrics: dict[str, float], max_steps: int) -> None:
        """At a log interval: the throughput since the previous one into ``metrics``, a log line (rank 0) and
        the progress callback."""
        elapsed = time.perf_counter() - self._window_start
        metrics["throughput/samples_per_s"] = self._window_samples / max(elapsed, 1e-9)
        self._window_start, self._window_samples = time.perf_counter(), 0
        if self.dist.is_main:
            self._log_line(metrics, max_steps)
        if self.on_progress:
            self.on_progress(self.pos)

    def _log_line(self, metrics: dict[str, float], max_steps: int) -> None:
        log.info(
            "step %d/%d epoch %d %s",
            self.pos.step,
            max_steps,
            self.pos.epoch,
            " ".join(f"{k}={v:.5g}" for k, v in metrics.items() if k.startswith("train/")),
        )
        self._last_line = time.monotonic()

    def _finish(self) -> None:
        """After the loop: a checkpoint of the last step if it has none, every metric and checkpoint stored."""
        if self._saved_at != self.pos.step:
            self.save_checkpoint()
        if self.dist.is_main:
            self.metrics.flush(wait=True)
            self.store.wait()
        if self.on_progress:
            self.on_progress(self.pos)
