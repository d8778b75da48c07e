"""Restoration speed and memory: the chain's real-time factor and the peak memory for a long file.

Random weights (nothing is downloaded): encoder preset ``ssl`` at ``layer`` with adapters, vocoder
preset ``vocoder``. ``restore_rtf`` is seconds of compute per second of audio (below 1 is faster than
real time), chunked as ``restore`` does by default; ``restore_peak_rss`` is the process's peak
resident memory after restoring a long file, next to its size before and the waveforms' own size,
so what the restoration itself holds is visible (chunking keeps it independent of the file length).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch

from pipeline.bench import figure, spread
from pipeline.config import compose_config
from pipeline.data.audio import load_audio
from pipeline.data.corpus import read_corpus
from pipeline.engine.stage import Precision
from pipeline.inference.chain import RestorationChain


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def speech(seconds: float, rate: int) -> torch.Tensor:
    """The demo corpus, repeated to ``seconds``."""
    waves = [load_audio(u.path, rate) for u in read_corpus("ljspeech", None)]
    one = torch.cat(waves)
    return one.repeat(int(seconds * rate) // one.numel() + 1)[: int(seconds * rate)]


def build_chain(ssl: str, layer: int, vocoder: str, device: str, precision: str, chunk_seconds: float):
    cfg = compose_config("finetune_vocoder", [])
    ssl_cfg = compose_config("train_adapter", [f"ssl={ssl}", f"ssl.layer={layer}"]).ssl
    vocoder_cfg = compose_config("pretrain_vocoder", [f"vocoder={vocoder}"]).vocoder
    return RestorationChain(
        ssl_cfg, cfg.adapter, vocoder_cfg, Precision.from_config(device, precision), chunk_seconds=chunk_seconds
    )


def restore_figures(
    *,
    ssl: str,
    layer: int,
    vocoder: str,
    device: str = "cpu",
    precision: str = "32",
    seconds: float = 30.0,
    repeats: int = 3,
    long_seconds: float = 600.0,
    chunk_seconds: float = 10.0,
) -> list[dict[str, Any]]:
    """``restore_rtf`` over ``seconds`` of speech (median of ``repeats``, after a warm-up), and ``restore_peak_rss``
    for a file of ``long_seconds`` (none at 0)."""
    torch.manual_seed(0)
    chain = build_chain(ssl, layer, vocoder, device, precision, chunk_seconds)
    setup = {
        "ssl": ssl,
        "layer": layer,
        "vocoder": vocoder,
        "device": str(chain.device),
        "precision": precision,
        "chunk_seconds": chunk_seconds,
        "threads": torch.get_num_threads(),
    }
    wave = speech(seconds, chain.rate_in)
    chain.restore(wave[: chain.rate_in * 2], chain.rate_in)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        chain.restore(wave, chain.rate_in)
        if chain.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    figures = [
        figure(
            "restore_rtf",
            statistics.median(times) / seconds,
            "s compute / s audio",
            f"median of {repeats} restorations of {seconds:g} s of speech",
            runs_s=spread(times, 3),
            **setup,
        )
    ]
    if long_seconds > 0:
        figures.append(peak_rss_figure(chain, long_seconds, setup))
    return figures


def peak_rss_figure(chain: RestorationChain, long_seconds: float, setup: dict[str, Any]) -> dict[str, Any]:
    """``restore_peak_rss``: the process's peak memory after restoring ``long_seconds`` of speech in one call."""
    long = speech(long_seconds, chain.rate_in)
    before = peak_rss_mb()
    started = time.perf_counter()
    out = chain.restore(long, chain.rate_in)
    elapsed = time.perf_counter() - started
    return figure(
        "restore_peak_rss",
        peak_rss_mb(),
        "MiB",
        f"peak RSS of the process after restoring {long_seconds:g} s",
        peak_rss_before_mb=round(before, 1),
        rtf=round(elapsed / long_seconds, 4),
        waveforms_mb=round((long.numel() + out.numel()) * 4 / 2**20, 1),
        **setup,
    )
