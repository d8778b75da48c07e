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
from functools import partial

import torch

from pipeline.bench import cleaning, data, emit, figure, jobs, outage, restore, scale, scale_ingest, scale_ui, training

TINY = ["ssl=tiny"]
SMALL = ["ssl=hubert_base", "ssl.layer=2"]  # random weights: the architecture is what costs
HUBERT_L6 = ["ssl=hubert_base", "ssl.layer=6"]
STATE_SIZES = {"1MB": 320, "10MB": 3200, "300MB": 96000}  # adapter.bottleneck of ssl=tiny for each state.pt size


def cpu_plan() -> list[tuple[str, callable]]:
    return [
        (
            "tracking_overhead/tiny",
            partial(
                training.tracking_overhead,
                "train_adapter",
                TINY,
                steps=200,
                save_every=100,
                pairs=5,
                warmup=10,
                label="tiny",
            ),
        ),
        (
            "tracking_overhead/small",
            partial(
                training.tracking_overhead,
                "train_adapter",
                SMALL,
                steps=32,
                save_every=16,
                pairs=3,
                warmup=4,
                label="small",
            ),
        ),
        *[
            (
                f"checkpoint_stall/{label}",
                partial(
                    training.checkpoint_stall,
                    [*TINY, f"adapter.bottleneck={width}"],
                    pairs=5 if label != "300MB" else 3,
                    label=label,
                    target=None if label == "1MB" else 0.2,
                ),
            )  # targets: 10 and 300 MB
            for label, width in STATE_SIZES.items()
        ],
        ("resume_latency", partial(jobs.resume_latency, TINY, pairs=3)),
        ("stop_latency", partial(jobs.stop_latency, TINY, repeats=3)),
        ("metric_throughput", partial(training.metric_throughput, steps=5000, per_step=10)),
        ("outage_recovery", partial(outage.outage_recovery, TINY, outage_s=15, repeats=2)),
        ("data/degradation_speed", partial(data.degradation_speed, repeats=2)),
        ("data/loader_samples_per_s/workers_0", partial(data.loader_throughput, workers=0, epochs=3)),
        ("data/loader_samples_per_s/workers_2", partial(data.loader_throughput, workers=2, epochs=3)),
        ("data/shard_read_mb_per_s", partial(data.shard_reading, repeats=3)),
        (
            "restore",
            partial(
                restore.restore_figures,
                ssl="hubert_base",
                layer=6,
                vocoder="v1",
                seconds=20,
                repeats=2,
                long_seconds=120,
            ),
        ),
        (
            "distributed_step_time/tiny_2_ranks",
            partial(
                jobs.distributed_step_time,
                "train_adapter",
                TINY,
                nproc=2,
                batch_size=4,
                steps=60,
                pairs=3,
                warmup=10,
                label="tiny_2_ranks",
            ),
        ),
        # corpus cleaning: ~8.5 min of speech in 120 files (tiny; scores on 8 files: DNSMOS is slow on short files),
        # ~50 s in 12 files (hubert_base + v1); about 10 minutes together
        (
            "clean_corpus/tiny",
            partial(
                cleaning.cleaning_figures,
                "tiny",
                TINY,
                "tiny",
                files=120,
                files_per_batch=8,
                bare_repeats=2,
                score_files=8,
                score_files_per_batch=2,
            ),
        ),
        (
            "clean_corpus/hubert_base_l6_v1",
            partial(
                cleaning.cleaning_figures,
                "hubert_base_l6_v1",
                HUBERT_L6,
                "v1",
                files=12,
                files_per_batch=2,
                score_files=0,
                per_1000h=True,
            ),
        ),
        # cost growth (docs/benchmarks.md, Cost growth): each curve at three sizes; about 75 minutes together on 2
        # idle cores
        *[
            (f"scale/resume_vs_history/{kind}", partial(scale.resume_vs_history, kind))
            for kind in ("sqlite", "postgresql")
        ],
        ("scale/resume_vs_checkpoints", partial(scale.resume_vs_checkpoints)),
        ("scale/commit_vs_checkpoints", partial(scale.commit_vs_checkpoints)),
        *[
            (f"scale/commit_vs_history/{kind}", partial(scale.commit_vs_history, kind))
            for kind in ("sqlite", "postgresql")
        ],
        ("scale/metric_ingest", partial(scale_ingest.metric_ingest)),
        ("scale/ui_chart", partial(scale_ui.ui_chart_figures)),
    ]


def gpu_plan() -> list[tuple[str, callable]]:
    plan = []
    for precision in ("32", "bf16", "16-mixed"):
        cuda = ["trainer.device=cuda", f"trainer.precision={precision}"]
        plan += [
            (
                f"tracking_overhead/hubert_base_l6/{precision}",
                partial(
                    training.tracking_overhead,
                    "train_adapter",
                    ["ssl=hubert_base", "ssl.layer=6", *cuda],
                    steps=200,
                    save_every=100,
                    pairs=3,
                    warmup=20,
                    label=f"hubert_base_l6/{precision}",
                ),
            ),
            (
                f"tracking_overhead/vocoder_v1/{precision}",
                partial(
                    training.tracking_overhead,
                    "pretrain_vocoder",
                    ["vocoder=v1", *cuda],
                    steps=100,
                    save_every=50,
                    pairs=3,
                    warmup=10,
                    label=f"vocoder_v1/{precision}",
                ),
            ),
        ]
    plan += [
        (
            "checkpoint_stall/300MB",
            partial(
                training.checkpoint_stall,
                [*TINY, "adapter.bottleneck=96000", "trainer.device=cuda"],
                pairs=3,
                label="300MB",
            ),
        ),
        ("resume_latency", partial(jobs.resume_latency, [*TINY, "trainer.device=cuda"], pairs=3)),
        # one GPU: nccl with one rank (1 GPU x 2 processes is not possible with nccl) against a plain process
        (
            "distributed_step_time/hubert_base_l6_1_rank",
            partial(
                jobs.distributed_step_time,
                "train_adapter",
                ["ssl=hubert_base", "ssl.layer=6", "trainer.device=cuda"],
                nproc=1,
                batch_size=8,
                steps=100,
                pairs=3,
                warmup=20,
                label="hubert_base_l6_1_rank",
            ),
        ),
        (
            "restore",
            partial(
                restore.restore_figures,
                ssl="hubert_base",
                layer=6,
                vocoder="v1",
                device="cuda",
                seconds=60,
                repeats=3,
                long_seconds=600,
            ),
        ),
        (
            "clean_corpus/hubert_base_l6_v1_bf16",
            partial(
                cleaning.cleaning_figures,
                "hubert_base_l6_v1_bf16",
                HUBERT_L6,
                "v1",
                files=600,
                files_per_batch=16,
                batch_size=16,
                device="cuda",
                precision="bf16",
                bare_repeats=3,
                scaling=False,
                per_1000h=True,
            ),
        ),
    ]
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--only", nargs="*", default=[], help="name prefixes of the figures to run")
    parser.add_argument("--figure", help=argparse.SUPPRESS)  # run this one figure in this process
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.preset == "gpu" and not torch.cuda.is_available():
        parser.error("--preset gpu needs a CUDA device")
    plan = dict(cpu_plan() if args.preset == "cpu" else gpu_plan())
    if args.figure:
        result = plan[args.figure]()
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
    for name in plan:
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
