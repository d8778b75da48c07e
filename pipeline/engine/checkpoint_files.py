"""One checkpoint directory: writing it atomically, verifying it and loading it (docs/architecture.md,
Checkpoints).

A checkpoint is ``step-XXXXXXXX/state.pt`` (tensors and plain containers only, loaded with
``weights_only=True``) and ``step-XXXXXXXX/meta.json`` (format, step, sha256, config, metrics, code
version). How a run's checkpoints are stored, committed and kept is in checkpointing.py; how a state.pt of an
older format version is read, in checkpoint_migrate.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.common import faults
from pipeline.common.files import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # of state.pt: version 2 holds every key the engine writes; older ones are migrated on read
RESUME_META = ("stage", "step", "config")  # what a resume reads from meta.json besides the verified sha256
STATE_FILE, META_FILE = "state.pt", "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


LAUNCH_DIR_ENV = "PIPELINE_LAUNCH_DIR"  # where the job was launched from, when its working directory is not that


def staging_root(configured: str) -> Path:
    """``checkpoint.staging_dir`` as a path. A relative one is relative to the directory the job was launched
    from: MLflow Projects run an entry point inside the project folder, so ``main`` names its own working
    directory in ``PIPELINE_LAUNCH_DIR`` for its steps (the staging area never lands inside the project)."""
    path = Path(configured).expanduser()
    launched_from = os.environ.get(LAUNCH_DIR_ENV)
    return Path(launched_from) / path if launched_from and not path.is_absolute() else path


@contextmanager
def staging_here() -> Iterator[None]:
    """While a step is started: MLflow Projects runs it in the project folder, so it is told where `main` runs
    (``PIPELINE_LAUNCH_DIR``), and stages its checkpoints there. Only then: this process's environment (a
    notebook's, a test's) is left as it was."""
    before = os.environ.get(LAUNCH_DIR_ENV)
    os.environ[LAUNCH_DIR_ENV] = before or os.getcwd()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LAUNCH_DIR_ENV, None)


def write_local(staging_root: Path, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write state.pt + meta.json atomically into ``staging_root/step-XXXXXXXX``."""
    staging_root.mkdir(parents=True, exist_ok=True)
    final = staging_root / checkpoint_name(step)
    tmp = staging_root / f".tmp-{checkpoint_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state_path = tmp / STATE_FILE
        with open(state_path, "wb") as f:
            faults.point("checkpoint.serialize")
            torch.save(state, f)
            f.flush()
            faults.point("checkpoint.fsync")
            os.fsync(f.fileno())
        faults.point("checkpoint.sha256")
        meta = dict(meta, size=state_path.stat().st_size, sha256=sha256_file(state_path))
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    return final


def remove_unfinished(staging_root: Path) -> None:
    """Empty a run's staging directory when a job of the run starts: what an earlier job left there was
    cut short by a crash (a write under a temporary name, a checkpoint not yet uploaded or committed, or
    a committed one not yet removed). None of it is ever listed, loaded or used; the store holds what
    was committed."""
    if not staging_root.is_dir():
        return
    for leftover in staging_root.iterdir():
        shutil.rmtree(leftover, ignore_errors=True)
        log.info(
            "Removed %s from staging, left by an earlier job of this run that stopped before storing it", leftover.name
        )


class Snapshotter:
    """The checkpoint's own copy of the training state, taken on the training thread: every tensor is
    copied to host memory (from a GPU into pinned buffers that are reused from one checkpoint to the
    next), containers are rebuilt, plain values are shared (they are immutable). Training can go on
    changing its tensors while a background thread serializes the copy."""

    def __init__(self):
        self._pinned: dict[tuple, torch.Tensor] = {}

    def take(self, state: Any) -> Any:
        from_gpu = []
        snapshot = self._copy(state, (), from_gpu)
        if from_gpu:
            torch.cuda.synchronize()
        return snapshot

    def _copy(self, obj: Any, path: tuple, from_gpu: list) -> Any:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach()
            if tensor.device.type == "cpu":
                return tensor.clone()
            buffer = self._pinned.get(path)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = self._pinned[path] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            buffer.copy_(tensor, non_blocking=True)
            from_gpu.append(path)
            return buffer
        if isinstance(obj, dict):
            return {key: self._copy(value, (*path, key), from_gpu) for key, value in obj.items()}
        if isinstance(obj, tuple) and not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
            return obj  # immutable all the way down (e.g. Python's RNG state, 625 ints)
        if isinstance(obj, (list, tuple)):
            items = [self._copy(value, (*path, i), from_gpu) for i, value in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} holds a {type(meta).__name__}, not an object")
    return meta


def check_resumable(meta: dict[str, Any], ckpt_dir: Path) -> None:
    """What a resume reads from a verified checkpoint's meta.json is there and well-formed."""
    missing = [key for key in RESUME_META if key not in meta]
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: {META_FILE} lacks {', '.join(missing)}; it was not written "
            "by this pipeline or was edited"
        )
    if not isinstance(meta["config"], dict) or not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} has a malformed config or step")


STATE_PARTS = {
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "modules": dict,
    "optimizers": dict,
    "schedulers": dict,
    "rng": dict,
}  # what the engine restores from state.pt


def check_state(state: Any, meta: dict[str, Any], ckpt_dir: Path) -> None:
    """A loaded state.pt has the parts the engine restores, at the step meta.json names (a file that
    matches its sha256 but was written by something else is refused here, not halfway through a restore)."""
    parts = state if isinstance(state, dict) else {}
    wrong = [key for key, kind in STATE_PARTS.items() if not isinstance(parts.get(key), kind)]
    if wrong:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: {STATE_FILE} lacks or has malformed {', '.join(wrong)}; it was "
            "not written by this pipeline"
        )
    if state["step"] != meta["step"]:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: {STATE_FILE} is at step {state['step']} but {META_FILE} says {meta['step']}"
        )


def verify(ckpt_dir: Path) -> dict[str, Any]:
    """Check state.pt against the sha256 in meta.json; returns the meta."""
    meta = read_meta(ckpt_dir)
    state_path = ckpt_dir / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {STATE_FILE}")
    actual = sha256_file(state_path)
    if actual != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: {STATE_FILE} is corrupted or truncated "
            f"(sha256 {actual[:12]}… does not match {str(meta.get('sha256'))[:12]}… in {META_FILE})"
        )
    check_version(meta, ckpt_dir)
    return meta


def check_version(meta: dict[str, Any], ckpt_dir: Path | str) -> int:
    """The checkpoint's format version, if this code reads it (1 to FORMAT_VERSION, checkpoint_migrate.py
    brings an older one up to date); a newer or unknown one is refused, saying what to do."""
    version = meta.get("format_version")
    if type(version) is int and FORMAT_VERSION < version:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has format version {version}, this code reads versions 1 to {FORMAT_VERSION}: "
            "it was written by a newer release of the pipeline; update this checkout (git pull) to load it"
        )
    if type(version) is not int or version < 1:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has format version {version!r}, this code reads versions 1 to "
            f"{FORMAT_VERSION}: no release wrote that one; {META_FILE} was edited or the checkpoint is not "
            "this pipeline's"
        )
    return version


def load_state(ckpt_dir: Path) -> dict[str, Any]:
    """Load state.pt with weights_only=True: tensors and plain containers only, never code."""
    path = ckpt_dir / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(possibly code). Only checkpoints written by this pipeline can be loaded. ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
