"""Find, download and verify the checkpoint a job resumes from (DESIGN §5).

Every mistake is caught here, before anything is written to any run: an unknown or deleted run,
a run of another stage, a run without checkpoints, a missing step or path. A corrupted latest
checkpoint makes ``resume_run`` fall back to the newest older one that verifies, and say so.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.engine.checkpointing import (
    CheckpointError,
    checkpoint_name,
    download_checkpoint,
    list_checkpoints,
    load_state,
    step_of,
    verify,
)

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """A resume request that cannot be honoured; the message says what to do."""


@dataclass
class ResumePoint:
    step: int
    meta: dict[str, Any]
    state: dict[str, Any]
    source: str  # human-readable origin, e.g. "run 1a2b… checkpoint step-00000100"
    run_id: str | None  # the run the checkpoint belongs to (None for a plain path)


def get_stage_run(client: MlflowClient, run_id: str, stage: str):
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ResumeError(
            f"Run {run_id} not found in the tracking store {mlflow.get_tracking_uri()}. "
            "Check the run ID (MLflow UI: run page header) and MLFLOW_TRACKING_URI."
        ) from err
    if run.info.lifecycle_stage == "deleted":
        raise ResumeError(f"Run {run_id} is deleted. Restore it in the MLflow UI (or `mlflow gc` removed it).")
    run_stage = run.data.tags.get("stage")
    if run_stage != stage:
        raise ResumeError(
            f"Run {run_id} is a {run_stage or 'non-pipeline'} run, not a {stage} run; "
            f"resume it with its own entry point or pick a {stage} run."
        )
    return run


def _load_verified(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = verify(ckpt_dir)
    return meta, load_state(ckpt_dir)


def from_run(client: MlflowClient, stage: str, run_id: str, step: int | None, workdir: Path) -> ResumePoint:
    """The run's checkpoint at ``step``, or its latest committed one (falling back if corrupted)."""
    run = get_stage_run(client, run_id, stage)
    stored = list_checkpoints(client, run_id)
    if not stored:
        raise ResumeError(f"Run {run_id} has no checkpoints to resume from; start a fresh run instead.")
    if step is not None:
        if step not in stored:
            raise ResumeError(
                f"Run {run_id} has no checkpoint at step {step}; available steps: {', '.join(map(str, stored))}"
            )
        candidates = [step]
    else:
        latest = run.data.tags.get("checkpoint.latest_step")
        committed = [s for s in stored if latest is not None and s <= int(latest)]
        if not committed:
            raise ResumeError(f"Run {run_id} has no committed checkpoint (no upload finished); start a fresh run.")
        candidates = sorted(committed, reverse=True)
    errors = []
    for candidate in candidates:
        local = download_checkpoint(client, run_id, candidate, workdir / checkpoint_name(candidate))
        try:
            meta, state = _load_verified(local)
        except CheckpointError as err:
            log.error("%s", err)
            errors.append(str(err))
            if step is None and candidate != candidates[-1]:
                log.warning("Falling back to the previous checkpoint of run %s", run_id)
            continue
        if errors:
            log.warning("Resuming from older checkpoint %s because newer ones failed verification",
                        checkpoint_name(candidate))
        return ResumePoint(candidate, meta, state, f"run {run_id} checkpoint {checkpoint_name(candidate)}", run_id)
    raise ResumeError(f"No usable checkpoint in run {run_id}: " + " | ".join(errors))


def from_uri(client: MlflowClient, stage: str, uri: str, workdir: Path) -> ResumePoint:
    """``runs:/<id>/checkpoints/step-N``, an ``s3://`` prefix or a local directory."""
    run_id = None
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        get_stage_run(client, run_id, stage)
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
            run_id = get_stage_run(client, meta["run_id"], stage).info.run_id
        except ResumeError:
            run_id = None
    return ResumePoint(step, meta, state, f"{uri} (step {step})", run_id)


def resolve(
    client: MlflowClient, stage: str, resume_run: str | None, resume_step: int | None, resume_from: str | None
) -> ResumePoint | None:
    """The checkpoint to start from, or None for a fresh start."""
    if resume_step is not None and not resume_run:
        raise ResumeError("resume_step needs resume_run=<run id> (or use checkpoint.resume_from=<uri>)")
    if resume_run and resume_from:
        raise ResumeError("Give either resume_run or checkpoint.resume_from, not both")
    if not resume_run and not resume_from:
        return None
    workdir = Path(tempfile.mkdtemp(prefix="resume-"))
    if resume_run:
        return from_run(client, stage, resume_run, resume_step, workdir)
    return from_uri(client, stage, resume_from, workdir)


__all__ = ["ResumeError", "ResumePoint", "resolve", "step_of"]
