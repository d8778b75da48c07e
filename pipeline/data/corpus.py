"""Corpus readers and audio loading.

Audio is read with soundfile (torchaudio 2.11's ``load`` needs torchcodec/ffmpeg), mixed down to
mono and resampled to the model rate. Files that cannot be used (unreadable, empty, silent,
NaN/Inf) are skipped and counted when the corpus is scanned, so training never crashes mid-epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Utterance:
    id: str
    path: Path
    text: str


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Read ``path`` as a mono float32 tensor at ``sample_rate``; AudioError if unusable."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioError(f"cannot read audio file {path}: {err}") from err
    if data.size == 0:
        raise AudioError(f"audio file {path} is empty")
    if not np.isfinite(data).all():
        raise AudioError(f"audio file {path} contains NaN or Inf samples")
    wave = torch.from_numpy(data.mean(axis=1))
    if float(wave.abs().max()) < 1e-5:
        raise AudioError(f"audio file {path} is silent")
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave.contiguous()


def read_ljspeech(root: str | Path) -> list[Utterance]:
    """LJSpeech layout: ``metadata.csv`` with ``id|text|normalized text`` and ``wavs/<id>.wav``."""
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: is {root} a corpus in LJSpeech layout?")
    utterances = []
    for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 2:
            raise ValueError(f"{meta}:{line_no}: expected 'id|text[|normalized text]'")
        text = parts[2] if len(parts) > 2 and parts[2] else parts[1]
        utterances.append(Utterance(parts[0], root / "wavs" / f"{parts[0]}.wav", text))
    return utterances


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
TRANSCRIPT_SUFFIXES = (".txt", ".lab")


def read_directory(root: str | Path) -> list[Utterance]:
    """A plain directory of audio files (recursive), each with an optional transcript beside it
    (``<name>.txt`` or ``<name>.lab``); without one the text is empty."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory of audio files")
    utterances = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        text = ""
        for suffix in TRANSCRIPT_SUFFIXES:
            if path.with_suffix(suffix).is_file():
                text = path.with_suffix(suffix).read_text(encoding="utf-8").strip()
                break
        utterances.append(Utterance(str(path.relative_to(root).with_suffix("")), path, text))
    if not utterances:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {root}")
    return utterances


READERS = {"ljspeech": read_ljspeech, "directory": read_directory}


def read_corpus(fmt: str, root: str | Path | None) -> list[Utterance]:
    """Read a corpus; ``root=None`` is the embedded demo corpus."""
    if fmt not in READERS:
        raise ValueError(f"unknown corpus format {fmt!r}; known: {sorted(READERS)}")
    return READERS[fmt](DEMO_DIR if root is None else root)


def load_corpus_audio(utterances: list[Utterance], sample_rate: int) -> tuple[list[Utterance], list[torch.Tensor]]:
    """Load every usable utterance into memory (small corpora); skip and count the rest."""
    kept, waves, skipped = [], [], Counter()
    for utt in utterances:
        try:
            waves.append(load_audio(utt.path, sample_rate))
            kept.append(utt)
        except AudioError as err:
            reason = str(err).rsplit(" ", 1)[-1] if "cannot read" not in str(err) else "unreadable"
            skipped[reason] += 1
            log.warning("skipping %s", err)
    if skipped:
        log.warning("skipped %d of %d files: %s", sum(skipped.values()), len(utterances), dict(skipped))
    if not kept:
        raise AudioError("no usable audio files in the corpus")
    return kept, waves
