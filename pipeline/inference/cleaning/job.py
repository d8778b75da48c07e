"""A cleaning job in its MLflow run: its settings from the config and the Ray cluster it joined, the Ray Data
pipeline run to the end (or to a stop), its rows committed to the run every few seconds, its progress logged by
step, and how it ended (engine/outcomes.py; docs/cleaning.md).

The step of every metric is the number of inputs in the manifest so far, so the charts of a resumed job go
on where the killed one stopped. Throughput and real-time factors are those of the current attempt.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from tqdm import tqdm

from pipeline.config import ConfigError
from pipeline.engine import tags as tag
from pipeline.engine.outcomes import FINISHED, STOPPED, STORAGE_FAILED, Outcome
from pipeline.engine.private_apis import init_local_ray
from pipeline.inference.cleaning import dataflow
from pipeline.inference.cleaning.config import FORMATS, CleanCorpusConfig
from pipeline.inference.cleaning.manifest import as_table, commit_part
from pipeline.inference.cleaning.reaper import Reaper, marking

log = logging.getLogger(__name__)

CPU_PER_TASK = 0.25  # decode and write tasks: light, they wait on storage most of the time
CPU_PER_SCORER = 0.5
# Decode and write tasks at once, per restore worker. Each task runs in a Ray worker process that imports torch
# (about 0.3 GB that no other process shares, 0.5 GB with the audio modules), and without a bound Ray starts one
# per free CPU / CPU_PER_TASK: 250 on a 64-core machine. Decoding or writing a file takes a small fraction of
# restoring it on a CPU; on a GPU, restoring it can take as little time as decoding it, so decoding gets two.
DECODE_TASKS_PER_WORKER = {"cpu": 1, "gpu": 2}
WRITE_TASKS_PER_WORKER = 1
# A local Ray's object store when ray_object_store_mb=0, instead of Ray's 30 % of the machine's memory (7 GB
# here): the chain's checkpoints (about 1.1 GB for hubert_base with a v1 vocoder) and the blocks Ray Data keeps
# in flight (at most half the store: 1 GB of float32 audio at 16 kHz is 4.6 h ahead of the restore workers).
# Ray writes what does not fit to disk instead of failing. Never more than Ray's own default.
AUTO_OBJECT_STORE_MB = 2048
RAY_OBJECT_STORE_SHARE = 0.3  # Ray's default object store: this share of the machine's memory
_reaper: Reaper | None = None  # of this process's latest local Ray


@dataclass
class Settings:
    """What the pipeline needs, decided once by the entry point."""

    rate_in: int
    suffix: str  # .wav | .flac
    output: str
    file_format: str
    subtype: str
    restore: dict  # Restorer's options (device, precision, chunking, batch_size, threads, ssl_weights)
    workers: int  # restore actors
    gpus_per_worker: float
    score_workers: int
    scores: bool
    files_per_batch: int
    commit_seconds: float


def start_ray(address: str, object_store_mb: int) -> None:
    """Join the cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``) or start a local Ray with
    this machine's cores; ConnectionError when the cluster cannot be reached."""
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    if address and address != "auto":
        check_reachable(address)
    options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            start_local_ray(object_store_mb, options)
    finally:  # ray.init replaces the process's SIGTERM handler with sys.exit and never puts it back
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's execution-plan lines


def start_local_ray(object_store_mb: int, options: dict) -> None:
    """A local Ray whose processes end with this one however it ends (``reaper.py``), its object store sized
    for the job (``AUTO_OBJECT_STORE_MB`` unless ``object_store_mb`` says otherwise)."""
    global _reaper
    if _reaper is not None:  # the previous job's Ray is shut down: its reaper ends what it left, and exits
        _reaper.release()
    _reaper = Reaper.start()
    with marking(_reaper):
        try:
            # idle task workers kept 60 s (Ray's default: 1 s past num_cpus workers; a new one imports torch again)
            context = init_local_ray(
                idle_worker_seconds=60,
                num_cpus=os.cpu_count(),
                object_store_memory=object_store_bytes(object_store_mb),
                **options,
            )
        except BaseException:  # what a failed start left running ends now, not when this process does
            _reaper.release()
            raise
    _reaper.announce(context.address_info.get("session_dir", ""))


def stop_ray() -> None:
    """Shut Ray down (the job's connection, or the local Ray); a local Ray's reaper then ends whatever it left
    and exits at once, rather than when this process does."""
    import ray

    global _reaper
    ray.shutdown()
    if _reaper is not None:
        _reaper.release()
        _reaper = None


def object_store_bytes(object_store_mb: int) -> int:
    """The local object store: ``object_store_mb`` when given, else ``AUTO_OBJECT_STORE_MB`` capped at Ray's
    default for this machine."""
    if object_store_mb:
        return object_store_mb * 2**20
    import psutil

    return min(AUTO_OBJECT_STORE_MB * 2**20, int(psutil.virtual_memory().total * RAY_OBJECT_STORE_SHARE))


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ConnectionError unless ``host:port`` of a Ray address answers (Ray itself retries for minutes)."""
    import socket as sockets

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with sockets.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as err:
        raise ConnectionError(f"nothing answers at {address} ({err})") from None


def checkpoint_files(adapter_dir: Path, vocoder_dir: Path) -> dict[str, bytes]:
    """The chain's two verified checkpoint directories as bytes, for restore actors on any machine."""
    return {
        f"{name}/{p.relative_to(root).as_posix()}": p.read_bytes()
        for name, root in (("adapter", adapter_dir), ("vocoder", vocoder_dir))
        for p in root.rglob("*")
        if p.is_file()
    }


def restorer_cpus(s: Settings) -> float:
    """CPUs a CPU restore actor reserves: half its threads, at most one (the rest is left to the tasks)."""
    return min(1.0, s.restore["threads"] / 2)


def settings(cfg: CleanCorpusConfig, rate_in: int) -> Settings:
    """What the pipeline needs, from the config and the cluster the job joined."""
    import ray

    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0)) if cfg.device != "cpu" else 0
    workers = cfg.workers or max(gpus, 1)
    threads = cfg.threads or max(int(cluster.get("CPU", 1) // workers), 1)
    device = cfg.device if cfg.device != "auto" else "cuda" if gpus else "cpu"
    precision = cfg.precision if cfg.precision != "auto" else "bf16" if device.startswith("cuda") else "32"
    restore = {
        "device": device,
        "precision": precision,
        "chunk_seconds": cfg.chunk_seconds,
        "context_seconds": cfg.context_seconds,
        "fade_seconds": cfg.fade_seconds,
        # on CPU a batch of many windows is slower than a few (docs/benchmarks.md, Corpus cleaning)
        "batch_size": cfg.batch_size or (8 if device.startswith("cuda") else 2),
        "threads": 0 if gpus else threads,
        "ssl_weights": cfg.ssl_weights,
    }
    return Settings(
        rate_in,
        FORMATS[cfg.format][0],
        cfg.output,
        cfg.format,
        cfg.subtype,
        restore,
        workers,
        1.0 if gpus else 0.0,
        cfg.score_workers,
        cfg.scores,
        cfg.files_per_batch,
        cfg.commit_seconds,
    )


def check_resources(s: Settings) -> None:
    """ConfigError when the actors would reserve every CPU of the cluster: Ray would never schedule the
    decode and write tasks and the job would wait for ever."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    reserved = s.workers * (0 if s.gpus_per_worker else restorer_cpus(s)) + s.score_workers * CPU_PER_SCORER
    if reserved + CPU_PER_TASK > cpus:
        raise ConfigError(
            f"workers={s.workers} and score_workers={s.score_workers} reserve {reserved:g} of the cluster's "
            f"{cpus:g} CPUs, leaving none for reading and writing files; give fewer workers"
        )


def cluster_text(s: Settings) -> str:
    """The cluster and the actors the job has, for the run's tag."""
    import ray

    cluster = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    threads = f" x {s.restore['threads']} threads" if s.restore["threads"] else " (1 GPU each)"
    return (
        f"{nodes} node{'s' * (nodes != 1)}, {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs; "
        f"{s.workers} restore worker{'s' * (s.workers != 1)}{threads}, {s.score_workers} scoring"
    )


def build_dataset(units: list[dict], s: Settings, checkpoints):
    import ray

    decode_tasks = DECODE_TASKS_PER_WORKER["gpu" if s.gpus_per_worker else "cpu"] * s.workers
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 256)))
    ds = ds.flat_map(
        dataflow.decode,
        fn_kwargs={"rate_in": s.rate_in, "suffix": s.suffix},
        num_cpus=CPU_PER_TASK,
        compute=ray.data.TaskPoolStrategy(size=decode_tasks),
    )
    ds = ds.map_batches(
        dataflow.Restorer,
        fn_constructor_kwargs={"checkpoints": [checkpoints], "options": s.restore},
        compute=ray.data.ActorPoolStrategy(size=s.workers),
        batch_size=s.files_per_batch,
        batch_format="pandas",
        num_cpus=restorer_cpus(s) if not s.gpus_per_worker else None,
        num_gpus=s.gpus_per_worker or None,
    )
    ds = ds.map_batches(
        dataflow.Scorer,
        fn_constructor_kwargs={"enabled": s.scores, "rate_in": s.rate_in},
        compute=ray.data.ActorPoolStrategy(size=s.score_workers),
        batch_size=s.files_per_batch,
        batch_format="pandas",
        num_cpus=CPU_PER_SCORER,
    )
    return ds.map_batches(
        dataflow.write,
        fn_kwargs={"output": s.output, "file_format": s.file_format, "subtype": s.subtype},
        batch_format="pandas",
        batch_size=s.files_per_batch,
        num_cpus=CPU_PER_TASK,
        compute=ray.data.TaskPoolStrategy(size=WRITE_TASKS_PER_WORKER * s.workers),
    )


@dataclass
class Tracker:
    """Commits rows to the run and logs progress; ``fence`` is the lease's check before every write."""

    client: MlflowClient
    run_id: str
    attempt: int
    total: int  # inputs of the whole job (shards counted by their manifest)
    done: pd.DataFrame  # rows committed before this attempt
    fence: object
    new: list[pd.DataFrame] = field(default_factory=list)  # rows of this attempt, committed
    pending: list[pd.DataFrame] = field(default_factory=list)
    parts: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, rows: pd.DataFrame) -> None:
        self.pending.append(rows)

    def rows(self) -> pd.DataFrame:
        return as_table([self.done, *self.new, *self.pending]).drop_duplicates("id", keep="last")

    def commit(self) -> None:
        if not self.pending:
            return
        batch = as_table(self.pending)
        self.fence()
        commit_part(self.client, self.run_id, batch, self.attempt, self.parts)
        self.parts += 1
        self.new.append(batch)
        self.pending = []
        self.log_progress()

    def log_progress(self) -> None:
        table = self.rows()
        step = len(table)
        ours = as_table(self.new)
        restored = ours[ours["status"] == "restored"]
        hours = pd.to_numeric(restored["seconds"]).sum() / 3600
        wall_hours = (time.monotonic() - self.started) / 3600
        all_restored = table[table["status"] == "restored"]
        metrics = {
            "progress/files_done": step,
            "progress/fraction": step / max(self.total, 1),
            "progress/audio_hours_done": pd.to_numeric(all_restored["seconds"]).sum() / 3600,
            "progress/failed": int(table["status"].astype(str).str.startswith("failed").sum()),
            "progress/skipped": int(table["status"].astype(str).str.startswith("skipped").sum()),
            "throughput/audio_hours_per_hour": hours / wall_hours if wall_hours > 0 else 0.0,
        }
        for i, (_, rows) in enumerate(sorted(restored.groupby("worker"), key=lambda kv: str(kv[0]))):
            metrics[f"rtf/worker_{i}"] = pd.to_numeric(rows["restore_seconds"]).sum() / max(
                pd.to_numeric(rows["seconds"]).sum(), 1e-9
            )
        now = int(time.time() * 1000)
        self.fence()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        hours = metrics["progress/audio_hours_done"]
        progress = f"{step}/{self.total} inputs ({100 * step / max(self.total, 1):.1f} %), {hours:.2f} h restored"
        self.client.set_tag(self.run_id, tag.PROGRESS, progress)
        log.info("%s; %.2f audio hours per hour", progress, metrics["throughput/audio_hours_per_hour"])


class StopWaiting(BaseException):  # not Exception: no library code on the way may swallow it
    """A stop signal came while the driver waited for the pipeline's next batch."""


class Stop:
    """SIGTERM/SIGINT, or the run's ``stop_requested`` tag: finish the rows in hand, commit, and stop."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id, self.by = client, run_id, ""
        self._waiting = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.by:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.by = signal.Signals(signum).name
        log.warning("%s: committing the finished rows and stopping (a second signal stops at once)", self.by)
        if self._waiting:  # the rows in hand are committed now, not when the next batch comes
            raise StopWaiting(self.by)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """The block waits for the pipeline: a stop signal ends it with ``StopWaiting``."""
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def requested(self) -> bool:
        if not self.by and self.client.get_run(self.run_id).data.tags.get(tag.STOP_REQUESTED, "").lower() == "true":
            self.by = "tag"
        return bool(self.by)

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def run_pipeline(units: list[dict], s: Settings, checkpoints, tracker: Tracker, stop: Stop) -> Outcome:
    """Run the pipeline over ``units``, committing rows every ``commit_seconds``; how it ended (engine/outcomes.py):
    FINISHED when it ran to the end; STOPPED on request; STORAGE_FAILED at the first row that could not be written
    for want of space (the rows in hand are committed and no new work is taken: a resume after space is freed does
    the rest). A signal that comes while the driver waits for a batch ends the wait at once (``StopWaiting``): a
    long file being restored or a cluster that lost a node does not hold the stop back."""
    if not units:
        return FINISHED
    batches = iter(build_dataset(units, s, checkpoints).iter_batches(batch_size=None, batch_format="pandas"))
    last = time.monotonic()
    remaining = max(tracker.total - len(tracker.done), 0)
    with tqdm(total=remaining, desc="clean_corpus", unit="file", disable=not sys.stderr.isatty()) as bar:
        while True:
            try:
                with stop.waiting():
                    batch = next(batches)
            except StopIteration:
                break
            except StopWaiting:
                tracker.commit()
                return STOPPED
            tracker.add(batch)
            bar.update(len(batch))
            if batch["status"].astype(str).str.startswith(dataflow.STORAGE_FULL).any():
                tracker.commit()
                return STORAGE_FAILED
            if time.monotonic() - last >= s.commit_seconds:
                tracker.commit()
                last = time.monotonic()
                if stop.requested():
                    return STOPPED
            elif stop.by:
                tracker.commit()
                return STOPPED
    tracker.commit()
    return FINISHED
