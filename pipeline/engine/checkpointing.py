"""Checkpoints as MLflow artifacts (docs/architecture.md, Checkpoints).

Layout in a run's artifacts::

    checkpoints/step-00001000/state.pt    tensors and plain containers only (weights_only=True)
    checkpoints/step-00001000/meta.json   format, step, sha256, config, metrics, code version
    checkpoints/index.csv                 one row per checkpoint still kept

Commit protocol: the training thread only copies the state's tensors to host memory (a snapshot);
a background thread writes the copy into a staging directory under a temporary name, flushes it,
hashes it and renames it, uploads it, verifies the uploaded sizes, and only then moves the run's
``checkpoint.latest`` tag. At most one checkpoint is in flight: the next one waits for it. A crash at
any point leaves the previous committed checkpoint as the latest. One checkpoint directory (writing,
verifying, loading) is checkpoint_files.py.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunTag

from pipeline.common import faults
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    Snapshotter,
    checkpoint_name,
    remove_unfinished,
    step_of,
    write_local,
)
from pipeline.engine.outage import OUTAGE_LIMIT_S, NotRetried, StorageError, first_line, retry_until
from pipeline.engine.private_apis import artifact_repository

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("name", "step", "epoch", "created", "size", "model", "dataset")  # then the metrics, sorted
CHECKPOINT_DIR = "checkpoints"
INDEX_FILE = f"{CHECKPOINT_DIR}/index.csv"
SLOW_PREVIOUS_S = 1.0  # a checkpoint that waits longer than this for the previous one says so
REPORT_FAILED_DELETES = 3  # a retention delete failing this many commits in a row is logged as an error


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
                raise CheckpointError(
                    f"cannot read {INDEX_FILE} of run {run_id} ({err}); nothing was changed, "
                    "try again when the tracking store answers"
                ) from err
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
        log.warning(
            "%s of run %s is unreadable (%s); rebuilding it from the checkpoints' meta.json", INDEX_FILE, run_id, err
        )
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
                meta = json.loads(
                    Path(client.download_artifacts(run_id, f"{folder}/{META_FILE}", tmp)).read_text(encoding="utf-8")
                )
                row = index_row(meta, tags)
                sizes = {Path(e.path).name: e.file_size for e in client.list_artifacts(run_id, folder)}
            except Exception as err:
                log.warning(
                    "Checkpoint %s of run %s has no readable %s (%s); it stays out of the index",
                    checkpoint_name(step),
                    run_id,
                    META_FILE,
                    err,
                )
                continue
        if sizes.get(STATE_FILE) != meta.get("size"):
            row = {key: value for key, value in row.items() if key in INDEX_COLUMNS}
        rows.append(row)
    return rows


def index_row(meta: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """The index.csv row of a checkpoint, from its meta.json and the run's tags."""
    return {
        "name": checkpoint_name(int(meta["step"])),
        "model": tags.get(tag.MODEL),
        "dataset": tags.get(tag.DATASET),
        "epoch": meta.get("epoch"),
        "step": int(meta["step"]),
        "created": meta.get("created"),
        "size": meta.get("size"),
        **dict(meta.get("metrics") or {}),
    }


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
        on_save: Callable[[int, dict[str, Any]], Any] | None = None,
        on_abandon: Callable[[Any], None] | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.staging_root = staging_root / run_id
        self.policy = policy
        self.index_rows = list(index_rows or [])
        self.on_save = on_save  # callback(step, row) -> link when saving: the metrics of the step are sent with it
        self.on_commit = on_commit  # callback(step, row, link) after a checkpoint is committed
        self.on_abandon = on_abandon  # callback(link) when a checkpoint could not be committed
        self.on_delete = on_delete  # callback(steps) after retention deleted those checkpoints
        self.fence = fence or (lambda: None)  # raises before a write when this job may no longer write (lease lost)
        self.outage_limit_s = outage_limit_s  # how long a failing upload or commit is tried again
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None
        self._snapshots = Snapshotter()
        self._repo = None  # the run's artifact repository, resolved once (each lookup is a get_run)
        self._failed_deletes: Counter[int] = Counter()  # step -> deletes that failed in a row
        self.committed_step: int | None = None  # the newest step this job committed
        remove_unfinished(self.staging_root)

    @property
    def repo(self):
        if self._repo is None:
            self._repo = artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
        return self._repo

    def save(
        self,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any],
        row: dict[str, Any],
        flush_metrics: Callable[..., list] | None = None,
    ) -> None:
        """Snapshot ``state`` (the only work on the caller's thread), then write, hash, upload and commit
        the snapshot in the background. At most one checkpoint is in flight: when this one comes before
        the previous one is stored, it first waits for it (and says so), which keeps commits in step
        order and the host memory to one snapshot. ``flush_metrics`` sends the metrics of the steps up
        to this one and returns the operations in flight: the commit waits for them, so a committed
        checkpoint never points past the metrics in the store (a crash right after the commit would
        otherwise leave a gap in the charts that a resume from this checkpoint never fills). The link that
        ``on_save`` returns goes to ``flush_metrics`` (the points of this step are stored with its logged model's
        ID) and then to ``on_commit``."""
        started = time.monotonic()
        self.wait()  # surfaces a failed previous checkpoint
        waited = time.monotonic() - started
        if waited > SLOW_PREVIOUS_S:
            log.warning(
                "Checkpoint %s waited %.1f s for the previous one to be stored; a larger "
                "checkpoint.save_interval keeps training from waiting",
                checkpoint_name(step),
                waited,
            )
        faults.point("checkpoint.snapshot")
        snapshot = self._snapshots.take(state)
        link = self.on_save(step, row) if self.on_save else None
        metrics_sent = flush_metrics(link=link) if flush_metrics else []  # after the snapshot: no thread competes
        self._pending = self._pool.submit(self._write_and_commit, step, snapshot, meta, row, metrics_sent, link)

    def _write_and_commit(
        self, step: int, state: dict[str, Any], meta: dict[str, Any], row: dict[str, Any], metrics_sent: list, link: Any
    ) -> None:
        try:
            try:
                local = write_local(self.staging_root, step, state, meta)
            except OSError as err:  # ENOSPC, EROFS, EACCES, EIO: the disk will not heal by itself
                raise StorageError(
                    f"writing checkpoint {checkpoint_name(step)} into {self.staging_root} failed: "
                    f"{err.strerror or err} (checkpoint.staging_dir)"
                ) from err
            row = dict(row, size=sum(f.stat().st_size for f in local.iterdir()))
            self._upload_and_commit(step, local, row, metrics_sent)
        except BaseException:
            if link is not None and self.on_abandon is not None and self.committed_step != step:
                self.on_abandon(link)
            raise
        if self.on_commit is not None:
            self.on_commit(step, row, link)

    def log_files(self, local_dir: str | Path, artifact_path: str) -> None:
        """Store other files of the run (e.g. validation samples) under ``artifact_path``, now, through the
        same client as the checkpoints (so fenced the same way when the run is leased)."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

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
        retry_until(
            lambda: self._upload(local, artifact_path),
            f"Uploading checkpoint {name} to the artifact store of run {self.run_id}",
            self.outage_limit_s,
        )
        for op in metrics_sent:
            op.wait()
        # Committed: only now does `checkpoint.latest` move (both tags in one call).
        faults.point("checkpoint.commit")
        self.fence()
        retry_until(
            lambda: self.client.log_batch(
                self.run_id,
                tags=[RunTag(tag.CHECKPOINT_LATEST, artifact_path), RunTag(tag.CHECKPOINT_LATEST_STEP, str(step))],
            ),
            f"Committing checkpoint {name} (the run's checkpoint.latest tags)",
            self.outage_limit_s,
        )
        self.committed_step = step
        self.index_rows = [r for r in self.index_rows if int(r["step"]) != step] + [row]
        try:
            self._apply_retention(step)
        except NotRetried:
            raise
        except Exception as err:  # the checkpoint is committed; the next commit catches up
            log.warning(
                "Checkpoint %s is committed, but retention could not run now (%s); the next commit tries again",
                name,
                first_line(err),
            )
        try:  # written whatever retention did: it lists what is stored and ranks the best
            self.fence()
            self._write_index()
        except NotRetried:
            raise
        except Exception as err:
            log.warning(
                "Checkpoint %s is committed, but %s could not be written now (%s); the next commit writes it",
                name,
                INDEX_FILE,
                first_line(err),
            )
        shutil.rmtree(local, ignore_errors=True)
        log.info("Committed checkpoint %s (%.1f MB, upload %.1fs)", name, row["size"] / 1e6, time.monotonic() - started)

    def _upload(self, local: Path, artifact_path: str) -> None:
        faults.point("checkpoint.upload")
        self.fence()
        self.repo.log_artifacts(str(local), artifact_path)
        uploaded = {Path(e.path).name: e.file_size for e in self.repo.list_artifacts(artifact_path)}
        for f in local.iterdir():
            if uploaded.get(f.name) != f.stat().st_size:
                raise CheckpointError(
                    f"upload of {artifact_path}/{f.name} could not be verified "
                    f"(local {f.stat().st_size} bytes, store {uploaded.get(f.name)})"
                )

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
            log.warning(
                "%s lists checkpoints at steps %s that are not stored; their rows are dropped",
                INDEX_FILE,
                ", ".join(map(str, stale)),
            )
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
                log.log(
                    logging.ERROR if persistent else logging.WARNING,
                    "Retention could not delete checkpoint %s (%s; %d time(s) in a row); it stays in %s and is "
                    "tried again at the next commit%s",
                    checkpoint_name(step),
                    first_line(err),
                    self._failed_deletes[step],
                    INDEX_FILE,
                    "; check the artifact store's permissions, or delete it by hand" if persistent else "",
                )
                continue
            self._failed_deletes.pop(step, None)
            log.info("Retention: deleted checkpoint %s", checkpoint_name(step))
            deleted.append(step)
        if deleted and self.on_delete is not None:
            self.on_delete(deleted)
        self.index_rows = sorted(
            (r for r in self.index_rows if int(r["step"]) in keep | failed), key=lambda r: int(r["step"])
        )

    def _write_index(self) -> None:
        """index.csv in a fixed column order (INDEX_COLUMNS, then the metrics sorted), with times written
        as "2026-11-27 12:08:19 UTC": MLflow's table view turns ISO times into dates it leaves blank."""
        present = {c for row in self.index_rows for c in row}
        columns = [c for c in INDEX_COLUMNS if c in present] + sorted(present - set(INDEX_COLUMNS))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(
            {**row, "created": display_time(row.get("created"))} if "created" in row else row for row in self.index_rows
        )
        faults.point("checkpoint.index")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(INDEX_FILE).name
            path.write_text(buffer.getvalue(), encoding="utf-8")
            self.repo.log_artifact(str(path), CHECKPOINT_DIR)


def display_time(value: Any) -> Any:
    """An ISO time of utc_now as "2026-11-27 12:08:19 UTC"; anything else unchanged."""
    if isinstance(value, str) and value.endswith("+00:00") and "T" in value:
        return value[: -len("+00:00")].replace("T", " ") + " UTC"
    return value
