"""Restoration speed and memory: real-time factor of the chain and peak memory for a long file.

Random weights (nothing is downloaded): encoder preset ``--ssl`` at ``--layer`` with adapters, vocoder
preset ``--vocoder``. Prints one JSON line per figure:

- ``restore_rtf``: seconds of compute per second of audio (median of ``--repeats`` runs over
  ``--seconds`` of audio, chunked as ``restore`` does by default; below 1 is faster than real time);
- ``restore_peak_rss``: the process's peak resident memory after restoring a ``--long-seconds`` file,
  next to its size before (model loaded) and the input and output waveforms' own size, so what the
  restoration itself holds is visible. Chunking keeps it independent of the file length.

    .venv/bin/python scripts/bench_restore.py --ssl hubert_base --layer 6 --vocoder v1
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import time

import torch

from pipeline.config import compose_config
from pipeline.data.corpus import load_audio, read_corpus
from pipeline.engine.stage import Precision
from pipeline.restoration import RestorationChain


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def speech(seconds: float, rate: int) -> torch.Tensor:
    """The demo corpus, repeated to ``seconds``."""
    waves = [load_audio(u.path, rate) for u in read_corpus("ljspeech", None)]
    one = torch.cat(waves)
    return one.repeat(int(seconds * rate) // one.numel() + 1)[: int(seconds * rate)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssl", default="hubert_base")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--vocoder", default="v1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-seconds", type=float, default=600.0, help="the long file for peak memory (0 skips)")
    parser.add_argument("--chunk-seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    cfg = compose_config("finetune_vocoder", [])
    ssl = compose_config("train_adapter", [f"ssl={args.ssl}", f"ssl.layer={args.layer}"]).ssl
    vocoder = compose_config("pretrain_vocoder", [f"vocoder={args.vocoder}"]).vocoder
    chain = RestorationChain(ssl, cfg.adapter, vocoder, Precision.from_config(args.device, args.precision),
                             chunk_seconds=args.chunk_seconds)
    setup = {"ssl": args.ssl, "layer": args.layer, "vocoder": args.vocoder, "device": str(chain.device),
             "precision": args.precision, "chunk_seconds": args.chunk_seconds, "threads": torch.get_num_threads()}

    wave = speech(args.seconds, chain.rate_in)
    chain.restore(wave[: chain.rate_in * 2], chain.rate_in)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = chain.restore(wave, chain.rate_in)
        if chain.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    rtf = statistics.median(times) / args.seconds
    print(json.dumps({"name": "restore_rtf", "value": round(rtf, 4), "unit": "s compute / s audio",
                      "how": f"median of {args.repeats} restorations of {args.seconds:g} s of speech",
                      "runs_s": [round(t, 3) for t in times], "output_rate": chain.rate_out,
                      "output_samples": out.numel(), **setup}), flush=True)

    if args.long_seconds > 0:
        long = speech(args.long_seconds, chain.rate_in)
        before = peak_rss_mb()
        start = time.perf_counter()
        out = chain.restore(long, chain.rate_in)
        elapsed = time.perf_counter() - start
        waveforms_mb = (long.numel() + out.numel()) * 4 / 2**20
        print(json.dumps({"name": "restore_peak_rss", "value": round(peak_rss_mb(), 1), "unit": "MiB",
                          "how": f"peak RSS of the process after restoring {args.long_seconds:g} s",
                          "peak_rss_before_mb": round(before, 1), "waveforms_mb": round(waveforms_mb, 1),
                          "seconds": round(elapsed, 1), "rtf": round(elapsed / args.long_seconds, 4), **setup}),
              flush=True)


if __name__ == "__main__":
    main()
