"""python -m pipeline.bench [--preset cpu|gpu] [--only NAME ...]: print the benchmark figures as JSON lines.

``cpu`` (the default) runs in a few minutes on 2 CPU cores with tiny and small presets; ``gpu`` runs
the real presets on CUDA in 32, bf16 and 16-mixed. ``--only`` keeps the figures whose name starts
with one of the given prefixes (e.g. ``--only checkpoint_stall resume_latency``). docs/benchmarks.md
explains each figure and holds the measured values.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from pipeline.bench import (
    ceiling,
    cleaning,
    data,
    emit,
    figure,
    jobs,
    outage,
    restore,
    scale,
    scale_ingest,
    scale_ui,
    training,
)

TINY = ["ssl=tiny"]
SMALL = ["ssl=hubert_base", "ssl.layer=2"]  # random weights: the architecture is what costs
HUBERT_L6 = ["ssl=hubert_base", "ssl.layer=6"]
STATE_SIZES = {"1MB": 320, "10MB": 3200, "300MB": 96000}  # adapter.bottleneck of ssl=tiny for each state.pt size
CUDA = ["trainer.device=cuda"]

# A plan is a table of figures, run in its order: (name, the function that measures it, its positional arguments,
# its keyword arguments). One table per area and preset; docs/benchmarks.md explains each figure.
Row = tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]

CPU_ENGINE: list[Row] = [
    (
        "tracking_overhead/tiny",
        training.tracking_overhead,
        ("train_adapter", TINY),
        {"steps": 200, "save_every": 100, "pairs": 5, "warmup": 10, "label": "tiny"},
    ),
    (
        "tracking_overhead/small",
        training.tracking_overhead,
        ("train_adapter", SMALL),
        {"steps": 32, "save_every": 16, "pairs": 3, "warmup": 4, "label": "small"},
    ),
    *[
        (
            f"checkpoint_stall/{label}",
            training.checkpoint_stall,
            ([*TINY, f"adapter.bottleneck={width}"],),
            {"pairs": 5 if label != "300MB" else 3, "label": label, "target": None if label == "1MB" else 0.2},
        )  # targets: 10 and 300 MB
        for label, width in STATE_SIZES.items()
    ],
    ("resume_latency", jobs.resume_latency, (TINY,), {"pairs": 3}),
    ("stop_latency", jobs.stop_latency, (TINY,), {"repeats": 3}),
    ("metric_throughput", training.metric_throughput, (), {"steps": 5000, "per_step": 10}),
    ("outage_recovery", outage.outage_recovery, (TINY,), {"outage_s": 15, "repeats": 2}),
]
CPU_DATA: list[Row] = [
    ("data/degradation_speed", data.degradation_speed, (), {"repeats": 2}),
    ("data/loader_samples_per_s/workers_0", data.loader_throughput, (), {"workers": 0, "epochs": 3}),
    ("data/loader_samples_per_s/workers_2", data.loader_throughput, (), {"workers": 2, "epochs": 3}),
    ("data/shard_read_mb_per_s", data.shard_reading, (), {"repeats": 3}),
]
CPU_RESTORE: list[Row] = [
    (
        "restore",
        restore.restore_figures,
        (),
        {"ssl": "hubert_base", "layer": 6, "vocoder": "v1", "seconds": 20, "repeats": 2, "long_seconds": 120},
    ),
]
CPU_DISTRIBUTED: list[Row] = [
    (
        "distributed_step_time/tiny_2_ranks",
        jobs.distributed_step_time,
        ("train_adapter", TINY),
        {"nproc": 2, "batch_size": 4, "steps": 60, "pairs": 3, "warmup": 10, "label": "tiny_2_ranks"},
    ),
]
# ~8.5 min of speech in 120 files (tiny; scores on 8 files: DNSMOS is slow on short files), ~50 s in 12 files
# (hubert_base + v1); about 10 minutes together
CPU_CLEANING: list[Row] = [
    (
        "clean_corpus/tiny",
        cleaning.cleaning_figures,
        ("tiny", TINY, "tiny"),
        {"files": 120, "files_per_batch": 8, "bare_repeats": 2, "score_files": 8, "score_files_per_batch": 2},
    ),
    (
        "clean_corpus/hubert_base_l6_v1",
        cleaning.cleaning_figures,
        ("hubert_base_l6_v1", HUBERT_L6, "v1"),
        {"files": 12, "files_per_batch": 2, "score_files": 0, "per_1000h": True},
    ),
]
# the chain's ceiling per front end (docs/benchmarks.md, "Where the ceiling is"): copy synthesis after the same
# mel-only steps of each generator on each front end's features; about 25 minutes together on 2 idle cores
CPU_QUALITY: list[Row] = [("encoder_ceiling", ceiling.ceiling_figures, (), {"steps": 1500})]
# cost growth (docs/benchmarks.md, Cost growth): each curve at three sizes; about 75 minutes together on 2 idle cores
CPU_SCALE: list[Row] = [
    *[(f"scale/resume_vs_history/{kind}", scale.resume_vs_history, (kind,), {}) for kind in ("sqlite", "postgresql")],
    ("scale/resume_vs_checkpoints", scale.resume_vs_checkpoints, (), {}),
    ("scale/commit_vs_checkpoints", scale.commit_vs_checkpoints, (), {}),
    *[(f"scale/commit_vs_history/{kind}", scale.commit_vs_history, (kind,), {}) for kind in ("sqlite", "postgresql")],
    ("scale/metric_ingest", scale_ingest.metric_ingest, (), {}),
    ("scale/ui_chart", scale_ui.ui_chart_figures, (), {}),
]

GPU_ENGINE: list[Row] = [
    *[
        row
        for precision in ("32", "bf16", "16-mixed")
        for row in (
            (
                f"tracking_overhead/hubert_base_l6/{precision}",
                training.tracking_overhead,
                ("train_adapter", [*HUBERT_L6, *CUDA, f"trainer.precision={precision}"]),
                {"steps": 200, "save_every": 100, "pairs": 3, "warmup": 20, "label": f"hubert_base_l6/{precision}"},
            ),
            (
                f"tracking_overhead/vocoder_v1/{precision}",
                training.tracking_overhead,
                ("pretrain_vocoder", ["vocoder=v1", *CUDA, f"trainer.precision={precision}"]),
                {"steps": 100, "save_every": 50, "pairs": 3, "warmup": 10, "label": f"vocoder_v1/{precision}"},
            ),
        )
    ],
    (
        "checkpoint_stall/300MB",
        training.checkpoint_stall,
        ([*TINY, "adapter.bottleneck=96000", *CUDA],),
        {"pairs": 3, "label": "300MB"},
    ),
    ("resume_latency", jobs.resume_latency, ([*TINY, *CUDA],), {"pairs": 3}),
]
# one GPU: nccl with one rank (1 GPU x 2 processes is not possible with nccl) against a plain process
GPU_DISTRIBUTED: list[Row] = [
    (
        "distributed_step_time/hubert_base_l6_1_rank",
        jobs.distributed_step_time,
        ("train_adapter", [*HUBERT_L6, *CUDA]),
        {"nproc": 1, "batch_size": 8, "steps": 100, "pairs": 3, "warmup": 20, "label": "hubert_base_l6_1_rank"},
    ),
]
GPU_RESTORE: list[Row] = [
    (
        "restore",
        restore.restore_figures,
        (),
        {
            "ssl": "hubert_base",
            "layer": 6,
            "vocoder": "v1",
            "device": "cuda",
            "seconds": 60,
            "repeats": 3,
            "long_seconds": 600,
        },
    ),
]
GPU_CLEANING: list[Row] = [
    (
        "clean_corpus/hubert_base_l6_v1_bf16",
        cleaning.cleaning_figures,
        ("hubert_base_l6_v1_bf16", HUBERT_L6, "v1"),
        {
            "files": 600,
            "files_per_batch": 16,
            "batch_size": 16,
            "device": "cuda",
            "precision": "bf16",
            "bare_repeats": 3,
            "scaling": False,
            "per_1000h": True,
        },
    ),
]

PLANS: dict[str, list[Row]] = {
    "cpu": [*CPU_ENGINE, *CPU_DATA, *CPU_RESTORE, *CPU_DISTRIBUTED, *CPU_CLEANING, *CPU_QUALITY, *CPU_SCALE],
    "gpu": [*GPU_ENGINE, *GPU_DISTRIBUTED, *GPU_RESTORE, *GPU_CLEANING],
}


def plan(preset: str) -> list[tuple[str, Callable[[], Any]]]:
    """The figures of ``preset`` in the order they run, each with the call that measures it."""
    return [(name, partial(measure, *args, **kwargs)) for name, measure, args, kwargs in PLANS[preset]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PLANS), default="cpu")
    parser.add_argument("--only", nargs="*", default=[], help="name prefixes of the figures to run")
    parser.add_argument("--figure", help=argparse.SUPPRESS)  # run this one figure in this process
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.preset == "gpu" and not torch.cuda.is_available():
        parser.error("--preset gpu needs a CUDA device")
    figures = dict(plan(args.preset))
    if args.figure:
        result = figures[args.figure]()
        for fig in result if isinstance(result, list) else [result]:
            emit(fig)
        return
    emit(
        figure(
            "machine",
            os.cpu_count() or 0,
            "CPU cores",
            "os.cpu_count()",
            platform=platform.platform(),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        )
    )
    failed = []
    for name in figures:
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        # Each figure in its own process: no memory peak, thread pool or global torch setting of one
        # figure (deterministic kernels) carries over into the next.
        child = subprocess.run(
            [sys.executable, "-m", "pipeline.bench", "--preset", args.preset, "--figure", name],
            stdout=subprocess.PIPE,
            text=True,
        )
        sys.stdout.write(child.stdout)
        sys.stdout.flush()
        if child.returncode != 0:
            failed.append(name)
            logging.error("Figure %s failed (exit code %d); its output is above", name, child.returncode)
    if failed:
        sys.exit(f"{len(failed)} figure(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
