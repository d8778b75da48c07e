"""A sweep's trials (``python -m pipeline.sweep``; pipeline/sweep_space.py holds what it searches): each trial
trained in-process by the stage's engine as a run nested under the study's parent run, reporting its objective
to Optuna for pruning, its run's status and ``trial.state`` mirroring the trial; a trial stopped by a signal is
re-queued to resume in its own run. ``run_trials`` runs them until the study holds ``n_trials``; under torchrun
the other ranks train each trial with rank 0 (``follow_trials``).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline.engine import tags as tag
from pipeline.engine.cli import EXIT_ABORTED, EXIT_OK, EXIT_STOPPED
from pipeline.engine.distributed import Dist
from pipeline.engine.launcher_watch import note_stop_requested
from pipeline.engine.session import TrainingHooks, run_stage
from pipeline.engine.stage import Stage
from pipeline.sweep_space import SweepSpec, override_value, stage_class, suggest

log = logging.getLogger(__name__)

# Trials that count towards n_trials. Re-queued (WAITING) trials do not: they replace failed ones,
# and Optuna hands them out first.
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


class TrialInterrupted(Exception):
    """The trial was stopped by a signal or the stop tag; its checkpoint is committed."""

    def __init__(self, message: str, code: int = EXIT_STOPPED):
        super().__init__(message)
        self.code = code  # EXIT_STOPPED, or EXIT_ABORTED after a second signal


class TrialHooks(TrainingHooks):
    """The engine's hooks in one trial: its run tagged as the trial's, each validation reported to Optuna."""

    def __init__(self, trial: optuna.Trial, metric: str, client: MlflowClient, resumed_from: int | None):
        self.trial, self.metric, self.client, self.resumed_from = trial, metric, client, resumed_from
        self.run_id: str | None = None
        self.last_value: float | None = None

    def on_run_started(self, run_id: str) -> None:
        self.run_id = run_id
        self.trial.set_user_attr("mlflow_run_id", run_id)
        tags = {
            tag.TRIAL_NUMBER: str(self.trial.number),
            tag.TRIAL_STATE: "RUNNING",
            tag.SWEEP_STUDY: self.trial.study.study_name,
        }
        if self.resumed_from is not None:
            tags[tag.TRIAL_RESUMED_FROM] = str(self.resumed_from)
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def on_validation(self, step: int, metrics: dict[str, float]) -> str | None:
        self.last_value = metrics[self.metric]
        self.trial.report(self.last_value, step)
        return "pruned" if self.trial.should_prune() else None


@dataclass
class Sweep:
    stage_cls: type[Stage]
    spec: SweepSpec
    space: dict[str, Any]
    stage_overrides: list[str]
    study: optuna.Study
    parent_run: str
    experiment: str
    client: MlflowClient

    def objective(self, trial: optuna.Trial) -> float:
        params = {key: suggest(trial, key, dist) for key, dist in self.space.items()}
        # A re-queued trial (after a signal: our user attrs; after a crash: Optuna's heartbeat retry,
        # which copies the user attrs) carries the child run it resumes.
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        resumed_from = trial.user_attrs.get("resume_of", frozen.system_attrs.get("failed_trial"))
        child = trial.user_attrs.get("mlflow_run_id")
        args = (
            list(self.stage_overrides)
            + [f"{k}={override_value(v)}" for k, v in params.items()]
            + [
                f"tracking.parent_run={self.parent_run}",
                f"tracking.experiment={self.experiment}",
                f"tracking.run_name=trial-{trial.number:04d}-{self.study.study_name}",
            ]
        )
        if child and self._has_checkpoint(child):
            args.append(f"resume_run={child}")
            log.info("Trial %d resumes trial %d in its child run %s", trial.number, resumed_from, child)
        hooks = TrialHooks(trial, self.spec.metric, self.client, resumed_from)
        log.info("Trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
        try:
            Dist.from_env().broadcast((self.stage_cls.name, args))  # under torchrun: every rank trains the trial
            code = run_stage(self.stage_cls, args, hooks=hooks)
        except Exception as err:
            self._finish_child(hooks, "FAIL")
            raise RuntimeError(f"trial {trial.number} crashed: {err}") from err
        if code == EXIT_OK and hooks.last_value is not None:
            self._finish_child(hooks, "COMPLETE")
            return hooks.last_value
        if code == EXIT_STOPPED and self._stopped_by(hooks) == "pruned":
            self._finish_child(hooks, "PRUNED")
            raise optuna.TrialPruned()
        if code in (EXIT_STOPPED, EXIT_ABORTED):
            self._finish_child(hooks, "FAIL", interrupted=True)
            self.study.enqueue_trial(
                trial.params, user_attrs={"resume_of": trial.number, "mlflow_run_id": hooks.run_id}
            )
            raise TrialInterrupted(
                f"trial {trial.number} {'aborted' if code == EXIT_ABORTED else 'stopped'}; it "
                "resumes from its last committed checkpoint when the study continues",
                code,
            )
        self._finish_child(hooks, "FAIL")
        raise RuntimeError(f"trial {trial.number} failed (exit code {code})")

    def _has_checkpoint(self, run_id: str) -> bool:
        try:
            return bool(self.client.get_run(run_id).data.tags.get(tag.CHECKPOINT_LATEST))
        except Exception:
            return False

    def _stopped_by(self, hooks: TrialHooks) -> str | None:
        return self.client.get_run(hooks.run_id).data.tags.get(tag.STOPPED_BY) if hooks.run_id else None

    def _finish_child(self, hooks: TrialHooks, state: str, interrupted: bool = False) -> None:
        if hooks.run_id is None:
            return
        self.client.set_tag(hooks.run_id, tag.TRIAL_STATE, "INTERRUPTED" if interrupted else state)
        if not interrupted:
            self.client.set_terminated(hooks.run_id, RUN_STATUS[state])


def follow_trials(dist: Dist) -> int:
    """A rank other than 0 of a sweep under torchrun: train each trial rank 0 hands out, until it says done.
    Between trials a signal is rank 0's to handle (it stops the sweep and tells the others)."""
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (trial := dist.broadcast(None)) is not None:
            stage, args = trial
            run_stage(stage_class(stage), args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def run_trials(sweep: Sweep, n_trials: int) -> int:
    """Run trials until the study holds ``n_trials`` or a signal stops the sweep; the exit code."""
    study = sweep.study
    stop = {"requested": False}

    def between_trials(signum, frame):  # a trial installs its own handlers while it runs
        note_stop_requested()
        stop["requested"] = True
        log.warning("%s received between trials: stopping the sweep", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, between_trials) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Trials already running when this worker starts belong to other workers, alive or crashed. Optuna
    # can call a crashed one stale only a grace period after its last heartbeat, so before leaving, this
    # worker waits until that much time has passed since its start: a crashed trial is then resumed
    # here, also when the same command is run again right after a crash.
    started, grace = time.monotonic(), 4 * sweep.spec.heartbeat_seconds
    found_running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    waiting_logged = False
    try:
        while not stop["requested"]:
            optuna.storages.fail_stale_trials(study)  # crashed workers' trials: FAIL + re-queued for resume
            if len(study.get_trials(deepcopy=False, states=COUNTED_STATES)) >= n_trials:
                unsure = [
                    t.number
                    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if t.number in found_running
                ]
                left = grace - (time.monotonic() - started)
                if not unsure or left <= 0:
                    break
                if not waiting_logged:
                    log.info(
                        "Trials %s were running before this worker started; waiting up to %.0f s to learn "
                        "whether their worker crashed (then they resume here)",
                        unsure,
                        left,
                    )
                    waiting_logged = True
                time.sleep(min(left, 1.0))
                continue
            try:
                study.optimize(sweep.objective, n_trials=1, catch=(RuntimeError,))
            except TrialInterrupted as err:
                log.warning("%s. Run the same command again to continue the study.", err)
                return err.code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK
