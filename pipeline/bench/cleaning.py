"""Corpus cleaning speed: the ``clean_corpus`` job on Ray Data next to ``restore`` and a bare batched forward pass.

Each figure set trains a chain for one step (random weights: the architecture is what costs) in a throwaway
SQLite store and cuts the demo speech into WAV files of 2-6 s. The job runs in this process
(``pipeline.clean_corpus.run``, which starts and shuts down a local Ray each time).

- ``clean_corpus/audio_s_per_s/<label>``: audio seconds restored per wall second by the job (``scores=false``),
  steady state and end to end, next to ``restore`` (one file, one chunk at a time) on the same corpus;
- ``clean_corpus/vs_bare_forward/<label>``: the job's steady state ÷ ``restore_many`` over the same audio
  already in memory, in the same groups of files, with all threads (target ≥ 0.85);
- ``clean_corpus/scaling/<label>``: two restore actors with one thread each ÷ one actor with two threads;
- ``clean_corpus/score_cost/<label>``: wall seconds that the quality columns (DNSMOS, speaker similarity) add
  per audio second;
- ``clean_corpus/hours_per_1000h``: wall hours this machine needs for 1,000 h of audio, beside Miipher-2's
  published figure;
- GPU: ``clean_corpus/rtf_per_gpu/<label>``: wall seconds per audio second of one GPU worker.

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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import soundfile as sf
import torch
from mlflow import MlflowClient

from pipeline.bench import figure, spread
from pipeline.bench.restore import speech
from pipeline.bench.training import tracking_store

log = logging.getLogger(__name__)

# one step of each stage: the weights stay random, the checkpoints are real
CHAIN_STEPS = ["trainer.max_steps=1", "checkpoint.save_interval=1", "validation.interval=0", "batch_size=2",
               "data.segment_seconds=0.5", "tracking.system_metrics=false", "tracking.flush_seconds=0.2",
               "tracking.log_model=false"]
RATE = 16000  # the corpus's WAV files
MIN_S, MAX_S = 2.0, 6.0  # file durations
COMMIT_S = 0.5  # commits close together: the steady state's time stamps
# Miipher-2 (Karita et al., 2025), as published: a million hours in about 3 days on 100 accelerators, RTF 0.0078
# per accelerator, i.e. 1,000 h of audio in 7.8 h on one accelerator.
PAPER_RTF = 0.0078
PAPER = {"source": "Miipher-2 paper (published figure, not measured here)", "rtf_per_accelerator": PAPER_RTF,
         "hours_per_1000h_one_accelerator": round(1000 * PAPER_RTF, 2),
         "claim": "1 million hours in about 3 days on 100 accelerators"}


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
    restore_s: float  # inside the Restorers' restore_many (manifest's restore_seconds), all workers

    @property
    def steady(self) -> float:
        return self.steady_audio_s / self.steady_s if self.steady_s > 0 else float("nan")

    @property
    def end_to_end(self) -> float:
        return self.audio_s / self.wall_s

    def summary(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 2), "audio_s": round(self.audio_s, 1),
                "steady_s": round(self.steady_s, 2), "steady_audio_s": round(self.steady_audio_s, 1),
                "commits": self.commits, "steady_audio_s_per_s": round(self.steady, 3),
                "end_to_end_audio_s_per_s": round(self.end_to_end, 3),
                "restorer_busy_s": round(self.restore_s, 2),
                "restorer_audio_s_per_busy_s": round(self.audio_s / max(self.restore_s, 1e-9), 3)}


def train_chain(client: MlflowClient, ssl: list[str], vocoder: str, device: str = "cpu") -> str:
    """train_adapter -> pretrain_vocoder -> finetune_vocoder, one step each; the finetune_vocoder run's ID."""
    from pipeline.engine.session import run_stage
    from pipeline.stages import stage_class

    steps = [*CHAIN_STEPS, f"trainer.device={device}"]
    runs = {}
    for stage, argv in (("train_adapter", [*ssl, *steps]), ("pretrain_vocoder", [*ssl, f"vocoder={vocoder}", *steps]),
                        ("finetune_vocoder", None)):
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
        sf.write(paths[-1], wave[start:start + n], RATE, subtype="PCM_16")
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
    from pipeline.clean_corpus import run

    argv = [f"run_id={run_id}", f"input={corpus.root}", f"output={output}", f"commit_seconds={COMMIT_S}",
            "listen_random=1", "listen_lowest=1", *(f"{k}={v}" for k, v in keys.items())]
    started = time.perf_counter()
    code = run(argv)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"clean_corpus {' '.join(argv)} failed with exit code {code}")
    job = latest_run(client, "tags.stage = 'clean_corpus'").info.run_id
    done = sorted(client.get_metric_history(job, "progress/audio_hours_done"), key=lambda m: m.step)
    manifest = pd.read_parquet(output / "manifest.parquet")
    restored = manifest[manifest.status == "restored"]
    if len(restored) != len(corpus.paths):
        raise RuntimeError(f"clean_corpus restored {len(restored)} of {len(corpus.paths)} files: "
                           f"{manifest.status.value_counts().to_dict()}")
    first, last = done[0], done[-1]
    return Job(wall, float(restored.seconds.sum()), (last.timestamp - first.timestamp) / 1000,
               (last.value - first.value) * 3600, len(done), float(restored.restore_seconds.sum()))


def restore_one_by_one(run_id: str, corpus: Corpus, output: Path, device: str) -> tuple[float, float]:
    """(wall seconds of ``pipeline.restore.run``, seconds inside its file loop) over ``corpus``."""
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
        code = restore.run([f"run_id={run_id}", f"input={corpus.root}", f"output={output}", f"device={device}"])
        wall = time.perf_counter() - started
    finally:
        restore.restore_files = inner
    if code != 0:
        raise RuntimeError(f"restore failed with exit code {code}")
    return wall, loop[0]


def bare_forward(client: MlflowClient, run_id: str, corpus: Corpus, *, batch_size: int, files_per_batch: int,
                 device: str, precision: str, repeats: int) -> list[float]:
    """Seconds of ``restore_many`` over the corpus's audio in memory, ``files_per_batch`` files per call as the
    job's Restorer takes them, with all of this machine's threads; one warm-up call first."""
    from pipeline.data.audio import load_audio
    from pipeline.engine.stage import Precision
    from pipeline.inference.batched import restore_many
    from pipeline.inference.chain import load_chain, resolve_chain

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        chain = load_chain(resolve_chain(client, run_id, None, "latest", Path(tmp)),
                           Precision.from_config(device, precision))
    waves = [load_audio(path, chain.rate_in) for path in corpus.paths]
    groups = [waves[i:i + files_per_batch] for i in range(0, len(waves), files_per_batch)]
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


def cleaning_figures(label: str, ssl: list[str], vocoder: str, *, files: int, batch_size: int = 8,
                     files_per_batch: int = 8, score_files: int | None = None, bare_repeats: int = 1,
                     scaling: bool = True, scores: bool = True, paper: bool = False) -> list[dict[str, Any]]:
    """The CPU figures of one chain (``ssl`` overrides, ``vocoder`` preset) on ``files`` files of speech."""
    setup = {"ssl": " ".join(ssl), "vocoder": vocoder, "files": files, "batch_size": batch_size,
             "files_per_batch": files_per_batch, "cpus": os.cpu_count()}
    keys = {"batch_size": batch_size, "files_per_batch": files_per_batch, "device": "cpu", "precision": "32"}
    with tracking_store() as client:
        work = Path.cwd()
        started = time.perf_counter()
        run_id = train_chain(client, ssl, vocoder)
        log.warning("Chain %s trained in %.1f s", label, time.perf_counter() - started)
        corpus = write_corpus(work / "corpus", files)
        setup["audio_s"] = round(corpus.audio_s, 1)
        single = clean(client, run_id, corpus, work / "job-w1", scores="false", workers=1, threads=os.cpu_count(),
                       **keys)
        log.warning("Job, 1 worker: %s", single.summary())
        restore_wall, restore_loop = restore_one_by_one(run_id, corpus, work / "restore", "cpu")
        bare = bare_forward(client, run_id, corpus, batch_size=batch_size, files_per_batch=files_per_batch,
                            device="cpu", precision="32", repeats=bare_repeats)
        log.warning("restore: %.1f s (loop %.1f s); bare forward: %s s", restore_wall, restore_loop, bare)
        jobs = {"workers_1": single}
        if scaling:
            jobs["workers_2"] = clean(client, run_id, corpus, work / "job-w2", scores="false", workers=2, threads=1,
                                      **keys)
            log.warning("Job, 2 workers: %s", jobs["workers_2"].summary())
        scored = None
        if scores:
            scored_corpus = subset(corpus, work / "subset", score_files) if score_files else corpus
            plain = single if not score_files else clean(client, run_id, scored_corpus, work / "job-plain",
                                                         scores="false", workers=1, threads=os.cpu_count(), **keys)
            scored = (plain, clean(client, run_id, scored_corpus, work / "job-scored", scores="true", workers=1,
                                   threads=os.cpu_count(), **keys), scored_corpus)
            log.warning("Job with scores: %s", scored[1].summary())

    bare_s = statistics.median(bare)
    bare_rate = corpus.audio_s / bare_s
    out = [
        figure(f"clean_corpus/audio_s_per_s/{label}", single.steady, "audio s / wall s",
               f"clean_corpus scores=false workers=1 threads={os.cpu_count()} over {files} files "
               f"({corpus.audio_s:.0f} s of speech): steady state = audio committed after the first commit ÷ time "
               f"from the first commit to the last (progress/audio_hours_done metric timestamps, commit_seconds="
               f"{COMMIT_S}); end to end = all audio ÷ the whole in-process run() (chain, Ray start-up, manifest, "
               "shutdown); restore = pipeline.restore.run in-process, one file and one chunk at a time",
               end_to_end=round(single.end_to_end, 3), restore=round(corpus.audio_s / restore_wall, 3),
               restore_loop=round(corpus.audio_s / restore_loop, 3),
               ratio_job_to_restore={"steady_vs_restore_loop": round(single.steady * restore_loop / corpus.audio_s, 3),
                                     "end_to_end": round(restore_wall / single.wall_s, 3)},
               job=single.summary(), restore_wall_s=round(restore_wall, 2), restore_loop_s=round(restore_loop, 2),
               **setup),
        vs_bare(label, single, bare, bare_rate, corpus, setup),
    ]
    if scaling:
        two = jobs["workers_2"]
        ratio = two.steady / single.steady
        out.append(figure(f"clean_corpus/scaling/{label}", ratio, "2 workers / 1 worker",
                          "steady-state audio s per s of clean_corpus scores=false with workers=2 threads=1 ÷ "
                          f"workers=1 threads={os.cpu_count()} (one run each, same corpus)",
                          efficiency=round(ratio / 2, 3), end_to_end_ratio=round(two.end_to_end / single.end_to_end, 3),
                          workers_1=single.summary(), workers_2=two.summary(), **setup))
    if scored:
        plain, with_scores, scored_corpus = scored
        audio = scored_corpus.audio_s
        per_s = 1 / with_scores.steady - 1 / plain.steady
        out.append(figure(f"clean_corpus/score_cost/{label}", per_s, "wall s / audio s",
                          f"steady-state wall s per audio s of clean_corpus scores=true minus scores=false over "
                          f"{len(scored_corpus.paths)} files ({audio:.0f} s), one run each (one scoring actor, "
                          "DNSMOS of input and output + speaker similarity)",
                          end_to_end_per_s=round((with_scores.wall_s - plain.wall_s) / audio, 4),
                          scores_true=with_scores.summary(), scores_false=plain.summary(), **setup))
    if paper:
        best = max(job.steady for job in jobs.values())
        out.append(figure("clean_corpus/hours_per_1000h", 1000 / best,
                          "wall h per 1000 h of audio", "1000 h ÷ the best steady-state throughput of clean_corpus "
                          f"({label}, scores=false, over {', '.join(jobs)}) on this machine", label=label,
                          best_audio_s_per_s=round(best, 3), rtf=round(1 / best, 4), paper=PAPER, **setup))
    return out


def vs_bare(label: str, job: Job, bare: list[float], bare_rate: float, corpus: Corpus,
            setup: dict[str, Any]) -> dict[str, Any]:
    ratio = job.steady / bare_rate
    return figure(f"clean_corpus/vs_bare_forward/{label}", ratio, "job / bare forward",
                  "steady-state audio s per s of the clean_corpus job ÷ restore_many over the same audio in memory "
                  "(same files per call, same batch_size, all threads, after a warm-up call)",
                  target="≥ 0.85", met=ratio >= 0.85, bare_audio_s_per_s=round(bare_rate, 3),
                  bare_s=spread(bare, 3), job_steady_audio_s_per_s=round(job.steady, 3),
                  restorer_busy_fraction=round(job.steady * job.restore_s / job.audio_s, 3),
                  restorer_vs_bare=round(job.audio_s / max(job.restore_s, 1e-9) / bare_rate, 3), **setup)
