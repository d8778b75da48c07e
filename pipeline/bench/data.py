"""Data figures: degradation speed, DataLoader throughput and shard reading speed (demo corpus)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench import figure, spread
from pipeline.bench.harness import build_stage, tracking_store
from pipeline.config import CONFIG_DIR, compose_config
from pipeline.data.corpus import load_corpus_audio, read_corpus
from pipeline.data.degrade import OtherUtterances, degrade, sample_rng
from pipeline.data.shards import ShardStore, read_manifest, read_shard
from pipeline.prepare_data import run_prepare

RATE = 16000


def degradation_speed(*, repeats: int) -> list[dict[str, Any]]:
    """Seconds of audio degraded per CPU second of one thread, for each degradation preset (demo corpus)."""
    torch.set_num_threads(1)
    _, waves = load_corpus_audio(read_corpus("ljspeech", None), RATE)
    audio_s = sum(w.numel() for w in waves) / RATE
    figures = []
    for preset in sorted(p.stem for p in (CONFIG_DIR / "degradation").glob("*.yaml")):
        cfg = compose_config("prepare_data", [f"degradation={preset}"]).degradation
        speeds = []
        for repeat in range(repeats):
            started = time.thread_time()
            for index, wave in enumerate(waves):
                degrade(wave, RATE, cfg, sample_rng(0, repeat, index), others=OtherUtterances(waves, index))
            speeds.append(audio_s / (time.thread_time() - started))
        figures.append(
            figure(
                f"data/degradation_speed/{preset}",
                statistics.median(speeds),
                "× real time per core",
                f"{len(waves)} demo utterances ({audio_s:.0f} s of audio) through degradation={preset}, "
                f"seeded, one thread, thread CPU time; median of {repeats} passes",
                runs=spread(speeds, 1),
            )
        )
    return figures


def loader_throughput(*, workers: int, epochs: int) -> dict[str, Any]:
    """Training samples per second from train_adapter's loader (degradation included)."""
    with tracking_store() as client:
        stage = build_stage("train_adapter", ["ssl=tiny", f"data.num_workers={workers}"], client)
        size = int(stage.cfg.batch_size)
        rates = []
        for epoch in range(epochs):
            started, samples = time.perf_counter(), 0
            for batch in stage.train_source.loader(epoch, 0, size, workers, stage.collate):
                samples += len(next(iter(batch.values())))
            rates.append(samples / (time.perf_counter() - started))
    return figure(
        f"data/loader_samples_per_s/workers_{workers}",
        statistics.median(rates),
        "samples/s",
        f"train_adapter's training loader (demo corpus, default degradation, batch {size}, {workers} worker "
        f"processes, start-up included), one epoch per run; median of {epochs} epochs",
        runs=spread(rates, 1),
    )


def shard_reading(*, repeats: int) -> dict[str, Any]:
    """MB/s read_shard delivers (tar streaming, sha256 check, WAV decoding) from local shards."""
    with tracking_store():
        out = Path("shards").resolve()
        if run_prepare([f"output={out}", "shard_size=16"]) != 0:
            raise RuntimeError("prepare_data failed")
        manifest = read_manifest(str(out))
        store = ShardStore(str(out))
        infos = [info for split in manifest["splits"].values() for info in split["shards"]]
        total_mb = sum((out / info["name"]).stat().st_size for info in infos) / 1e6
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            for info in infos:
                read_shard(store, info)
            rates.append(total_mb / (time.perf_counter() - started))
    return figure(
        "data/shard_read_mb_per_s",
        statistics.median(rates),
        "MB/s",
        f"read_shard over {len(infos)} local shards ({total_mb:.1f} MB, demo corpus via prepare_data): tar "
        f"streaming, sha256 check, WAV decoding; median of {repeats} passes",
        runs=spread(rates, 1),
    )
