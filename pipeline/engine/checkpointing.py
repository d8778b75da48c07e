"""Checkpoints as MLflow artifacts (docs/architecture.md, Checkpoints).

Layout in a run's artifacts::

    checkpoints/step-00001000/state.pt    tensors and plain containers only (weights_only=True)
    checkpoints/step-00001000/meta.json   format, step, sha256, config, metrics, code version
    checkpoints/index.csv                 one row per checkpoint still kept

Commit protocol: the training thread only copies the state's tensors to host memory (a snapshot);
a background thread writes the copy into a staging directory under a temporary name, flushes it,
hashes it and renames it, uploads it, verifies the uploaded sizes, and only then moves the run's
``checkpoint.latest`` tag. At most one checkpoint is in flight: the next one waits for it. A crash at
any point leaves the previous committed checkpoint as the latest.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import pickle
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from pipeline.common import faults
from pipeline.engine import tags as tag
from pipeline.engine.outage import OUTAGE_LIMIT_S, NotRetried, StorageError, first_line, retry_until
from pipeline.common.files import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_COLUMNS = ("name", "step", "epoch", "created", "size", "model", "dataset")  # then the metrics, sorted
RESUME_META = ("stage", "step", "config")  # what a resume reads from meta.json besides the verified sha256
STATE_FILE, META_FILE = "state.pt", "meta.json"
CHECKPOINT_DIR = "checkpoints"
INDEX_FILE = f"{CHECKPOINT_DIR}/index.csv"
SLOW_PREVIOUS_S = 1.0
REPORT_FAILED_DELETES = 3  # a retention delete failing this many commits in a row is logged as an error  # a checkpoint that waits longer than this for the previous one says so


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""



def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def code_version() -> str | None:
    """The git commit of the code, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# RNG state: plain containers only, so the checkpoint loads with weights_only=True
# --------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
         np_state["has_gauss"], np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Writing, verifying and reading one checkpoint directory
# --------------------------------------------------------------------------------------------


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
        log.info("Removed %s from staging, left by an earlier job of this run that stopped before storing it",
                 leftover.name)


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
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} lacks {', '.join(missing)}; it was not written "
                              "by this pipeline or was edited")
    if not isinstance(meta["config"], dict) or not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} has a malformed config or step")


STATE_PARTS = {"step": int, "epoch": int, "batch_in_epoch": int, "modules": dict, "optimizers": dict,
               "schedulers": dict, "rng": dict}  # what the engine restores from state.pt


def check_state(state: Any, meta: dict[str, Any], ckpt_dir: Path) -> None:
    """A loaded state.pt has the parts the engine restores, at the step meta.json names (a file that
    matches its sha256 but was written by something else is refused here, not halfway through a restore)."""
    parts = state if isinstance(state, dict) else {}
    wrong = [key for key, kind in STATE_PARTS.items() if not isinstance(parts.get(key), kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {STATE_FILE} lacks or has malformed {', '.join(wrong)}; it was "
                              "not written by this pipeline")
    if state["step"] != meta["step"]:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {STATE_FILE} is at step {state['step']} but {META_FILE} says "
                              f"{meta['step']}")


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
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has format version {meta.get('format_version')}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    return meta


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


# --------------------------------------------------------------------------------------------
# A run's checkpoints in the artifact store
# --------------------------------------------------------------------------------------------


def list_checkpoints(client: MlflowClient, run_id: str) -> list[int]:
    """Steps of the checkpoint directories in a run's artifacts, oldest first. A run without any lists
    as empty; a store that cannot be reached raises (it must never read as "no checkpoints")."""
    return checkpoint_steps(client.list_artifacts(run_id, CHECKPOINT_DIR))


def checkpoint_steps(entries) -> list[int]:
    """Steps of the checkpoint directories among a listing of ``checkpoints/``, oldest first."""
    steps = [step_of(Path(e.path).name) for e in entries if e.is_dir]
    return sorted(s for s in steps if s is not None)


def download_checkpoint(client: MlflowClient, run_id: str, step: int, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{checkpoint_name(step)}", str(dst))
    return Path(path)


INDEX_READ_TRIES = 3  # a transient store error while reading index.csv is retried (1 s, 2 s)


def read_index(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    """The rows of the run's ``checkpoints/index.csv``; [] only when the run has none.

    A store that cannot be read raises CheckpointError after a few tries: an outage must not look
    like an empty index, from which retention would conclude that nothing is worth keeping. An index
    that downloads but is damaged (junk, cut short, empty, a row without a step or with the wrong
    number of fields) is rebuilt from the checkpoints' own meta.json files, with a warning.
    """
    for attempt in range(INDEX_READ_TRIES):
        try:
            names = {Path(e.path).name for e in client.list_artifacts(run_id, CHECKPOINT_DIR)}
            if Path(INDEX_FILE).name not in names:
                return []
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(client.download_artifacts(run_id, INDEX_FILE, tmp)).read_bytes()
            break
        except Exception as err:  # the store's own exception types vary (MLflow, boto, OS)
            if attempt == INDEX_READ_TRIES - 1:
                raise CheckpointError(f"cannot read {INDEX_FILE} of run {run_id} ({err}); nothing was changed, "
                                      "try again when the tracking store answers") from err
            time.sleep(2**attempt)
    try:
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
        if not rows or not data.endswith(b"\n"):  # the pipeline writes at least one row, then a line end
            raise ValueError("no rows" if not rows else "cut short")
        for row in rows:
            if None in row or None in row.values():  # a row with more or fewer fields than the header
                raise ValueError(f"row {row.get('name')!r} does not match the header")
            int(row["step"])
        return rows
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
        log.warning("%s of run %s is unreadable (%s); rebuilding it from the checkpoints' meta.json",
                    INDEX_FILE, run_id, err)
        return rows_from_meta(client, run_id)


def rows_from_meta(client: MlflowClient, run_id: str, steps: list[int] | None = None) -> list[dict[str, Any]]:
    """Index rows rebuilt from stored checkpoints' meta.json (all of them, or those at ``steps``). One
    without a readable meta.json is left out, so retention never deletes it; one whose state.pt is not
    the size its meta.json names (an upload cut short) gets no metric values, so it is never ranked best."""
    tags = client.get_run(run_id).data.tags
    rows = []
    for step in list_checkpoints(client, run_id) if steps is None else steps:
        folder = f"{CHECKPOINT_DIR}/{checkpoint_name(step)}"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                meta = json.loads(Path(client.download_artifacts(run_id, f"{folder}/{META_FILE}", tmp))
                                  .read_text(encoding="utf-8"))
                row = index_row(meta, tags)
                sizes = {Path(e.path).name: e.file_size for e in client.list_artifacts(run_id, folder)}
            except Exception as err:
                log.warning("Checkpoint %s of run %s has no readable %s (%s); it stays out of the index",
                            checkpoint_name(step), run_id, META_FILE, err)
                continue
        if sizes.get(STATE_FILE) != meta.get("size"):
            row = {key: value for key, value in row.items() if key in INDEX_COLUMNS}
        rows.append(row)
    return rows


def index_row(meta: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """The index.csv row of a checkpoint, from its meta.json and the run's tags."""
    return {"name": checkpoint_name(int(meta["step"])), "model": tags.get(tag.MODEL), "dataset": tags.get(tag.DATASET),
            "epoch": meta.get("epoch"), "step": int(meta["step"]), "created": meta.get("created"),
            "size": meta.get("size"), **dict(meta.get("metrics") or {})}


@dataclass
class RetentionPolicy:
    keep_last_n: int
    keep_best_k: int
    monitor: str
    mode: str  # min | max


def steps_to_keep(rows: list[dict[str, Any]], policy: RetentionPolicy, latest: int) -> set[int]:
    """Last N by step, best K by the monitored metric, and always the latest committed one."""
    steps = sorted(int(r["step"]) for r in rows)
    keep = set(steps[-policy.keep_last_n :]) if policy.keep_last_n > 0 else set()
    scored = []
    for r in rows:  # a missing, unparsable or non-finite value ranks below every real one (never "best")
        try:
            value = float(r.get(policy.monitor))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            scored.append((value, int(r["step"])))
    scored.sort(reverse=policy.mode == "max")
    keep |= {step for _, step in scored[: max(policy.keep_best_k, 0)]}
    keep.add(latest)
    return keep


class CheckpointStore:
    """Saves checkpoints for one run: local staging, background upload, commit, retention."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        staging_root: Path,
        policy: RetentionPolicy,
        index_rows: list[dict[str, Any]] | None = None,
        on_commit=None,
        fence: Callable[[], None] | None = None,
        outage_limit_s: float = OUTAGE_LIMIT_S,
        on_delete: Callable[[list[int]], None] | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.staging_root = staging_root / run_id
        self.policy = policy
        self.index_rows = list(index_rows or [])
        self.on_commit = on_commit  # callback(step, row, metrics) after a checkpoint is committed
        self.on_delete = on_delete  # callback(steps) after retention deleted those checkpoints
        self.fence = fence or (lambda: None)  # raises before a write when this job may no longer write (lease lost)
        self.outage_limit_s = outage_limit_s  # how long a failing upload or commit is tried again
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None
        self._snapshots = Snapshotter()
        self._repo = None  # the run's artifact repository, resolved once (each lookup is a get_run)
        self._failed_deletes: Counter[int] = Counter()  # step -> deletes that failed in a row
        remove_unfinished(self.staging_root)

    @property
    def repo(self):
        if self._repo is None:
            self._repo = get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
        return self._repo

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], row: dict[str, Any],
             flush_metrics: Callable[[], list] | None = None, metrics: list | None = None) -> None:
        """Snapshot ``state`` (the only work on the caller's thread), then write, hash, upload and commit
        the snapshot in the background. At most one checkpoint is in flight: when this one comes before
        the previous one is stored, it first waits for it (and says so), which keeps commits in step
        order and the host memory to one snapshot. ``flush_metrics`` sends the metrics of the steps up
        to this one and returns the operations in flight: the commit waits for them, so a committed
        checkpoint never points past the metrics in the store (a crash right after the commit would
        otherwise leave a gap in the charts that a resume from this checkpoint never fills). ``metrics``
        (the points logged at this step) are handed to ``on_commit``."""
        started = time.monotonic()
        self.wait()  # surfaces a failed previous checkpoint
        waited = time.monotonic() - started
        if waited > SLOW_PREVIOUS_S:
            log.warning("Checkpoint %s waited %.1f s for the previous one to be stored; a larger "
                        "checkpoint.save_interval keeps training from waiting", checkpoint_name(step), waited)
        faults.point("checkpoint.snapshot")
        snapshot = self._snapshots.take(state)
        metrics_sent = flush_metrics() if flush_metrics else []  # after the snapshot: no thread competes with it
        self._pending = self._pool.submit(self._write_and_commit, step, snapshot, meta, row, metrics_sent,
                                          list(metrics or []))

    def _write_and_commit(self, step: int, state: dict[str, Any], meta: dict[str, Any], row: dict[str, Any],
                          metrics_sent: list, metrics: list) -> None:
        try:
            local = write_local(self.staging_root, step, state, meta)
        except OSError as err:  # ENOSPC, EROFS, EACCES, EIO: the disk will not heal by itself
            raise StorageError(f"writing checkpoint {checkpoint_name(step)} into {self.staging_root} failed: "
                               f"{err.strerror or err} (checkpoint.staging_dir)") from err
        row = dict(row, size=sum(f.stat().st_size for f in local.iterdir()))
        self._upload_and_commit(step, local, row, metrics_sent)
        if self.on_commit is not None:
            self.on_commit(step, row, metrics)

    def wait(self) -> None:
        """Block until the pending upload is committed; re-raise its error if it failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _upload_and_commit(self, step: int, local: Path, row: dict[str, Any], metrics_sent: list) -> None:
        name = checkpoint_name(step)
        artifact_path = f"{CHECKPOINT_DIR}/{name}"
        started = time.monotonic()
        self.fence()  # a job paused past its lease must not upload into the new holder's checkpoint
        retry_until(lambda: self._upload(local, artifact_path),
                    f"Uploading checkpoint {name} to the artifact store of run {self.run_id}", self.outage_limit_s)
        for op in metrics_sent:
            op.wait()
        # Committed: only now does `checkpoint.latest` move (both tags in one call).
        faults.point("checkpoint.commit")
        self.fence()
        retry_until(lambda: self.client.log_batch(self.run_id, tags=[
            RunTag(tag.CHECKPOINT_LATEST, artifact_path), RunTag(tag.CHECKPOINT_LATEST_STEP, str(step))]),
            f"Committing checkpoint {name} (the run's checkpoint.latest tags)", self.outage_limit_s)
        self.index_rows = [r for r in self.index_rows if int(r["step"]) != step] + [row]
        try:
            self._apply_retention(step)
        except NotRetried:
            raise
        except Exception as err:  # the checkpoint is committed; the next commit catches up
            log.warning("Checkpoint %s is committed, but retention could not run now (%s); the next commit tries "
                        "again", name, first_line(err))
        try:  # written whatever retention did: it lists what is stored and ranks the best
            self.fence()
            self._write_index()
        except NotRetried:
            raise
        except Exception as err:
            log.warning("Checkpoint %s is committed, but %s could not be written now (%s); the next commit writes "
                        "it", name, INDEX_FILE, first_line(err))
        shutil.rmtree(local, ignore_errors=True)
        log.info("Committed checkpoint %s (%.1f MB, upload %.1fs)", name, row["size"] / 1e6, time.monotonic() - started)

    def _upload(self, local: Path, artifact_path: str) -> None:
        faults.point("checkpoint.upload")
        self.fence()
        self.repo.log_artifacts(str(local), artifact_path)
        uploaded = {Path(e.path).name: e.file_size for e in self.repo.list_artifacts(artifact_path)}
        for f in local.iterdir():
            if uploaded.get(f.name) != f.stat().st_size:
                raise CheckpointError(f"upload of {artifact_path}/{f.name} could not be verified "
                                      f"(local {f.stat().st_size} bytes, store {uploaded.get(f.name)})")

    def _apply_retention(self, latest: int) -> None:
        """Delete what the policy does not keep, among the checkpoints the index knows and the store holds.
        A row for a step the store no longer holds (an index written before a delete, edited, or restored
        from a backup) is dropped, never ranked: it could push a real checkpoint out of the best K. A
        checkpoint missing from the index (an index that could not be read, an upload cut short) is never
        deleted. A delete that fails keeps its row, so the next commit tries again; one that keeps failing
        is reported as an error at every commit."""
        stored = set(checkpoint_steps(self.repo.list_artifacts(CHECKPOINT_DIR)))
        stale = sorted(int(r["step"]) for r in self.index_rows if int(r["step"]) not in stored)
        if stale:
            log.warning("%s lists checkpoints at steps %s that are not stored; their rows are dropped", INDEX_FILE,
                        ", ".join(map(str, stale)))
        self.index_rows = [r for r in self.index_rows if int(r["step"]) in stored]
        keep = steps_to_keep(self.index_rows, self.policy, latest)
        deleted, failed = [], set()
        for step in sorted(int(r["step"]) for r in self.index_rows):
            if step in keep or step > latest:
                continue
            self.fence()
            try:
                faults.point("checkpoint.retention")
                self.repo.delete_artifacts(f"{CHECKPOINT_DIR}/{checkpoint_name(step)}")
            except Exception as err:  # the store's own exception types vary
                failed.add(step)
                self._failed_deletes[step] += 1
                persistent = self._failed_deletes[step] >= REPORT_FAILED_DELETES
                log.log(logging.ERROR if persistent else logging.WARNING,
                        "Retention could not delete checkpoint %s (%s; %d time(s) in a row); it stays in %s and is "
                        "tried again at the next commit%s", checkpoint_name(step), first_line(err),
                        self._failed_deletes[step], INDEX_FILE,
                        "; check the artifact store's permissions, or delete it by hand" if persistent else "")
                continue
            self._failed_deletes.pop(step, None)
            log.info("Retention: deleted checkpoint %s", checkpoint_name(step))
            deleted.append(step)
        if deleted and self.on_delete is not None:
            self.on_delete(deleted)
        self.index_rows = sorted((r for r in self.index_rows if int(r["step"]) in keep | failed),
                                 key=lambda r: int(r["step"]))

    def _write_index(self) -> None:
        """index.csv in a fixed column order (INDEX_COLUMNS, then the metrics sorted), with times written
        as "2026-11-27 12:08:19 UTC": MLflow's table view turns ISO times into dates it leaves blank."""
        present = {c for row in self.index_rows for c in row}
        columns = [c for c in INDEX_COLUMNS if c in present] + sorted(present - set(INDEX_COLUMNS))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**row, "created": display_time(row.get("created"))} if "created" in row else row
                         for row in self.index_rows)
        faults.point("checkpoint.index")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(INDEX_FILE).name
            path.write_text(buffer.getvalue(), encoding="utf-8")
            self.repo.log_artifact(str(path), CHECKPOINT_DIR)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def display_time(value: Any) -> Any:
    """An ISO time of utc_now as "2026-11-27 12:08:19 UTC"; anything else unchanged."""
    if isinstance(value, str) and value.endswith("+00:00") and "T" in value:
        return value[: -len("+00:00")].replace("T", " ") + " UTC"
    return value
