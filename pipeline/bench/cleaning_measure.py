"""One chain's corpus cleaning measurement: the ``clean_corpus`` jobs on Ray Data (in this process, each starting and
shutting down a local Ray), ``restore`` one file at a time, and a bare batched forward pass over the same audio
(``measure``). A job's steady state is defined in cleaning.py, which makes the figures of what is measured here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from mlflow import MlflowClient

from pipeline.bench.cleaning_memory import Peak, job_peak_memory, memory_corpus
from pipeline.bench.cleaning_setup import Corpus, latest_run, subset, train_chain, write_corpus
from pipeline.bench.harness import tracking_store

log = logging.getLogger(__name__)

COMMIT_S = 0.5  # commits close together: the steady state's time stamps


@dataclass
class Job:
    """One ``clean_corpus`` run, timed."""

    wall_s: float  # the whole run() call: config, chain, Ray start-up, pipeline, manifest, Ray shutdown
    audio_s: float  # audio restored
    steady_s: float  # first commit -> last commit
    steady_audio_s: float  # audio committed after the first commit
    commits: int
    workers: int
    restore_s: float  # in the Restorers' restore_many over the rows committed after the first commit, all workers
    phases_s: dict[str, float]  # where the wall time went
    load_1min: tuple[float, float]  # the machine's load average before and after (a shared machine shows here)

    @property
    def steady(self) -> float:
        return self.steady_audio_s / self.steady_s if self.steady_s > 0 else float("nan")

    @property
    def end_to_end(self) -> float:
        return self.audio_s / self.wall_s

    @property
    def restorer_busy(self) -> float:
        """The fraction of the steady state each Restorer spent in restore_many."""
        return self.restore_s / (self.steady_s * self.workers) if self.steady_s > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 2),
            "audio_s": round(self.audio_s, 1),
            "steady_s": round(self.steady_s, 2),
            "steady_audio_s": round(self.steady_audio_s, 1),
            "commits": self.commits,
            "steady_audio_s_per_s": round(self.steady, 3),
            "end_to_end_audio_s_per_s": round(self.end_to_end, 3),
            "phases_s": self.phases_s,
            "restorer_busy_fraction": round(self.restorer_busy, 3),
            "restorer_audio_s_per_busy_s": round(self.steady_audio_s / max(self.restore_s, 1e-9), 3),
            "load_1min": self.load_1min,
        }


def load() -> float:
    """The 1-minute load average: with 2 cores, well above what the measured side runs means another job ran."""
    return round(os.getloadavg()[0], 2)


def clean(client: MlflowClient, run_id: str, corpus: Corpus, output: Path, **keys: Any) -> Job:
    """``clean_corpus`` over ``corpus`` into ``output`` with these keys, in this process, timed."""
    from pipeline.clean_corpus import run as clean_corpus

    argv = [
        f"run_id={run_id}",
        f"input={corpus.root}",
        f"output={output}",
        f"commit_seconds={COMMIT_S}",
        "listen_random=1",
        "listen_lowest=1",
        *(f"{k}={v}" for k, v in keys.items()),
    ]
    load_before, started = load(), time.perf_counter()
    code = clean_corpus(argv)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"clean_corpus {' '.join(argv)} failed with exit code {code}")
    run = latest_run(client, "tags.stage = 'clean_corpus'")
    done = sorted(client.get_metric_history(run.info.run_id, "progress/audio_hours_done"), key=lambda m: m.step)
    manifest = pd.read_parquet(output / "manifest.parquet")  # in commit order
    restored = manifest.status == "restored"
    if restored.sum() != len(corpus.paths):
        raise RuntimeError(
            f"clean_corpus restored {restored.sum()} of {len(corpus.paths)} files: "
            f"{manifest.status.value_counts().to_dict()}"
        )
    if len(done) < 2:
        raise RuntimeError(
            f"clean_corpus committed {len(done)} time(s): no steady state; give more files or a smaller files_per_batch"
        )
    first, last = done[0], done[-1]
    steady_rows = manifest.iloc[first.step :][restored.iloc[first.step :]]
    run_s = (run.info.end_time - run.info.start_time) / 1000
    phases = {
        "before_run": wall - run_s,  # arguments, input listing, chain loaded once, Ray start-up
        "run_start_to_first_commit": (first.timestamp - run.info.start_time) / 1000,  # actors, first batch
        "steady": (last.timestamp - first.timestamp) / 1000,
        "last_commit_to_end": (run.info.end_time - last.timestamp) / 1000,
    }  # manifest, report, Ray shutdown
    return Job(
        wall,
        float(manifest.seconds[restored].sum()),
        phases["steady"],
        (last.value - first.value) * 3600,
        len(done),
        int(keys.get("workers", 1)),
        float(steady_rows.restore_seconds.sum()),
        {k: round(v, 2) for k, v in phases.items()},
        (load_before, load()),
    )


def restore_one_by_one(run_id: str, corpus: Corpus, output: Path, device: str, precision: str) -> tuple[float, float]:
    """(wall seconds of ``pipeline.restore.run``, seconds inside its loop over the files) over ``corpus``."""
    from pipeline import restore

    inner, loop = restore.restore_files, []

    def timed(*args):
        started = time.perf_counter()
        try:
            return inner(*args)
        finally:
            loop.append(time.perf_counter() - started)

    restore.restore_files = timed  # run() looks it up when it is called
    try:
        started = time.perf_counter()
        code = restore.run(
            [
                f"run_id={run_id}",
                f"input={corpus.root}",
                f"output={output}",
                f"device={device}",
                f"precision={precision}",
            ]
        )
        wall = time.perf_counter() - started
    finally:
        restore.restore_files = inner
    if code != 0:
        raise RuntimeError(f"restore failed with exit code {code}")
    return wall, loop[0]


def bare_forward(
    client: MlflowClient,
    run_id: str,
    corpus: Corpus,
    *,
    batch_size: int,
    files_per_batch: int,
    device: str,
    precision: str,
    repeats: int,
) -> list[float]:
    """Seconds of ``restore_many`` over the corpus's audio in memory, ``files_per_batch`` files per call as the
    job's Restorer takes them, with all of this machine's threads; one warm-up call first."""
    from pipeline.data.audio import load_audio
    from pipeline.engine.stage import Precision
    from pipeline.inference.batched import restore_many
    from pipeline.inference.chain import load_chain, resolve_chain

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        chain = load_chain(
            resolve_chain(client, run_id, None, "latest", Path(tmp)), Precision.from_config(device, precision)
        )
    waves = [load_audio(path, chain.rate_in) for path in corpus.paths]
    groups = [waves[i : i + files_per_batch] for i in range(0, len(waves), files_per_batch)]
    restore_many(chain, groups[0], batch_size)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for group in groups:
            restore_many(chain, group, batch_size)
        if chain.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


@dataclass(frozen=True)
class Settings:
    """One chain's figure set: the chain (``ssl`` overrides, ``vocoder`` preset), the corpus and how it is cleaned.
    ``score_files``: the scores=true job's first files (0: all of them; None: no such job), taken
    ``score_files_per_batch`` at a time; ``memory``: the peak-memory job (cleaning_memory.py)."""

    label: str
    ssl: list[str]
    vocoder: str
    files: int
    batch_size: int = 8
    files_per_batch: int = 8
    device: str = "cpu"
    precision: str = "32"
    bare_repeats: int = 1
    scaling: bool = True
    score_files: int | None = None
    score_files_per_batch: int = 2
    memory: bool = True

    def setup(self) -> dict[str, Any]:
        """What every figure of the set records about it."""
        return {
            "ssl": " ".join(self.ssl),
            "vocoder": self.vocoder,
            "files": self.files,
            "batch_size": self.batch_size,
            "files_per_batch": self.files_per_batch,
            "device": self.device,
            "precision": self.precision,
            "cpus": os.cpu_count(),
        }

    def job_keys(self, scores: bool = False) -> dict[str, Any]:
        """The clean_corpus keys every job of the set shares."""
        return {
            "batch_size": self.batch_size,
            "device": self.device,
            "precision": self.precision,
            "scores": "true" if scores else "false",
        }

    def threads(self) -> dict[str, Any]:
        """A single worker's threads: all of the machine's on CPU."""
        return {"threads": os.cpu_count()} if self.device == "cpu" else {}


@dataclass
class Measured:
    """Everything one chain's figures are made of, filled in as it is measured."""

    label: str
    corpus: Corpus
    setup: dict[str, Any]
    jobs: dict[str, Job] = field(default_factory=dict)  # workers_1 (scores=false), workers_2, scored
    restore_wall_s: float = 0.0
    restore_loop_s: float = 0.0
    bare_s: list[float] = field(default_factory=list)
    loads: dict[str, tuple[float, float]] = field(default_factory=dict)  # load average around restore and bare
    scored_audio_s: float = 0.0
    scored_files: int = 0
    memory: Peak | None = None


def measure(s: Settings) -> Measured:
    """Train the chain, write the corpus, and time the jobs, restore and the bare forward pass."""
    with tracking_store() as client:
        work = Path.cwd()
        started = time.perf_counter()
        run_id = train_chain(client, s.ssl, s.vocoder, s.device)
        log.warning("Chain %s trained in %.1f s", s.label, time.perf_counter() - started)
        corpus = write_corpus(work / "corpus", s.files)
        m = Measured(s.label, corpus, {**s.setup(), "audio_s": round(corpus.audio_s, 1)})
        m.jobs["workers_1"] = clean(
            client,
            run_id,
            corpus,
            work / "job-w1",
            workers=1,
            files_per_batch=s.files_per_batch,
            **s.threads(),
            **s.job_keys(),
        )
        log.warning("Job, 1 worker: %s", m.jobs["workers_1"].summary())
        _time_references(m, client, run_id, s, work)
        if s.scaling:
            m.jobs["workers_2"] = clean(
                client,
                run_id,
                corpus,
                work / "job-w2",
                workers=2,
                threads=1,
                files_per_batch=s.files_per_batch,
                **s.job_keys(),
            )
            log.warning("Job, 2 workers: %s", m.jobs["workers_2"].summary())
        if s.score_files is not None:
            scored = subset(corpus, work / "subset", s.score_files) if s.score_files else corpus
            m.jobs["scored"] = clean(
                client,
                run_id,
                scored,
                work / "job-scored",
                workers=1,
                files_per_batch=s.score_files_per_batch,
                **s.threads(),
                **s.job_keys(scores=True),
            )
            m.scored_audio_s, m.scored_files = scored.audio_s, len(scored.paths)
            log.warning("Job with scores: %s", m.jobs["scored"].summary())
        if s.memory:
            m.memory = job_peak_memory(
                run_id, memory_corpus(work / "memory-corpus"), work / "memory-job", work / "memory.log"
            )
            log.warning("Peak memory of a tiny job: %.0f MB PSS, %.0f MB RSS", m.memory.pss_mb, m.memory.rss_mb)
    return m


def _time_references(m: Measured, client: MlflowClient, run_id: str, s: Settings, work: Path) -> None:
    """``restore`` one file at a time and the bare batched forward pass over ``m``'s corpus, each with the load
    average before and after it."""
    before = load()
    m.restore_wall_s, m.restore_loop_s = restore_one_by_one(run_id, m.corpus, work / "restore", s.device, s.precision)
    m.loads["restore"] = (before, load())
    before = load()
    m.bare_s = bare_forward(
        client,
        run_id,
        m.corpus,
        batch_size=s.batch_size,
        files_per_batch=s.files_per_batch,
        device=s.device,
        precision=s.precision,
        repeats=s.bare_repeats,
    )
    m.loads["bare"] = (before, load())
    log.warning("restore: %.1f s (its loop %.1f s); bare forward: %s s", m.restore_wall_s, m.restore_loop_s, m.bare_s)
