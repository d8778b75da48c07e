"""A synthetic English corpus of many voices with held-out speakers, made from Debian's speech synthesisers.

Seventeen voices (synth.py: flite's built-in voices, festival's two diphone voices, espeak-ng accents and
variants) speak a few hundred template sentences (sentences.py), each utterance at its own speed and pitch drawn from
a fixed seed, so every build on the same synthesiser versions gives the same files. Two voices and a tenth of the
sentences are held out: the held-out rows (a held-out voice speaking a held-out sentence) come last in
``metadata.csv``, so ``data.val_size`` set to their count (``data=voices`` does) validates on voices and sentences
that training never sees, and training never hears a held-out voice or sentence.

Layout (LJSpeech, read by the ``voices`` format in corpus.py, or by ``ljspeech``):

- ``metadata.csv``: ``id|text|text``, training rows first, then the held-out rows; ``wavs/<id>.wav``: 16 kHz mono
  16-bit; an id is ``<voice>-<sentence number>``
- ``utterances.csv``: ``id|voice|split|speed|pitch|seconds`` for every row
- ``voices.json``: the voices (held out or not), counts, seconds, the settings, the generator version and the
  synthesiser package versions; written last, so a directory with it is a finished corpus

``ensure_voices_corpus`` builds the corpus at first use into ``$PIPELINE_VOICES_DIR`` or
``~/.cache/speech-pipeline/voices-v1`` (or a given directory): into a temporary directory beside it, renamed into
place when complete, under a file lock so that concurrent jobs build it once. ``python -m pipeline.data.voices``
builds it from the command line.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from pipeline.data.sentences import english_sentences
from pipeline.data.synth import (
    SAMPLE_RATE,
    VOICES,
    check_synthesisers,
    speak_to_file,
    synthesiser_versions,
    voices_named,
)

if TYPE_CHECKING:
    from pipeline.data.corpus import Utterance

# corpus.py (and torch with it) is imported where it is used: the synthesis processes import this module only

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # raise when the same settings would give other audio or text; names the default cache
DIR_ENV = "PIPELINE_VOICES_DIR"
MANIFEST = "voices.json"
MAX_WORKERS = 2
HELDOUT_VOICES = ("flite-rms", "espeak-en-gb-x-rp-f2")


@dataclass(frozen=True)
class VoicesSpec:
    """What a voices corpus holds; a corpus is rebuilt only into a directory without one."""

    sentences: int = 400  # distinct sentences made (sentences.py)
    heldout_fraction: float = 0.1  # of the sentences, spoken only by the held-out voices
    voices_per_sentence: int = 2  # training voices speaking each training sentence
    voices: tuple[str, ...] = tuple(voice.name for voice in VOICES)
    heldout_voices: tuple[str, ...] = HELDOUT_VOICES
    speed_range: tuple[float, float] = (0.85, 1.15)  # speaking rate, times the voice's own
    pitch_range: tuple[float, float] = (0.92, 1.08)  # pitch (and formants), times the voice's own
    seed: int = 1234


@dataclass(frozen=True)
class Row:
    id: str
    voice: str
    text: str
    speed: float
    pitch: float
    heldout: bool


def default_voices_dir() -> Path:
    """``$PIPELINE_VOICES_DIR`` where set, else ``~/.cache/speech-pipeline/voices-v<GENERATOR_VERSION>``."""
    configured = os.environ.get(DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "speech-pipeline" / f"voices-v{GENERATOR_VERSION}"


# --------------------------------------------------------------------------------------------
# What is spoken, by whom, how
# --------------------------------------------------------------------------------------------


def plan(spec: VoicesSpec) -> list[Row]:
    """Every utterance of the corpus in ``metadata.csv`` order: each training sentence spoken by
    ``voices_per_sentence`` training voices (taken in turn from a shuffled rotation, so each speaks about as much),
    then each held-out sentence spoken by every held-out voice."""
    train_voices = _check_spec(spec)
    sentences = english_sentences(spec.sentences, spec.seed)
    order = list(range(len(sentences)))
    random.Random(spec.seed).shuffle(order)
    heldout = set(order[: heldout_sentence_count(spec)])
    rotation = list(train_voices)
    random.Random(spec.seed + 1).shuffle(rotation)
    rows = []
    training = [index for index in range(len(sentences)) if index not in heldout]
    for turn, index in enumerate(training):
        for k in range(spec.voices_per_sentence):
            voice = rotation[(turn * spec.voices_per_sentence + k) % len(rotation)]
            rows.append(_row(spec, voice, index, sentences[index], heldout=False))
    for index in sorted(heldout):
        rows += [_row(spec, voice, index, sentences[index], heldout=True) for voice in spec.heldout_voices]
    return rows


def heldout_sentence_count(spec: VoicesSpec) -> int:
    return min(max(round(spec.sentences * spec.heldout_fraction), 1), spec.sentences - 1)


def heldout_row_count(spec: VoicesSpec) -> int:
    """The held-out rows at the end of ``metadata.csv``: the ``data.val_size`` that validates on them."""
    return heldout_sentence_count(spec) * len(spec.heldout_voices)


def _check_spec(spec: VoicesSpec) -> list[str]:
    """The training voices; ValueError for settings that leave a split empty or name unknown voices."""
    voices_named(spec.voices)
    if len(set(spec.voices)) != len(spec.voices):
        raise ValueError(f"voices {list(spec.voices)} name a voice twice")
    strays = [voice for voice in spec.heldout_voices if voice not in spec.voices]
    if strays or not spec.heldout_voices:
        raise ValueError(f"held-out voices {list(spec.heldout_voices)} must be some of the voices {list(spec.voices)}")
    train_voices = [voice for voice in spec.voices if voice not in spec.heldout_voices]
    if not 1 <= spec.voices_per_sentence <= len(train_voices):
        raise ValueError(
            f"voices_per_sentence={spec.voices_per_sentence} must be between 1 and the {len(train_voices)} "
            "training voices"
        )
    if spec.sentences < 2 or not 0 < spec.heldout_fraction < 1:
        raise ValueError("a voices corpus needs at least 2 sentences and a held-out fraction between 0 and 1")
    return train_voices


def _row(spec: VoicesSpec, voice: str, index: int, text: str, heldout: bool) -> Row:
    rng = random.Random(f"{spec.seed}:{voice}:{index}")  # per utterance: independent of the other rows
    speed = round(rng.uniform(*spec.speed_range), 3)
    pitch = round(rng.uniform(*spec.pitch_range), 3)
    return Row(f"{voice}-{index:04d}", voice, text, speed, pitch, heldout)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_corpus(out: Path, spec: VoicesSpec = VoicesSpec(), workers: int = MAX_WORKERS) -> dict:
    """Synthesise the corpus into ``out`` (created; the files of an earlier build there are overwritten);
    returns what ``voices.json`` holds. SynthesiserError names the Debian packages when a synthesiser is missing."""
    rows = plan(spec)
    voices = voices_named(spec.voices)
    check_synthesisers(voices)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, MAX_WORKERS, os.cpu_count() or 1))
    log.info("synthesising %d utterances with %d voices into %s (%d processes)", len(rows), len(voices), out, workers)
    samples = dict(zip((row.id for row in rows), _synthesise_all(rows, out / "wavs", workers)))
    with open(out / "metadata.csv", "w", encoding="utf-8") as meta:
        meta.writelines(f"{row.id}|{row.text}|{row.text}\n" for row in rows)
    with open(out / "utterances.csv", "w", encoding="utf-8") as table:
        table.write("id|voice|split|speed|pitch|seconds\n")
        for row in rows:
            split = "heldout" if row.heldout else "train"
            table.write(f"{row.id}|{row.voice}|{split}|{row.speed}|{row.pitch}|{samples[row.id] / SAMPLE_RATE:.3f}\n")
    summary = _summary(spec, rows, samples)
    (out / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _synthesise_all(rows: list[Row], wavs: Path, workers: int) -> Iterator[int]:
    """Each row's sample count, in row order, its wav written; ``workers`` threads, each waiting on a synthesiser
    process (1: this thread)."""
    jobs = [(row.voice, row.text, row.speed, row.pitch, str(wavs / f"{row.id}.wav")) for row in rows]
    bar = tqdm(total=len(rows), desc="voices", unit="utt", disable=not sys.stderr.isatty())
    step = max(len(rows) // 10, 1)
    if workers == 1:
        results: Iterable[int] = map(speak_to_file, jobs)
        pool = None
    else:  # threads: the synthesisers are subprocesses; no process pool re-importing a caller's __main__
        pool = ThreadPoolExecutor(max_workers=workers)
        results = pool.map(speak_to_file, jobs)
    try:
        for done, count in enumerate(results, 1):
            bar.update()
            if done % step == 0 or done == len(rows):
                log.info("synthesised %d of %d utterances", done, len(rows))
            yield count
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _summary(spec: VoicesSpec, rows: list[Row], samples: dict[str, int]) -> dict:
    """``voices.json``: no timestamps or paths, so two builds write the same file."""

    def seconds(selected: Iterable[Row]) -> float:
        return round(sum(samples[row.id] for row in selected) / SAMPLE_RATE, 2)

    voices = []
    for voice in voices_named(spec.voices):
        spoken = [row for row in rows if row.voice == voice.name]
        counts = {"heldout": voice.name in spec.heldout_voices, "utterances": len(spoken), "seconds": seconds(spoken)}
        voices.append(asdict(voice) | counts)
    train = [row for row in rows if not row.heldout]
    heldout = [row for row in rows if row.heldout]
    return {
        "name": "voices",
        "generator_version": GENERATOR_VERSION,
        "sample_rate": SAMPLE_RATE,
        "spec": _plain(spec),
        "synthesisers": synthesiser_versions(voices_named(spec.voices)),
        "voices": voices,
        "heldout_voices": list(spec.heldout_voices),
        "utterances": {"train": len(train), "heldout": len(heldout), "total": len(rows)},
        "sentences": {"train": len({row.text for row in train}), "heldout": len({row.text for row in heldout})},
        "seconds": {"train": seconds(train), "heldout": seconds(heldout), "total": seconds(rows)},
        "val_size": len(heldout),  # data.val_size that validates on the held-out rows
    }


def _plain(spec: VoicesSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


# --------------------------------------------------------------------------------------------
# The cached corpus
# --------------------------------------------------------------------------------------------


def ensure_voices_corpus(
    root: str | Path | None = None, spec: VoicesSpec | None = None, workers: int = MAX_WORKERS
) -> Path:
    """The voices corpus at ``root`` (default: ``default_voices_dir()``), built there first if it is not: into a
    temporary directory beside it, renamed into place when complete, one process at a time (a file lock; another
    process waits and then finds it built). ``spec=None`` takes a finished corpus made with any settings and builds
    with the default ones; a given ``spec`` must match the corpus found. CorpusError when ``root`` holds something
    else."""
    root = Path(root).expanduser() if root else default_voices_dir()
    if _finished(root, spec):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if _finished(root, spec):
            return root
        _clear_for_build(root)
        partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
        started = time.monotonic()
        try:
            summary = build_corpus(partial, spec or VoicesSpec(), workers)
            partial.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
            partial.rename(root)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log.info(
        "built the voices corpus at %s in %.0f s: %d utterances, %.1f minutes",
        root,
        time.monotonic() - started,
        summary["utterances"]["total"],
        summary["seconds"]["total"] / 60,
    )
    return root


def _finished(root: Path, spec: VoicesSpec | None) -> bool:
    """Whether ``root`` holds a finished corpus (made with ``spec`` unless it is None); CorpusError if it holds one
    made with other settings."""
    from pipeline.data.corpus import CorpusError

    manifest = root / MANIFEST
    if not manifest.is_file():
        return False
    if spec is None:
        return True
    summary = json.loads(manifest.read_text(encoding="utf-8"))
    made = {"generator_version": summary.get("generator_version"), **(summary.get("spec") or {})}
    asked = {"generator_version": GENERATOR_VERSION, **_plain(spec)}
    if made != asked:
        differ = ", ".join(
            f"{key}={made.get(key)!r} (asked: {asked[key]!r})" for key in asked if made.get(key) != asked[key]
        )
        raise CorpusError(
            f"{root} holds a voices corpus made with other settings: {differ}; remove it to rebuild, or choose "
            f"another directory (data.root, {DIR_ENV})"
        )
    return True


def _clear_for_build(root: Path) -> None:
    """Remove what killed builds left (``.<name>.partial-*`` beside ``root``) and an empty ``root``; CorpusError if
    ``root`` holds files that are not a finished voices corpus (never deleted)."""
    from pipeline.data.corpus import CorpusError

    for partial in root.parent.glob(f".{root.name}.partial-*"):
        log.info("removing %s, left by an interrupted build", partial)
        shutil.rmtree(partial, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    if root.exists():
        raise CorpusError(
            f"{root} exists but is not a finished voices corpus (no {MANIFEST}); remove it, or choose another "
            f"directory (data.root, {DIR_ENV})"
        )


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the voices corpus at %s; waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_voices_corpus(root: str | Path | None, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """The ``voices`` format: the corpus at ``root`` (built at first use), each utterance with its voice as speaker."""
    from pipeline.data.corpus import CorpusError, read_ljspeech

    if subsets:
        raise CorpusError(f"data.subsets={list(subsets)} is not used by the voices format; leave it empty")
    root = ensure_voices_corpus(root)
    return [replace(utt, speaker=utt.id.rsplit("-", 1)[0]) for utt in read_ljspeech(root)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.data.voices",
        description="Build the synthetic multi-voice English corpus (Debian's flite, festival and espeak-ng).",
    )
    parser.add_argument(
        "--root", type=Path, help=f"where to build it (default: ${DIR_ENV}, else {default_voices_dir()})"
    )
    parser.add_argument("--workers", type=int, default=MAX_WORKERS, help="synthesis processes (at most 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root = ensure_voices_corpus(args.root, workers=args.workers)
    summary = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    size = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    log.info(
        "voices corpus at %s: %d voices (%s held out), %d utterances (%d held out, the last ones: data.val_size=%d), "
        "%.1f minutes, %.0f MB on disk",
        root,
        len(summary["voices"]),
        ", ".join(summary["heldout_voices"]),
        summary["utterances"]["total"],
        summary["utterances"]["heldout"],
        summary["val_size"],
        summary["seconds"]["total"] / 60,
        size / 1e6,
    )


if __name__ == "__main__":
    main()
