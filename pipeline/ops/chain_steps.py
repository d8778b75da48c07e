"""The restoration chain's steps as MLflow Project runs, for ``python -m pipeline.main``: each step runs its
entry point with ``mlflow run`` (local environment) in a session of its own and is waited for; a FINISHED run of
the same entry point, parameters and code version is reused instead, and a stopped or crashed one with a
checkpoint is resumed in place (``resume_run``). The code version is the git commit, with a hash of the sources
when they have uncommitted changes. main's stop signals reach the running step's job (``StopForwarder``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.projects
import psutil
from mlflow import MlflowClient

from pipeline.common.provenance import code_version as git_commit
from pipeline.config import MainConfig
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import staging_here
from pipeline.engine.cli import EXIT_FAILED, EXIT_STOPPED
from pipeline.engine.launcher_watch import note_stop_requested
from pipeline.engine.stopping import SECOND_SIGNAL_GRACE_S
from pipeline.engine.tracking import experiment_id

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # the MLflow project: its steps' entry points
STEPS = ("train_adapter", "pretrain_vocoder", "finetune_vocoder")
SOURCE_DIRS = ("pipeline", "configs")


@dataclass
class StepResult:
    """A step of the chain: its run, and whether it was trained, reused or resumed."""

    step: str
    run_id: str
    how: str  # trained | reused | resumed


# --------------------------------------------------------------------------------------------
# Code version and reuse
# --------------------------------------------------------------------------------------------


def source_hash() -> str:
    """sha256 over the package and config files (paths and contents)."""
    digest = hashlib.sha256()
    files = [REPO / "MLproject"] + [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*"))]
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _sources_modified() -> bool:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *SOURCE_DIRS, "MLproject"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    return out.returncode != 0 or bool(out.stdout.strip())


def chain_code_version() -> str:
    """The git commit; with uncommitted changes to the sources, the commit plus a hash of them;
    without git, the hash alone."""
    commit = git_commit()
    if commit is None:
        return f"src-{source_hash()[:16]}"
    return f"{commit}+src-{source_hash()[:12]}" if _sources_modified() else commit


def _param(run, key: str) -> str:
    """A string parameter as given: MLflow Projects log them shell-quoted."""
    value = run.data.params.get(key, "")
    try:
        words = shlex.split(value)
    except ValueError:
        return value
    return words[0] if len(words) == 1 else value if words else ""


def find_run(
    client: MlflowClient, experiment_id: str, step: str, params: dict[str, str], version: str, statuses: tuple[str, ...]
):
    """The newest run of ``step`` with these parameters, this code version and one of ``statuses``."""
    query = (
        f"tags.`mlflow.project.entryPoint` = '{step}' and tags.`chain.code_version` = '{version}' "
        f"and tags.stage = '{step}'"
    )
    for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        if run.info.status in statuses and all(_param(run, k) == v for k, v in params.items()):
            return run
    return None


# --------------------------------------------------------------------------------------------
# Running the steps
# --------------------------------------------------------------------------------------------


class StepFailed(RuntimeError):
    def __init__(self, step: str, run_id: str, code: int):
        what = "was stopped" if code == EXIT_STOPPED else f"ended with exit code {code}"
        super().__init__(f"step {step} (run {run_id}) {what}")
        self.step, self.run_id, self.code = step, run_id, code


class ChainStopped(Exception):
    """A stop signal reached main while no step was running."""


class StopForwarder:
    """main's handler of SIGINT, SIGTERM and SIGHUP. A step runs as an ``mlflow run`` process in a session of
    its own, which no signal to main reaches: the signal is passed to the step's job (the ``mlflow run``
    process's children; the ``mlflow run`` process itself before it has started one, whose end then stops
    the job: engine/launcher_watch.py). The job stops as a job does (its checkpoint committed, its run
    KILLED); main then ends its own run KILLED. A second signal within SECOND_SIGNAL_GRACE_S counts as the
    same request (Ctrl-C reaches main from the terminal and again from `mlflow run`); a later one is passed
    on too (it aborts the step). With no step running, main stops at once (ChainStopped)."""

    def __init__(self):
        self.step: subprocess.Popen | None = None  # the running step's `mlflow run` process
        self.launching = False  # a step is being started: a signal now is passed on once it has started
        self.requested = False
        self._first_at: float | None = None
        self._previous = {}

    def __enter__(self) -> StopForwarder:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        note_stop_requested()
        now = time.monotonic()
        if self._first_at is not None and now - self._first_at <= SECOND_SIGNAL_GRACE_S:
            return
        self._first_at = self._first_at or now
        self.requested = True
        if self.launching:
            return  # launch() passes it on as soon as the step's process exists
        if self.step is None or self.step.poll() is not None:
            raise ChainStopped(name)
        self.forward(signum)

    def forward(self, signum: int) -> None:
        try:
            targets = psutil.Process(self.step.pid).children() or [psutil.Process(self.step.pid)]
        except psutil.Error:
            return  # the step has ended
        log.warning(
            "%s: passing it to the running step (pid %s); main stops when the step has committed its checkpoint",
            signal.Signals(signum).name,
            ", ".join(str(p.pid) for p in targets),
        )
        for proc in targets:
            try:
                proc.send_signal(signum)
            except psutil.Error:
                pass


def wait_for_session(sid: int) -> None:
    """Wait until no process of session ``sid`` is left (the step's job, after its `mlflow run` ended)."""

    def alive() -> bool:
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid:
                    return True
            except OSError:
                continue
        return False

    if alive():
        log.info("Waiting for the step's job to end (session %d)", sid)
        while alive():
            time.sleep(0.5)


STOPPER = StopForwarder()


def launch(
    client: MlflowClient, step: str, params: dict[str, str], version: str, previous: str | None, main_run: str
) -> str:
    """Run one entry point as an MLflow Project run (local environment) and wait for it."""
    STOPPER.launching = True
    try:
        with staging_here():
            submitted = mlflow.projects.run(
                str(REPO),
                entry_point=step,
                parameters=params,
                env_manager="local",
                experiment_name=step,
                synchronous=False,
            )
        STOPPER.step = submitted.command_proc
    finally:
        STOPPER.launching = False
    run_id = submitted.run_id
    try:
        if STOPPER.requested:  # a signal came while the step was being started
            STOPPER.forward(signal.SIGTERM)
        ok = submitted.wait()  # a stop signal meanwhile is passed to the step (StopForwarder)
    finally:
        STOPPER.step = None
    wait_for_session(submitted.command_proc.pid)  # `mlflow run` is a session leader (setsid)
    code = submitted.command_proc.returncode
    # The job's own run: the launched one, or (on resume) the resumed one it logged into.
    job_run = params.get("resume_run") or run_id
    # nested under main's run: its page names main as parent (the step runs stay in their stages' experiments)
    for key, value in {tag.CHAIN_CODE_VERSION: version, tag.CHAIN_MAIN_RUN: main_run, tag.PARENT_RUN: main_run}.items():
        client.set_tag(job_run, key, value)
    if previous:
        client.set_tag(job_run, tag.CHAIN_PREVIOUS_RUN, previous)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        # `mlflow run` exits 1 for any failure, and sets the run FAILED until the job's status guard puts its
        # KILLED back: a stopped job is told by the tag it sets before ending its run
        stopped = tag.STOPPED_BY in client.get_run(job_run).data.tags
        raise StepFailed(step, job_run, EXIT_STOPPED if stopped else code or EXIT_FAILED)
    return job_run


def run_step(
    client: MlflowClient,
    cfg: MainConfig,
    step: str,
    params: dict[str, str],
    version: str,
    previous: str | None,
    main_run: str,
) -> StepResult:
    experiment = experiment_id(client, step)
    if cfg.reuse:
        done = find_run(client, experiment, step, params, version, ("FINISHED",))
        if done is not None:
            log.info(
                "%s: reusing finished run %s (same entry point, parameters and code version)", step, done.info.run_id
            )
            return StepResult(step, done.info.run_id, "reused")
    if cfg.resume:
        stopped = find_run(client, experiment, step, params, version, ("KILLED", "FAILED"))
        if stopped is not None and stopped.data.tags.get(tag.CHECKPOINT_LATEST_STEP):
            log.info("%s: resuming stopped run %s from its checkpoint", step, stopped.info.run_id)
            run_id = launch(client, step, {**params, "resume_run": stopped.info.run_id}, version, previous, main_run)
            return StepResult(step, run_id, "resumed")
    log.info("%s: starting a new run", step)
    return StepResult(step, launch(client, step, params, version, previous, main_run), "trained")


def run_chain(
    client: MlflowClient, cfg: MainConfig, overrides: dict[str, list[str]], version: str, main_run: str
) -> list[StepResult]:
    """The steps in order, each given the run IDs of those before it (finetune_vocoder: ``adapter_run`` and
    ``vocoder_run``); main's run tagged with each step's run (``chain.<step>``)."""
    results: dict[str, StepResult] = {}
    previous = None
    for step in STEPS:
        params = {"overrides": shlex.join(overrides[step])}  # the step splits it again with shell rules
        if step == "finetune_vocoder":
            params.update(adapter_run=results["train_adapter"].run_id, vocoder_run=results["pretrain_vocoder"].run_id)
        result = run_step(client, cfg, step, params, version, previous, main_run)
        results[step] = result
        client.set_tag(main_run, tag.chain_step(step), result.run_id)
        previous = result.run_id
    return list(results.values())
