"""Find, download and verify the checkpoint a job resumes from (docs/architecture.md, Resume).

Every mistake is caught here, before anything is written to any run: an unknown or deleted run,
a run of another stage, a run without checkpoints, a missing step or path. A corrupted latest
checkpoint makes ``resume_run`` fall back to the newest older one that verifies, and say so.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.common import faults
from pipeline.common.provenance import utc_now
from pipeline.config import TrackingConfig, legacy_launch_values
from pipeline.engine import lease, startup
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import (
    META_FILE,
    CheckpointError,
    check_resumable,
    checkpoint_name,
    step_of,
    verify,
)
from pipeline.engine.checkpoint_migrate import read_state
from pipeline.engine.checkpointing import (
    CHECKPOINT_DIR,
    RetentionPolicy,
    download_checkpoint,
    list_checkpoints,
    read_index,
    steps_to_keep,
)
from pipeline.engine.distributed import Dist
from pipeline.engine.launch import ALL_RUN_INPUTS, LaunchArgs

log = logging.getLogger(__name__)

LEASE_TIMEOUT_S = TrackingConfig.lease_timeout_seconds  # for a run that did not log the param


class ResumeError(RuntimeError):
    """A resume request that cannot be honoured; the message says what to do."""


@dataclass
class ResumePoint:
    """A verified checkpoint a job starts from: its meta.json, its training state (until the engine takes it,
    ``take_state``), the local directory it was verified in and the run it belongs to, as fetched once."""

    step: int
    meta: dict[str, Any]
    state: dict[str, Any] | None  # None once taken (``take_state``), and on the ranks other than 0
    source: str  # human-readable origin, e.g. "run 1a2b… checkpoint step-00000100"
    run_id: str | None  # the run the checkpoint belongs to (None for a plain path)
    run: Any = None  # that run (mlflow Run) as fetched when the checkpoint was found; None on other ranks
    latest: bool = False  # the run's latest committed checkpoint, chosen by the job rather than by the user
    path: Path | None = None  # the verified checkpoint directory on rank 0's machine
    workdir: Path | None = None  # the temporary directory it was downloaded into (removed when the job ends)

    def take_state(self) -> dict[str, Any] | None:
        """The training state, handed over once: the ResumePoint no longer holds it (nor keeps it in memory
        for the whole run)."""
        state, self.state = self.state, None
        return state

    def for_other_ranks(self) -> ResumePoint:
        """What rank 0 hands the other ranks: no state (they read the verified files themselves) and no run."""
        return replace(self, state=None, run=None)

    def remove_download(self) -> None:
        """Remove the temporary directory the checkpoint was downloaded into, if any."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def rank_state(resume: ResumePoint, dist: Dist) -> dict[str, Any]:
    """The checkpoint's training state on this rank. Rank 0 takes what it verified and loaded; the other ranks
    load the same verified files from rank 0's download (one machine: the usual torchrun job) and, on another
    machine where those files are not, receive rank 0's copy over the process group. Every rank returns only
    once all have read the files, so rank 0 may then remove them."""
    if dist.is_main:
        state = resume.take_state()
    else:
        state = read_state(resume.path, resume.meta) if resume.path is not None and resume.path.is_dir() else None
    if any(dist.all_gather(state is None)):
        sent = dist.broadcast(state if dist.is_main else None)
        state = state if state is not None else sent
    return state


class RunCheckpoints:
    """One run's committed checkpoints, read the same way by every part that needs them (resume, the
    runs finetune_vocoder builds on, transcribe): the run is checked first (it exists, is not deleted,
    is of one of ``stages``), then checkpoints are listed, ranked, downloaded, sha256-verified and
    loaded with ``weights_only=True``. Every refusal is a ResumeError that names the run and says what
    to do; ``role`` (e.g. "adapter_run") names the argument the run came from, when there is one.
    """

    def __init__(self, client: MlflowClient, run_id: str, stages: tuple[str, ...], role: str | None = None):
        self.client, self.run_id, self.stages, self.role = client, run_id, stages, role
        self.run = self._checked_run()

    def _checked_run(self):
        run_id, role, stages = self.run_id, self.role, self.stages
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            raise ResumeError(
                f"{role}={run_id}: run not found in the tracking store {mlflow.get_tracking_uri()}"
                if role
                else f"Run {run_id} not found in the tracking store {mlflow.get_tracking_uri()}. "
                "Check the run ID (MLflow UI: run page header) and MLFLOW_TRACKING_URI."
            ) from err
        if run.info.lifecycle_stage == "deleted":
            raise ResumeError(
                f"{role}={run_id}: the run is deleted"
                if role
                else f"Run {run_id} is deleted. Restore it in the MLflow UI (or `mlflow gc` removed it)."
            )
        stage = run.data.tags.get(tag.STAGE)
        if stage not in stages:
            raise ResumeError(
                f"{role}={run_id} is a {stage or 'non-pipeline'} run, not a {' or '.join(stages)} run"
                if role
                else f"Run {run_id} is a {stage or 'non-pipeline'} run, not a {stages[0]} run; "
                f"resume it with its own entry point or pick a {stages[0]} run."
            )
        return run

    @property
    def stage(self) -> str:
        return self.run.data.tags[tag.STAGE]

    @functools.cached_property
    def latest_step(self) -> int | None:
        """The step of the latest committed checkpoint: the `checkpoint.latest_step` tag; when that tag
        is missing or unreadable (edited by hand, a store restored from a backup), the `checkpoint.latest`
        tag, then the newest row of `checkpoints/index.csv` (rows are written only after a commit)."""
        tags = self.run.data.tags
        value = tags.get(tag.CHECKPOINT_LATEST_STEP)
        if value is not None and value.strip().isdigit():
            return int(value)
        path_step = step_of(tags.get(tag.CHECKPOINT_LATEST, "").rstrip("/").rsplit("/", 1)[-1])
        source, step = f"its {tag.CHECKPOINT_LATEST} tag", path_step
        if step is None:
            try:
                steps = [int(row["step"]) for row in read_index(self.client, self.run_id)]
            except CheckpointError as err:
                log.warning("%s", err)
                steps = []
            source, step = "checkpoints/index.csv", max(steps, default=None)
        if value is None and step is None:
            return None
        what = f"is {value!r}, not a step" if value is not None else "is missing"
        log.warning(
            "The %s tag of run %s %s; %s",
            tag.CHECKPOINT_LATEST_STEP,
            self.run_id,
            what,
            f"the latest committed checkpoint per {source} is step {step}"
            if step is not None
            else f"neither its {tag.CHECKPOINT_LATEST} tag nor checkpoints/index.csv names a committed one",
        )
        return step

    def require_committed(self, purpose: str) -> int:
        """The latest committed step, or a refusal: nothing to ``purpose`` (e.g. "transcribe with")."""
        if self.latest_step is None or not list_checkpoints(self.client, self.run_id):
            if self.role:
                raise ResumeError(
                    f"{self.role}={self.run_id} ({self.stage}) has no committed checkpoint; train it first"
                )
            raise ResumeError(
                f"Run {self.run_id} has no checkpoints to {purpose}; train it first "
                f"(python -m pipeline.stages.{self.stage} resume_run={self.run_id} or a fresh run)."
            )
        return self.latest_step

    def end_if_abandoned(self) -> str:
        """A run left RUNNING by a job that stopped before its first commit cannot be resumed, and nothing
        else would ever end it: end it FAILED (saying so on the run), unless a live job holds its lease
        (it may still commit). Returns the sentence the refusal adds."""
        run, run_id = self.run, self.run_id
        if run.info.status != "RUNNING":
            return ""
        tags = run.data.tags
        if lease.held_by_live_job(tags, lease.run_timeout(run, LEASE_TIMEOUT_S)):
            return (
                f" A job is still training it ({tags.get(lease.HOLDER, 'unknown holder')}): wait for its first "
                "checkpoint, or stop it."
            )
        note = (
            f"**Ended FAILED on {utc_now()} by a resume: the job that trained this run stopped before it "
            "committed a checkpoint, so there is nothing to resume. Start a fresh run.**"
        )
        self.client.set_tag(run_id, tag.NOTE, f"{note}\n\n{tags.get(tag.NOTE, '')}".strip())
        self.client.set_terminated(run_id, "FAILED")
        log.warning(
            "Run %s was left RUNNING by a job that stopped before committing a checkpoint; it is now ended FAILED",
            run_id,
        )
        return " The run was left RUNNING by a job that stopped before committing one; it is now ended FAILED."

    def best_step(self) -> int | None:
        """The kept checkpoint with the best value of the run's ``checkpoint.monitor`` (None if none is scored)."""
        params = self.run.data.params
        policy = RetentionPolicy(
            0, 1, params.get("checkpoint.monitor", "val/loss"), params.get("checkpoint.mode", "min")
        )
        stored = set(list_checkpoints(self.client, self.run_id))  # a row of a step no longer stored never ranks
        rows = [row for row in read_index(self.client, self.run_id) if int(row["step"]) in stored]
        best = steps_to_keep(rows, policy, latest=-1) - {-1}
        return best.pop() if best else None

    def meta(self, step: int) -> dict[str, Any]:
        """meta.json of the checkpoint at ``step`` (config and model arguments; no weights)."""
        path = f"{CHECKPOINT_DIR}/{checkpoint_name(step)}/{META_FILE}"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return json.loads(
                    Path(self.client.download_artifacts(self.run_id, path, tmp)).read_text(encoding="utf-8")
                )
            except Exception as err:  # missing artifact, unreadable JSON
                who = f"{self.role}={self.run_id}" if self.role else f"Run {self.run_id}"
                raise ResumeError(f"{who}: cannot read {path} ({err})") from err

    def download(self, step: int, workdir: Path) -> Path:
        return download_checkpoint(self.client, self.run_id, step, workdir / checkpoint_name(step))

    def load(self, step: int | None, workdir: Path) -> ResumePoint:
        """The verified checkpoint at ``step``, or the latest committed one, falling back to the newest
        older one that verifies when it is corrupted (and saying so)."""
        run_id = self.run_id
        candidates = self._candidates(step)
        errors = []
        for candidate in candidates:
            faults.point("resume.download")
            local = self.download(candidate, workdir)
            startup.mark("download")
            try:
                meta, state = _load_verified(local, self.stage)
            except CheckpointError as err:
                log.error("%s", err)
                errors.append(str(err))
                if step is None and candidate != candidates[-1]:
                    log.warning("Falling back to the previous checkpoint of run %s", run_id)
                continue
            if errors:
                log.warning(
                    "Resuming from older checkpoint %s because newer ones failed verification",
                    checkpoint_name(candidate),
                )
            source = f"run {run_id} checkpoint {checkpoint_name(candidate)}"
            return ResumePoint(
                candidate, meta, state, source, run_id, run=self.run, latest=step is None, path=local, workdir=workdir
            )
        raise ResumeError(f"No usable checkpoint in run {run_id}: " + " | ".join(errors))

    def _candidates(self, step: int | None) -> list[int]:
        """The steps ``load`` tries, in order: ``step`` alone, or the committed ones from the latest down."""
        run_id = self.run_id
        stored = list_checkpoints(self.client, run_id)
        if not stored:
            raise ResumeError(
                f"Run {run_id} has no checkpoints to resume from; start a fresh run instead." + self.end_if_abandoned()
            )
        if step is not None:
            if step not in stored:
                raise ResumeError(
                    f"Run {run_id} has no checkpoint at step {step}; available steps: {', '.join(map(str, stored))}"
                )
            return [step]
        latest = self.latest_step
        committed = [s for s in stored if latest is not None and s <= latest]
        if not committed and latest is None and tag.CHECKPOINT_LATEST_STEP in self.run.data.tags:
            raise ResumeError(
                f"Run {run_id} stores checkpoints at steps {', '.join(map(str, stored))}, but its "
                f"{tag.CHECKPOINT_LATEST_STEP} tag is {self.run.data.tags[tag.CHECKPOINT_LATEST_STEP]!r}, not a "
                "step, and nothing else says which is committed. Set the tag to the step of the last checkpoint "
                "that finished (MLflow UI: run page, Tags), or pick one: resume_step=<step> (it is verified "
                "before use)."
            )
        if not committed:
            raise ResumeError(
                f"Run {run_id} has no committed checkpoint (no upload finished); start a fresh run, "
                f"or pick a stored one: resume_step=<step> (stored: {', '.join(map(str, stored))}; "
                "it is verified before use)." + self.end_if_abandoned()
            )
        return sorted(committed, reverse=True)


def get_stage_run(client: MlflowClient, run_id: str, stage: str):
    return RunCheckpoints(client, run_id, (stage,)).run


def _load_verified(ckpt_dir: Path, stage: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    faults.point("resume.verify")
    meta = verify(ckpt_dir)
    check_resumable(meta, ckpt_dir)
    if stage is not None and meta["stage"] != stage:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: {META_FILE} says stage {meta['stage']!r}, but the run is a {stage} run"
        )
    startup.mark("verify")
    state = read_state(ckpt_dir, meta)  # migrated to this format version
    startup.mark("load")
    return meta, state


def from_uri(client: MlflowClient, stage: str, uri: str, workdir: Path) -> ResumePoint:
    """``runs:/<id>/checkpoints/step-N``, an ``s3://`` prefix or a local directory."""
    run_id, run = None, None
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        run = get_stage_run(client, run_id, stage)
    is_uri = run_id is not None or "://" in uri
    path = Path(uri).expanduser()
    if not is_uri and not path.exists():
        raise ResumeError(f"Checkpoint specified in resume_from not found: {uri}")
    if is_uri:
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir)))
        except Exception as err:
            raise ResumeError(f"Checkpoint specified in resume_from not found: {uri} ({err})") from err
    if path.is_file():
        path = path.parent
    try:
        meta, state = _load_verified(path)
    except CheckpointError as err:
        raise ResumeError(str(err)) from err
    if meta.get("stage") != stage:
        raise ResumeError(f"Checkpoint {uri} was written by stage {meta.get('stage')!r}, not {stage!r}")
    step = int(meta["step"])
    if run_id is None and meta.get("run_id"):
        # the run that wrote it, if it lives in this tracking store (not when copied from elsewhere)
        try:
            run = get_stage_run(client, meta["run_id"], stage)
            run_id = run.info.run_id
        except ResumeError:
            run_id = None
    return ResumePoint(step, meta, state, f"{uri} (step {step})", run_id, run=run, path=path, workdir=workdir)


def resolve(client: MlflowClient, stage: str, launch: LaunchArgs) -> ResumePoint | None:
    """The checkpoint the launch arguments start from, or None for a fresh start."""
    if launch.resume_step is not None and not launch.resume_run:
        raise ResumeError("resume_step needs resume_run=<run id> (or use resume_from=<uri>)")
    if launch.resume_run and launch.resume_from:
        raise ResumeError("Give either resume_run or resume_from, not both")
    if not launch.resuming:
        return None
    workdir = Path(tempfile.mkdtemp(prefix="resume-"))  # removed when the job ends (ResumePoint.remove_download)
    try:
        if launch.resume_run:
            return RunCheckpoints(client, launch.resume_run, (stage,)).load(launch.resume_step, workdir)
        return from_uri(client, stage, launch.resume_from, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def fetch_model(uri: str, workdir: Path) -> Path:
    """A model or checkpoint directory given as a local path or an MLflow URI (``models:/``, ``runs:/``,
    ``s3://``), downloaded into ``workdir`` when remote; ResumeError "Model not found" otherwise."""
    if "://" not in uri and ":/" not in uri:
        path = Path(uri).expanduser()
        if not path.exists():
            raise ResumeError(f"Model not found: {uri}")
        return path
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir)))
    except Exception as err:
        raise ResumeError(f"Model not found: {uri} ({str(err).splitlines()[0]})") from err


def stored_inputs(meta: dict[str, Any], run_inputs: tuple[str, ...] = ALL_RUN_INPUTS) -> dict[str, str]:
    """The runs a checkpoint's job built on (``inputs`` in meta.json; for earlier releases, the stage's
    ``run_inputs`` found in the stored config)."""
    if "inputs" in meta:
        return dict(meta["inputs"])
    legacy = legacy_launch_values(meta.get("config") or {})
    return {key: str(legacy[key]) for key in run_inputs if key in legacy}


__all__ = [
    "ResumeError",
    "ResumePoint",
    "RunCheckpoints",
    "fetch_model",
    "rank_state",
    "resolve",
    "step_of",
    "stored_inputs",
]
