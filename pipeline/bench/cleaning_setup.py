"""The corpus cleaning figures' material: a chain trained one step per stage (random weights: the architecture is
what costs) in the current tracking store, and demo speech cut into WAV files of 2-6 s."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from mlflow import MlflowClient

from pipeline.bench.restore import speech

# one step of each stage: the weights stay random, the checkpoints are real
CHAIN_STEPS = [
    "trainer.max_steps=1",
    "checkpoint.save_interval=1",
    "validation.interval=0",
    "batch_size=2",
    "data.segment_seconds=0.5",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "tracking.log_model=false",
]
RATE = 16000  # the corpus's WAV files
MIN_S, MAX_S = 2.0, 6.0  # file durations


@dataclass
class Corpus:
    """A corpus directory's WAV files and their durations."""

    root: Path
    paths: list[Path]
    seconds: list[float]

    @property
    def audio_s(self) -> float:
        return sum(self.seconds)


def train_chain(client: MlflowClient, ssl: list[str], vocoder: str, device: str = "cpu") -> str:
    """train_adapter -> pretrain_vocoder -> finetune_vocoder, one step each; the finetune_vocoder run's ID."""
    from pipeline.engine.session import run_stage
    from pipeline.stages import stage_class

    steps = [*CHAIN_STEPS, f"trainer.device={device}"]
    runs = {}
    for stage, argv in (
        ("train_adapter", [*ssl, *steps]),
        ("pretrain_vocoder", [*ssl, f"vocoder={vocoder}", *steps]),
        ("finetune_vocoder", None),
    ):
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
        sf.write(paths[-1], wave[start : start + n], RATE, subtype="PCM_16")
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
