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
  pages counted once per process), sampled every ``MEMORY_SAMPLE_S`` (cleaning_memory.py); target for the tiny
  chain ≤ 2 GiB;
- GPU (``--preset gpu``): ``clean_corpus/rtf_per_gpu/<label>``: wall seconds per audio second of one GPU worker
  against Miipher-2's RTF, beside the same throughput, bare-forward and 1,000 h figures.

Steady state: the job logs ``progress/audio_hours_done`` at every commit, and a commit happens at the first
batch of rows that reaches the driver ``commit_seconds`` after the one before. The audio committed after the
first commit ÷ the time from the first commit to the last leaves out Ray's start-up, the actors loading the
chain and the first batch's way through the pipeline; the tail (the pipeline draining) is kept.

The chain and the corpus are made in cleaning_setup.py, the jobs, restore and the bare pass timed in
cleaning_measure.py; this module turns what they measured into the figures.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from pipeline.bench import figure, spread
from pipeline.bench.cleaning_measure import COMMIT_S, Measured, Settings, measure
from pipeline.bench.cleaning_memory import memory_figure

# Miipher-2 (Karita et al., 2025), as published: a million hours in about 3 days on 100 accelerators, RTF 0.0078
# per accelerator, i.e. 1,000 h of audio in 7.8 h on one accelerator.
PAPER_RTF = 0.0078
PAPER = {
    "source": "Miipher-2 paper (published figure, not measured here)",
    "rtf_per_accelerator": PAPER_RTF,
    "hours_per_1000h_one_accelerator": round(1000 * PAPER_RTF, 2),
    "claim": "1 million hours in about 3 days on 100 accelerators",
}


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
    s = Settings(
        label,
        ssl,
        vocoder,
        files,
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
    m = measure(s)
    out = [throughput_figure(m, s), bare_forward_figure(m)]
    if "workers_2" in m.jobs:
        out.append(scaling_figure(m))
    if "scored" in m.jobs:
        out.append(score_cost_figure(m, s))
    if m.memory is not None:
        setup = m.setup
        out.append(
            memory_figure(
                label, m.memory, target=label == "tiny", ssl=setup["ssl"], vocoder=vocoder, cpus=setup["cpus"]
            )
        )
    if per_1000h:
        out.append(hours_per_1000h_figure(m))
    if device != "cpu":
        out.append(rtf_per_gpu_figure(m))
    return out


def throughput_figure(m: Measured, s: Settings) -> dict[str, Any]:
    """``clean_corpus/audio_s_per_s/<label>``: the one-worker job's steady state, beside ``restore``."""
    single, audio = m.jobs["workers_1"], m.corpus.audio_s
    return figure(
        f"clean_corpus/audio_s_per_s/{m.label}",
        single.steady,
        "audio s / wall s",
        f"clean_corpus scores=false workers=1 over {s.files} files ({audio:.0f} s of speech) in this "
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
        **m.setup,
    )


def bare_forward_figure(m: Measured) -> dict[str, Any]:
    """``clean_corpus/vs_bare_forward/<label>``: the job's steady state ÷ the bare batched forward pass."""
    single = m.jobs["workers_1"]
    bare_rate = m.corpus.audio_s / statistics.median(m.bare_s)
    ratio = single.steady / bare_rate
    return figure(
        f"clean_corpus/vs_bare_forward/{m.label}",
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
        **m.setup,
    )


def scaling_figure(m: Measured) -> dict[str, Any]:
    """``clean_corpus/scaling/<label>``: two single-threaded workers ÷ one worker with all threads."""
    single, two = m.jobs["workers_1"], m.jobs["workers_2"]
    scale = two.steady / single.steady
    return figure(
        f"clean_corpus/scaling/{m.label}",
        scale,
        "2 workers / 1 worker",
        "steady-state audio s per s of clean_corpus scores=false workers=2 threads=1 ÷ workers=1 "
        f"threads={os.cpu_count()} (one run each, same corpus)",
        efficiency=round(scale / 2, 3),
        end_to_end_ratio=round(two.end_to_end / single.end_to_end, 3),
        workers_1=single.summary(),
        workers_2=two.summary(),
        **m.setup,
    )


def score_cost_figure(m: Measured, s: Settings) -> dict[str, Any]:
    """``clean_corpus/score_cost/<label>``: the wall time per audio second that the quality columns add."""
    single, scored = m.jobs["workers_1"], m.jobs["scored"]
    return figure(
        f"clean_corpus/score_cost/{m.label}",
        1 / scored.steady - 1 / single.steady,
        "wall s / audio s",
        "steady-state wall s per audio s of clean_corpus scores=true over the "
        f"first {m.scored_files} files ({m.scored_audio_s:.0f} s; files_per_batch="
        f"{s.score_files_per_batch}, one scoring actor: DNSMOS of input and output, speaker "
        "similarity) minus that of the scores=false job above",
        scored_wall_s_per_audio_s=round(1 / scored.steady, 4),
        unscored_wall_s_per_audio_s=round(1 / single.steady, 4),
        scores_true=scored.summary(),
        **m.setup,
    )


def hours_per_1000h_figure(m: Measured) -> dict[str, Any]:
    """``clean_corpus/hours_per_1000h``: 1,000 h of audio at the best unscored job's steady state."""
    name, best = max(((k, j.steady) for k, j in m.jobs.items() if k != "scored"), key=lambda kv: kv[1])
    return figure(
        "clean_corpus/hours_per_1000h",
        1000 / best,
        "wall h per 1000 h of audio",
        f"1000 h ÷ the best steady-state audio s per s of clean_corpus ({m.label}, scores=false, "
        f"{name}) measured above, on this machine",
        label=m.label,
        best_audio_s_per_s=round(best, 3),
        rtf=round(1 / best, 4),
        paper=PAPER,
        **m.setup,
    )


def rtf_per_gpu_figure(m: Measured) -> dict[str, Any]:
    """``clean_corpus/rtf_per_gpu/<label>``: one GPU worker's wall seconds per audio second against Miipher-2's."""
    rtf = 1 / m.jobs["workers_1"].steady
    return figure(
        f"clean_corpus/rtf_per_gpu/{m.label}",
        rtf,
        "wall s / audio s",
        "steady-state wall s per audio s of one clean_corpus worker (one GPU, scores=false) against "
        f"Miipher-2's published RTF per accelerator ({PAPER_RTF})",
        target=f"≤ {PAPER_RTF}",
        met=rtf <= PAPER_RTF,
        paper=PAPER,
        **m.setup,
    )
