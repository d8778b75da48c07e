"""Benchmark: degradation throughput in times real time per CPU core.

    .venv/bin/python scripts/bench_degradation.py [--repeats 3]

Degrades every utterance of the embedded demo corpus with each preset of configs/degradation/
on one thread (torch and NumPy single-threaded work), and prints audio seconds processed per
wall-clock second. Figures depend on the machine; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

from pipeline.config import CONFIG_DIR, compose_config  # noqa: E402
from pipeline.data.corpus import load_corpus_audio, read_corpus  # noqa: E402
from pipeline.data.degrade import OtherUtterances, degrade, sample_rng  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes over the corpus per preset")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, waves = load_corpus_audio(read_corpus("ljspeech", None), 16000)
    seconds = sum(w.numel() for w in waves) / 16000
    presets = sorted(p.stem for p in (CONFIG_DIR / "degradation").glob("*.yaml"))
    print(f"demo corpus: {len(waves)} utterances, {seconds:.1f} s of audio; 1 thread")
    print(f"{'preset':<10} {'x real time per core':>22} {'ms per second of audio':>24}")
    for preset in presets:
        cfg = compose_config("prepare_data", [f"degradation={preset}"]).degradation
        started = time.perf_counter()
        for repeat in range(args.repeats):
            for index, wave in enumerate(waves):
                degrade(wave, 16000, cfg, sample_rng(0, repeat, index), others=OtherUtterances(waves, index))
        elapsed = time.perf_counter() - started
        factor = seconds * args.repeats / elapsed
        print(f"{preset:<10} {factor:>22.1f} {1000 / factor:>24.2f}")


if __name__ == "__main__":
    main()
