"""The peak memory of a corpus cleaning job (``clean_corpus/peak_memory/<label>``): ``python -m
pipeline.clean_corpus`` over ``MEMORY_FILES`` one-second files, every key at its default (scores included), in a
process of its own, its memory and its descendants' (Ray's processes and workers, the reaper) sampled every
``MEMORY_SAMPLE_S`` until it ends. PSS divides each shared page among the processes that share it, so its sum is
what the job costs the machine; RSS counts shared pages once per process. Target for the tiny chain: ≤ 2 GiB."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import soundfile as sf

from pipeline.bench import figure
from pipeline.bench.cleaning_setup import RATE, Corpus, train_chain
from pipeline.bench.harness import tracking_store
from pipeline.bench.restore import speech

MEMORY_FILES, MEMORY_FILE_S = 8, 1.0  # the tiny job of the peak-memory figure (the review measured 2-40 such files)
MEMORY_SAMPLE_S = 0.2
MEMORY_TARGET_GIB = 2.0  # a tiny job in all (tiny chain)


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
    before/after: ``python -c "from pipeline.bench import cleaning_memory as m; print(m.peak_memory_figures('tiny',
    ['ssl=tiny'], 'tiny', target=True))"``."""
    with tracking_store() as client:
        run_id = train_chain(client, ssl, vocoder)
        work = Path.cwd()
        peak = job_peak_memory(run_id, memory_corpus(work / "memory-corpus"), work / "memory-job", work / "memory.log")
    return [memory_figure(label, peak, target, ssl=" ".join(ssl), vocoder=vocoder, cpus=os.cpu_count())]
