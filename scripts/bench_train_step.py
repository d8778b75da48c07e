"""Time training steps of the stages' real presets (random weights, embedded corpus) per precision.

One JSON line per (case, precision): seconds per optimizer step (median of the timed steps), samples per
second and peak accelerator memory. The step is the stage's own ``training_step`` (forward, backward,
clipping, optimizer, grad scaler), without MLflow around it.

    .venv/bin/python scripts/bench_train_step.py --device cuda --precisions 32 bf16 16-mixed
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from torch.utils.data import DataLoader

from pipeline.config import compose_config
from pipeline.data.datasets import epoch_batches
from pipeline.engine.stage import Precision

CASES = {
    # name: (stage, overrides)
    "train_adapter/mhubert_147": ("train_adapter", ["ssl=mhubert_147", "batch_size=16", "data.segment_seconds=2.0"]),
    "train_adapter/mhubert_147/atotti_recipe": (
        "train_adapter",
        ["recipe=atotti_miipher2", "batch_size=16", "data.segment_seconds=2.0"],
    ),
    "pretrain_vocoder/mhubert_147+v1": (
        "pretrain_vocoder",
        ["ssl=mhubert_147", "vocoder=v1", "batch_size=16", "data.segment_seconds=0.5"],
    ),
    "pretrain_vocoder/mhubert_147+conformer_v1_22k": (
        "pretrain_vocoder",
        ["ssl=mhubert_147", "vocoder=conformer_v1_22k", "batch_size=16", "data.segment_seconds=0.5"],
    ),
}


def stage_class(stage: str):
    if stage == "train_adapter":
        from pipeline.stages.train_adapter import TrainAdapter

        return TrainAdapter
    from pipeline.stages.pretrain_vocoder import PretrainVocoder

    return PretrainVocoder


def bench(name: str, device: str, precision: str, steps: int, warmup: int) -> dict:
    stage_name, overrides = CASES[name]
    cfg = compose_config(stage_name, [*overrides, f"trainer.device={device}", f"trainer.precision={precision}"])
    torch.manual_seed(0)
    stage = stage_class(stage_name)(cfg, Precision.from_config(device, precision))
    stage.build()
    for m in stage.modules.values():
        m.train()
    batches = epoch_batches(len(stage.train_set), int(cfg.batch_size), 0, 0, 0)
    loader = DataLoader(stage.train_set, batch_sampler=batches, collate_fn=stage.collate, num_workers=4)
    cached = [stage.to_device(b) for _, b in zip(range(2), loader)]  # the step, not the data pipeline
    cuda = stage.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        stage.training_step(cached[i % len(cached)])
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    return {
        "case": name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision,
        "batch_size": int(cfg.batch_size),
        "seconds_per_step": per_step,
        "min": min(times),
        "max": max(times),
        "samples_per_s": int(cfg.batch_size) / per_step,
        "steps_timed": len(times),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16", "16-mixed"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="the kernels a job uses with trainer.deterministic=true (the default for training)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.deterministic:
        from pipeline.engine.session import torch_deterministic

        torch_deterministic()
    for name in args.cases:
        for precision in args.precisions:
            print(json.dumps(bench(name, args.device, precision, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
