"""Corpus cleaning speed: the ``clean_corpus`` job on Ray Data next to ``restore`` and a bare batched forward pass.

Each figure set trains a chain for one step (random weights: the architecture is what costs) in a throwaway
SQLite store and cuts the demo speech into WAV files of 2-6 s. The job runs in this process
(``pipeline.clean_corpus.run``, which starts and shuts down a local Ray each time).

- ``clean_corpus/audio_s_per_s/<label>``: audio seconds restored per wall second by the job (``scores=false``),
  steady state and end to end, next to ``restore`` (one file, one chunk at a time) on the same corpus;
- ``clean_corpus/vs_bare_forward/<label>``: the job's steady state ÷ ``restore_many`` over the same audio
  already in memory, in the same groups of files, with all threads (target ≥ 0.85);
- ``clean_corpus/scaling/<label>``: two restore actors with one thread each ÷ one actor with all threads;
- ``clean_corpus/score_cost/<label>``: wall seconds that the quality columns (DNSMOS, speaker similarity) add
  per audio second, on the first few files (DNSMOS is slow on short files: it tiles them to 9 s windows);
- ``clean_corpus/hours_per_1000h``: wall hours this machine needs for 1,000 h of audio, beside Miipher-2's
  published figure;
- ``clean_corpus/peak_memory/<label>``: the peak memory of a tiny job (``MEMORY_FILES`` one-second files, every
  key at its default, scores included) run as ``python -m pipeline.clean_corpus`` in a process of its own: the
  sum over the driver and all its descendants (Ray's processes and workers, the reaper) of PSS (each shared page
  divided among the processes that share it, so the sum is what the job costs the machine) and of RSS (shared
  pages counted once per process), sampled every ``MEMORY_SAMPLE_S``; target for the tiny chain ≤ 2 GiB;
- GPU (``--preset gpu``): ``clean_corpus/rtf_per_gpu/<label>``: wall seconds per audio second of one GPU worker
  against Miipher-2's RTF, beside the same throughput, bare-forward and 1,000 h figures.

Steady state: the job logs ``progress/audio_hours_done`` at every commit, and a commit happens at the first
batch of rows that reaches the driver ``commit_seconds`` after the one before. The audio committed after the
first commit ÷ the time from the first commit to the last leaves out Ray's start-up, the actors loading the
chain and the first batch's way through the pipeline; the tail (the pipeline draining) is kept.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import soundfile as sf
import torch
from mlflow import MlflowClient

from pipeline.bench import figure, spread
from pipeline.bench.harness import tracking_store
from pipeline.bench.restore import speech

log = logging.getLogger(__name__)

# one step of each stage: the weights stay random, the checkpoints are real
CHAIN_STEPS = [
    "trainer.max_steps=1",
    "checkpoint.save_interval=1",
    "validation.interval=0",
    "batch_size=2",
    "data.segment_seconds=0.5",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "tracking.log_model=false",
]
RATE = 16000  # the corpus's WAV files
MIN_S, MAX_S = 2.0, 6.0  # file durations
COMMIT_S = 0.5  # commits close together: the steady state's time stamps
# Miipher-2 (Karita et al., 2025), as published: a million hours in about 3 days on 100 accelerators, RTF 0.0078
# per accelerator, i.e. 1,000 h of audio in 7.8 h on one accelerator.
PAPER_RTF = 0.0078
PAPER = {
    "source": "Miipher-2 paper (published figure, not measured here)",
    "rtf_per_accelerator": PAPER_RTF,
    "hours_per_1000h_one_accelerator": round(1000 * PAPER_RTF, 2),
    "claim": "1 million hours in about 3 days on 100 accelerators",
}
MEMORY_FILES, MEMORY_FILE_S = 8, 1.0  # the tiny job of the peak-memory figure (the review measured 2-40 such files)
MEMORY_SAMPLE_S = 0.2
MEMORY_TARGET_GIB = 2.0  # a tiny job in all (tiny chain)


@dataclass
class Corpus:
    root: Path
    paths: list[Path]
    seconds: list[float]

    @property
    def audio_s(self) -> float:
        return sum(self.seconds)


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


def train_chain(client: MlflowClient, ssl: list[str], vocoder: str, device: str = "cpu") -> str:
    """train_adapter -> pretrain_vocoder -> finetune_vocoder, one step each; the finetune_vocoder run's ID."""
    from pipeline.engine.session import run_stage
    from pipeline.stages import stage_class

    steps = [*CHAIN_STEPS, f"trainer.device={device}"]
    runs = {}
    for stage, argv in (
        ("train_adapter", [*ssl, *steps]),
        ("pretrain_vocoder", [*ssl, f"vocoder={vocoder}", *steps]),
        ("finetune_vocoder", None),
    ):
        if argv is None:
            argv = [f"adapter_run={runs['train_adapter']}", f"vocoder_run={runs['pretrain_vocoder']}", *steps]
        code = run_stage(stage_class(stage), argv)
        if code != 0:
            raise RuntimeError(f"{stage} failed with exit code {code}")
        runs[stage] = latest_run(client, f"tags.stage = '{stage}'").info.run_id
    return runs["finetune_vocoder"]


def latest_run(client: MlflowClient, query: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=1)[0]


def write_corpus(root: Path, files: int, seed: int = 0) -> Corpus:
    """``files`` WAV files of 2-6 s of demo speech (16 kHz, 16 bit) under ``root``."""
    rng = random.Random(seed)
    lengths = [int(rng.uniform(MIN_S, MAX_S) * RATE) for _ in range(files)]
    wave = speech(sum(lengths) / RATE + 1, RATE).numpy()
    root.mkdir(parents=True)
    paths, start = [], 0
    for i, n in enumerate(lengths):
        paths.append(root / f"utt{i:04d}.wav")
        sf.write(paths[-1], wave[start : start + n], RATE, subtype="PCM_16")
        start += n
    return Corpus(root, paths, [n / RATE for n in lengths])


def subset(corpus: Corpus, root: Path, files: int) -> Corpus:
    """The first ``files`` files of ``corpus``, linked under ``root``."""
    root.mkdir(parents=True)
    paths = []
    for path in corpus.paths[:files]:
        paths.append(root / path.name)
        paths[-1].symlink_to(path)
    return Corpus(root, paths, corpus.seconds[:files])


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


@dataclass
class Peak:
    """The peak memory of one job's process family (the driver and every descendant)."""

    pss_mb: float  # the largest sum of PSS over one sample of the family
    rss_mb: float  # the largest sum of RSS over one sample (not always the sample of the PSS peak)
    processes: int  # the most processes alive at once
    by_process: dict[str, float]  # PSS (MB) of each kind of process at the PSS peak
    samples: int
    wall_s: float


def process_kind(proc: psutil.Process, driver: int) -> str:
    """What a process of the job is: the driver, a Ray worker by its title (``ray::IDLE``,
    ``ray::MapWorker(MapBatches(Restorer))``), a Ray service by its program or script (``raylet``,
    ``_private/log_monitor.py``), or the module a Python process runs (the reaper)."""
    if proc.pid == driver:
        return "driver"
    words = proc.cmdline()
    if not words:
        return proc.name()
    if words[0].startswith("ray::"):
        return words[0].split(" ")[0]
    first = Path(words[0]).name
    if not first.startswith("python"):
        return first
    if "-m" in words[1:-1]:
        return words[words.index("-m") + 1]
    scripts = [w for w in words[1:] if w.endswith(".py")]
    return Path(scripts[0]).parent.name + "/" + Path(scripts[0]).name if scripts else first


def memory_sample(root: psutil.Process) -> tuple[float, float, dict[str, float], int]:
    """(summed PSS, summed RSS, PSS by kind, processes) in MB of ``root`` and its descendants right now."""
    pss = rss = 0.0
    kinds: dict[str, float] = {}
    family = [root, *root.children(recursive=True)]
    for proc in family:
        try:
            info = proc.memory_full_info()  # PSS from /proc/<pid>/smaps_rollup
            kind = process_kind(proc, root.pid)
        except psutil.Error:  # gone between the listing and the reading
            continue
        pss, rss = pss + info.pss / 2**20, rss + info.rss / 2**20
        kinds[kind] = kinds.get(kind, 0.0) + info.pss / 2**20
    return pss, rss, kinds, len(family)


def job_peak_memory(run_id: str, corpus: Corpus, output: Path, log_path: Path) -> Peak:
    """Run ``python -m pipeline.clean_corpus`` over ``corpus`` (every other key at its default) in a process of
    its own, and follow the memory of it and its descendants until it ends."""
    argv = [
        sys.executable,
        "-m",
        "pipeline.clean_corpus",
        f"run_id={run_id}",
        f"input={corpus.root}",
        f"output={output}",
    ]
    peak = Peak(0.0, 0.0, 0, {}, 0, 0.0)
    started = time.perf_counter()
    with open(log_path, "wb") as job_log:
        job = subprocess.Popen(argv, stdout=job_log, stderr=job_log, start_new_session=True)
        root = psutil.Process(job.pid)
        while job.poll() is None:
            try:
                pss, rss, kinds, processes = memory_sample(root)
            except psutil.Error:  # the driver ended while it was read
                break
            peak.samples += 1
            peak.processes = max(peak.processes, processes)
            peak.rss_mb = max(peak.rss_mb, rss)
            if pss > peak.pss_mb:
                peak.pss_mb, peak.by_process = pss, {k: round(v, 1) for k, v in sorted(kinds.items())}
            time.sleep(MEMORY_SAMPLE_S)
    peak.wall_s = time.perf_counter() - started
    if job.wait() != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"clean_corpus for the memory figure failed with exit code {job.returncode}:\n{tail}")
    return peak


def memory_corpus(root: Path) -> Corpus:
    """The tiny job's corpus: ``MEMORY_FILES`` files of ``MEMORY_FILE_S`` s of speech."""
    wave = speech(MEMORY_FILES * MEMORY_FILE_S, RATE).numpy()
    n = int(MEMORY_FILE_S * RATE)
    root.mkdir(parents=True)
    paths = []
    for i in range(MEMORY_FILES):
        paths.append(root / f"one_second_{i:02d}.wav")
        sf.write(paths[-1], wave[i * n : (i + 1) * n], RATE, subtype="PCM_16")
    return Corpus(root, paths, [MEMORY_FILE_S] * MEMORY_FILES)


def memory_figure(label: str, peak: Peak, target: bool, **setup: Any) -> dict[str, Any]:
    gib = peak.pss_mb / 1024
    extra = {"target": f"≤ {MEMORY_TARGET_GIB:g} GiB", "met": gib <= MEMORY_TARGET_GIB} if target else {}
    return figure(
        f"clean_corpus/peak_memory/{label}",
        gib,
        "GiB (summed PSS)",
        f"python -m pipeline.clean_corpus over {MEMORY_FILES} files of {MEMORY_FILE_S:g} s, every key at "
        f"its default (local Ray, scores=true), in a process of its own; every {MEMORY_SAMPLE_S} s the PSS "
        "and RSS of the driver and all its descendants are summed; value: the largest PSS sum. rss_gib: the "
        "largest RSS sum (shared pages counted in every process); by_process_mb: PSS by kind of process at "
        "the PSS peak",
        **extra,
        rss_gib=round(peak.rss_mb / 1024, 3),
        processes=peak.processes,
        by_process_mb=peak.by_process,
        samples=peak.samples,
        job_wall_s=round(peak.wall_s, 1),
        **setup,
    )


def peak_memory_figures(label: str, ssl: list[str], vocoder: str, *, target: bool) -> list[dict[str, Any]]:
    """Only the peak-memory figure of one chain (train it, write the tiny corpus, run the job), for a quick
    before/after: ``python -c "from pipeline.bench import cleaning; print(cleaning.peak_memory_figures('tiny',
    ['ssl=tiny'], 'tiny', target=True))"``."""
    with tracking_store() as client:
        run_id = train_chain(client, ssl, vocoder)
        work = Path.cwd()
        peak = job_peak_memory(run_id, memory_corpus(work / "memory-corpus"), work / "memory-job", work / "memory.log")
    return [memory_figure(label, peak, target, ssl=" ".join(ssl), vocoder=vocoder, cpus=os.cpu_count())]


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


@dataclass
class Measured:
    """Everything one chain's figures are made of."""

    label: str
    corpus: Corpus
    setup: dict[str, Any]
    jobs: dict[str, Job]  # workers_1 (scores=false), workers_2, scored
    restore_wall_s: float
    restore_loop_s: float
    bare_s: list[float]
    loads: dict[str, tuple[float, float]]  # load average before and after restore and the bare pass
    scored_audio_s: float = 0.0
    scored_files: int = 0
    memory: Peak | None = None


def measure(
    label: str,
    ssl: list[str],
    vocoder: str,
    *,
    files: int,
    batch_size: int,
    files_per_batch: int,
    device: str,
    precision: str,
    bare_repeats: int,
    scaling: bool,
    score_files: int | None,
    score_files_per_batch: int,
    memory: bool = True,
) -> Measured:
    """Train the chain, write the corpus, and time the jobs, restore and the bare forward pass."""
    setup = {
        "ssl": " ".join(ssl),
        "vocoder": vocoder,
        "files": files,
        "batch_size": batch_size,
        "files_per_batch": files_per_batch,
        "device": device,
        "precision": precision,
        "cpus": os.cpu_count(),
    }
    keys = {"batch_size": batch_size, "device": device, "precision": precision, "scores": "false"}
    threads = {"threads": os.cpu_count()} if device == "cpu" else {}
    with tracking_store() as client:
        work = Path.cwd()
        started = time.perf_counter()
        run_id = train_chain(client, ssl, vocoder, device)
        log.warning("Chain %s trained in %.1f s", label, time.perf_counter() - started)
        corpus = write_corpus(work / "corpus", files)
        setup["audio_s"] = round(corpus.audio_s, 1)
        jobs = {
            "workers_1": clean(
                client, run_id, corpus, work / "job-w1", workers=1, files_per_batch=files_per_batch, **threads, **keys
            )
        }
        log.warning("Job, 1 worker: %s", jobs["workers_1"].summary())
        loads = {"restore": (load(),)}
        restore_wall, restore_loop = restore_one_by_one(run_id, corpus, work / "restore", device, precision)
        loads["restore"] += (load(),)
        loads["bare"] = (load(),)
        bare = bare_forward(
            client,
            run_id,
            corpus,
            batch_size=batch_size,
            files_per_batch=files_per_batch,
            device=device,
            precision=precision,
            repeats=bare_repeats,
        )
        loads["bare"] += (load(),)
        log.warning("restore: %.1f s (its loop %.1f s); bare forward: %s s", restore_wall, restore_loop, bare)
        if scaling:
            jobs["workers_2"] = clean(
                client, run_id, corpus, work / "job-w2", workers=2, threads=1, files_per_batch=files_per_batch, **keys
            )
            log.warning("Job, 2 workers: %s", jobs["workers_2"].summary())
        scored = (
            None if score_files is None else subset(corpus, work / "subset", score_files) if score_files else corpus
        )
        if scored:
            jobs["scored"] = clean(
                client,
                run_id,
                scored,
                work / "job-scored",
                workers=1,
                files_per_batch=score_files_per_batch,
                **threads,
                **{**keys, "scores": "true"},
            )
            log.warning("Job with scores: %s", jobs["scored"].summary())
        peak = None
        if memory:
            peak = job_peak_memory(
                run_id, memory_corpus(work / "memory-corpus"), work / "memory-job", work / "memory.log"
            )
            log.warning("Peak memory of a tiny job: %.0f MB PSS, %.0f MB RSS", peak.pss_mb, peak.rss_mb)
    return Measured(
        label,
        corpus,
        setup,
        jobs,
        restore_wall,
        restore_loop,
        bare,
        loads,
        scored.audio_s if scored else 0.0,
        len(scored.paths) if scored else 0,
        peak,
    )


def cleaning_figures(
    label: str,
    ssl: list[str],
    vocoder: str,
    *,
    files: int,
    batch_size: int = 8,
    files_per_batch: int = 8,
    device: str = "cpu",
    precision: str = "32",
    bare_repeats: int = 1,
    scaling: bool = True,
    score_files: int | None = None,
    score_files_per_batch: int = 2,
    per_1000h: bool = False,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """The figures of one chain (``ssl`` overrides, ``vocoder`` preset) on ``files`` files of speech.
    ``score_files``: the scores=true job's first files (0: all of them; None: no such job), taken
    ``score_files_per_batch`` at a time; ``memory``: the peak-memory figure (a job of its own)."""
    m = measure(
        label,
        ssl,
        vocoder,
        files=files,
        batch_size=batch_size,
        files_per_batch=files_per_batch,
        device=device,
        precision=precision,
        bare_repeats=bare_repeats,
        scaling=scaling,
        score_files=score_files,
        score_files_per_batch=score_files_per_batch,
        memory=memory,
    )
    single, audio, setup = m.jobs["workers_1"], m.corpus.audio_s, m.setup
    out = [
        figure(
            f"clean_corpus/audio_s_per_s/{label}",
            single.steady,
            "audio s / wall s",
            f"clean_corpus scores=false workers=1 over {files} files ({audio:.0f} s of speech) in this "
            f"process. Steady state: audio committed after the first commit ÷ time from the first commit to the "
            f"last (progress/audio_hours_done metric timestamps, commit_seconds={COMMIT_S}): no Ray start-up, "
            "no chain loading, no first batch. End to end: all audio ÷ the whole run() call. restore: "
            "pipeline.restore.run in this process (one file, one chunk at a time); restore_loop leaves out "
            "its start (arguments, chain loading)",
            end_to_end=round(single.end_to_end, 3),
            restore=round(audio / m.restore_wall_s, 3),
            restore_loop=round(audio / m.restore_loop_s, 3),
            ratio_job_to_restore={
                "steady_to_restore_loop": round(single.steady * m.restore_loop_s / audio, 3),
                "end_to_end": round(m.restore_wall_s / single.wall_s, 3),
            },
            job=single.summary(),
            restore_wall_s=round(m.restore_wall_s, 2),
            restore_loop_s=round(m.restore_loop_s, 2),
            restore_load_1min=m.loads["restore"],
            **setup,
        )
    ]
    bare_rate = audio / statistics.median(m.bare_s)
    ratio = single.steady / bare_rate
    out.append(
        figure(
            f"clean_corpus/vs_bare_forward/{label}",
            ratio,
            "job / bare forward",
            "steady-state audio s per s of the clean_corpus job above ÷ restore_many over the same audio "
            "already in memory, the same files per call and batch_size, all threads, after a warm-up call; "
            "restorer_busy_fraction: the Restorer's time in restore_many (manifest restore_seconds of the "
            "rows committed after the first commit) ÷ the steady-state time, about 1 when it never waits "
            "(above 1 by up to a batch: the batch after the first is restored before the first commit); "
            "restorer_vs_bare: its speed inside restore_many ÷ the bare pass's (same bias)",
            target="≥ 0.85",
            met=ratio >= 0.85,
            bare_audio_s_per_s=round(bare_rate, 3),
            bare_s=spread(m.bare_s, 3),
            bare_load_1min=m.loads["bare"],
            job_load_1min=single.load_1min,
            job_steady_audio_s_per_s=round(single.steady, 3),
            restorer_busy_fraction=round(single.restorer_busy, 3),
            restorer_vs_bare=round(single.steady_audio_s / max(single.restore_s, 1e-9) / bare_rate, 3),
            **setup,
        )
    )
    if "workers_2" in m.jobs:
        two = m.jobs["workers_2"]
        scale = two.steady / single.steady
        out.append(
            figure(
                f"clean_corpus/scaling/{label}",
                scale,
                "2 workers / 1 worker",
                "steady-state audio s per s of clean_corpus scores=false workers=2 threads=1 ÷ workers=1 "
                f"threads={os.cpu_count()} (one run each, same corpus)",
                efficiency=round(scale / 2, 3),
                end_to_end_ratio=round(two.end_to_end / single.end_to_end, 3),
                workers_1=single.summary(),
                workers_2=two.summary(),
                **setup,
            )
        )
    if "scored" in m.jobs:
        scored = m.jobs["scored"]
        out.append(
            figure(
                f"clean_corpus/score_cost/{label}",
                1 / scored.steady - 1 / single.steady,
                "wall s / audio s",
                "steady-state wall s per audio s of clean_corpus scores=true over the "
                f"first {m.scored_files} files ({m.scored_audio_s:.0f} s; files_per_batch="
                f"{score_files_per_batch}, one scoring actor: DNSMOS of input and output, speaker "
                "similarity) minus that of the scores=false job above",
                scored_wall_s_per_audio_s=round(1 / scored.steady, 4),
                unscored_wall_s_per_audio_s=round(1 / single.steady, 4),
                scores_true=scored.summary(),
                **setup,
            )
        )
    if m.memory is not None:
        out.append(
            memory_figure(
                label, m.memory, target=label == "tiny", ssl=setup["ssl"], vocoder=vocoder, cpus=setup["cpus"]
            )
        )
    if per_1000h:
        name, best = max(((k, j.steady) for k, j in m.jobs.items() if k != "scored"), key=lambda kv: kv[1])
        out.append(
            figure(
                "clean_corpus/hours_per_1000h",
                1000 / best,
                "wall h per 1000 h of audio",
                f"1000 h ÷ the best steady-state audio s per s of clean_corpus ({label}, scores=false, "
                f"{name}) measured above, on this machine",
                label=label,
                best_audio_s_per_s=round(best, 3),
                rtf=round(1 / best, 4),
                paper=PAPER,
                **setup,
            )
        )
    if device != "cpu":
        rtf = 1 / single.steady
        out.append(
            figure(
                f"clean_corpus/rtf_per_gpu/{label}",
                rtf,
                "wall s / audio s",
                "steady-state wall s per audio s of one clean_corpus worker (one GPU, scores=false) against "
                f"Miipher-2's published RTF per accelerator ({PAPER_RTF})",
                target=f"≤ {PAPER_RTF}",
                met=rtf <= PAPER_RTF,
                paper=PAPER,
                **setup,
            )
        )
    return out
