"""Corpus readers, and a small corpus's audio loaded into memory (one audio file is read by audio.py).

Readers turn a corpus directory into a list of ``Utterance`` (id, path, text, speaker) without
reading audio; ``READERS`` maps the ``data.format`` names to them:

- ``ljspeech``: ``metadata.csv`` (``id|text|normalized text``) and ``wavs/<id>.wav``
- ``libritts`` / ``libritts_r``: ``<subset>/<speaker>/<chapter>/<speaker>_<chapter>_<utt>_<seg>.wav``
  with ``<stem>.normalized.txt`` (or ``.original.txt``) beside each wav
- ``jvs``: ``jvsNNN/<subset>/wav24kHz16bit/*.wav`` with ``<subset>/transcripts_utf8.txt`` (``ID:text``)
- ``fleurs_r``: ``<lang>/<split>.tsv`` (FLEURS columns) and ``<lang>/audio/<split>/<file_name>``
- ``directory``: any audio files, each with an optional ``<name>.txt`` / ``<name>.lab`` transcript
- ``voices``: the synthetic multi-voice corpus (voices.py) in LJSpeech layout, built at ``root`` at first use

Audio is mixed down to mono and resampled to the model rate (audio.py). Files that cannot be used (missing,
unreadable, empty, silent, NaN/Inf, clipped) are skipped and counted by reason when a corpus is loaded, with one
summary in the log, so training never crashes mid-epoch.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.common.files import AUDIO_SUFFIXES
from pipeline.data.audio import DEFAULT_MAX_CLIPPED_FRACTION, AudioError, AudioInfo, read_audio

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"


class CorpusError(ValueError):
    """A corpus that is not in the expected layout; the message names the path and the layout."""


@dataclass(frozen=True)
class Utterance:
    id: str
    path: Path
    text: str
    speaker: str = ""  # speaker label where the corpus has one (LibriTTS, JVS); "" otherwise


# --------------------------------------------------------------------------------------------
# A corpus's audio in memory (one file: audio.py)
# --------------------------------------------------------------------------------------------


def load_corpus_audio(
    utterances: list[Utterance],
    sample_rate: int,
    *,
    max_clipped_fraction: float | None = DEFAULT_MAX_CLIPPED_FRACTION,
) -> tuple[list[Utterance], list[torch.Tensor]]:
    """Load every usable utterance into memory (small corpora); skip the rest, counted by reason
    and logged once as a summary (with a few example files per reason)."""
    kept, waves = [], []
    report = LoadReport(len(utterances))
    for utt in utterances:
        try:
            wave, info = read_audio(utt.path, sample_rate, max_clipped_fraction=max_clipped_fraction)
        except AudioError as err:
            report.skip(err)
            continue
        report.loaded(info, sample_rate)
        kept.append(utt)
        waves.append(wave)
    report.log()
    if not kept:
        raise AudioError(f"no usable audio files in the corpus ({report.summary() or 'it is empty'})", "empty")
    return kept, waves


class LoadReport:
    """Counts of skipped files by reason and of files that needed mixing down or resampling."""

    EXAMPLES = 3

    def __init__(self, total: int):
        self.total = total
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.fixed: Counter[str] = Counter()

    def skip(self, err: AudioError) -> None:
        self.skipped[err.reason] += 1
        if len(self.examples[err.reason]) < self.EXAMPLES:
            self.examples[err.reason].append(str(err))
        log.debug("skipping: %s", err)

    def loaded(self, info: AudioInfo, sample_rate: int) -> None:
        if info.channels > 1:
            self.fixed["mixed down to mono"] += 1
        if info.sample_rate != sample_rate:
            self.fixed[f"resampled from {info.sample_rate} Hz"] += 1

    def summary(self) -> str:
        return ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))

    def log(self) -> None:
        if self.fixed:
            log.info("loaded audio: %s", ", ".join(f"{what}: {n}" for what, n in sorted(self.fixed.items())))
        if self.skipped:
            examples = "; ".join(e for reason in sorted(self.examples) for e in self.examples[reason])
            log.warning(
                "skipped %d of %d audio files (%s). Examples: %s",
                sum(self.skipped.values()),
                self.total,
                self.summary(),
                examples,
            )


# --------------------------------------------------------------------------------------------
# Corpus readers
# --------------------------------------------------------------------------------------------


def _corpus_dir(root: str | Path, layout: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist; expected {layout}")
    return root


def _no_subsets(fmt: str, subsets: Iterable[str] | None) -> None:
    if subsets:
        raise CorpusError(f"data.subsets={list(subsets)} is not used by the {fmt} format; leave it empty")


def read_ljspeech(root: str | Path, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """LJSpeech layout: ``metadata.csv`` with ``id|text|normalized text`` and ``wavs/<id>.wav``."""
    _no_subsets("ljspeech", subsets)
    root = _corpus_dir(root, "LJSpeech layout (metadata.csv and wavs/)")
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: is {root} a corpus in LJSpeech layout?")
    utterances = []
    for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 2:
            raise CorpusError(f"{meta}:{line_no}: expected 'id|text[|normalized text]'")
        text = parts[2] if len(parts) > 2 and parts[2] else parts[1]
        utterances.append(Utterance(parts[0], root / "wavs" / f"{parts[0]}.wav", text))
    if not utterances:
        raise CorpusError(f"{meta} lists no utterances")
    return utterances


LIBRITTS_LAYOUT = (
    "LibriTTS layout: <subset>/<speaker>/<chapter>/<speaker>_<chapter>_<utt>_<seg>.wav "
    "with <stem>.normalized.txt beside each wav"
)
LIBRITTS_STEM = re.compile(r"^([^_]+)_([^_]+)_([^_]+)_([^_]+)$")


def read_libritts(root: str | Path, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """LibriTTS and LibriTTS-R: ``root`` is the corpus root (holding subsets such as
    ``train-clean-100``) or one subset directory. ``subsets`` keeps only those subsets.
    Text is ``<stem>.normalized.txt``, else ``<stem>.original.txt``, else empty (counted)."""
    root = _corpus_dir(root, LIBRITTS_LAYOUT)
    if any(root.glob("*/*/*.wav")):  # root is a subset: <speaker>/<chapter>/<file>.wav
        by_subset = {root.name: sorted(root.glob("*/*/*.wav"))}
    else:
        by_subset = defaultdict(list)
        for path in sorted(root.glob("*/*/*/*.wav")):
            by_subset[path.relative_to(root).parts[0]].append(path)
    if not by_subset:
        raise FileNotFoundError(f"no wav files under {root}; expected {LIBRITTS_LAYOUT}")
    chosen = _choose_subsets(root, dict(by_subset), subsets)
    utterances, untranscribed, misnamed = [], 0, 0
    for path in (p for name in chosen for p in by_subset[name]):
        match = LIBRITTS_STEM.match(path.stem)
        if not match or match.group(1) != path.parent.parent.name or match.group(2) != path.parent.name:
            misnamed += 1
            continue
        text = _first_text(path, (".normalized.txt", ".original.txt"))
        untranscribed += text is None
        utterances.append(Utterance(path.stem, path, text or "", speaker=match.group(1)))
    if misnamed:
        log.warning(
            "%s: ignored %d wav files not named <speaker>_<chapter>_<utt>_<seg>.wav inside <speaker>/<chapter>/",
            root,
            misnamed,
        )
    if not utterances:
        raise FileNotFoundError(f"no LibriTTS utterances under {root}; expected {LIBRITTS_LAYOUT}")
    if untranscribed:
        log.warning(
            "%s: %d of %d wav files have no .normalized.txt or .original.txt (empty text)",
            root,
            untranscribed,
            len(utterances),
        )
    return utterances


def _first_text(path: Path, suffixes: Iterable[str]) -> str | None:
    for suffix in suffixes:
        candidate = path.with_name(path.stem + suffix)
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip()
    return None


def _choose_subsets(root: Path, found: dict[str, list], subsets: Iterable[str] | None) -> list[str]:
    """The found subset names to read, in sorted order; all of them when ``subsets`` is empty."""
    if not subsets:
        return sorted(found)
    wanted = list(subsets)
    missing = [name for name in wanted if name not in found]
    if missing:
        raise FileNotFoundError(f"subsets {missing} not found under {root} (found: {sorted(found)})")
    return sorted(wanted)


JVS_LAYOUT = "JVS layout: jvsNNN/<subset>/wav24kHz16bit/*.wav with <subset>/transcripts_utf8.txt (ID:text lines)"
JVS_SPEAKER = re.compile(r"^jvs\d{3}$")


def read_jvs(root: str | Path, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """JVS (jvs_ver1): ``root`` holds ``jvs001`` ... ``jvs100`` (or is one of them). Subsets are
    ``parallel100``, ``nonpara30``, ``whisper10``, ``falset10``; ``subsets`` keeps only those.
    A wav without a transcript line gets empty text (counted in the log)."""
    root = _corpus_dir(root, JVS_LAYOUT)
    speakers = (
        [root]
        if JVS_SPEAKER.match(root.name)
        else sorted(d for d in root.iterdir() if d.is_dir() and JVS_SPEAKER.match(d.name))
    )
    if not speakers:
        raise FileNotFoundError(f"no speaker folders (jvs001, ...) in {root}; expected {JVS_LAYOUT}")
    wanted = set(subsets or ())
    utterances, untranscribed = [], 0
    for speaker in speakers:
        for subset in sorted(d for d in speaker.iterdir() if (d / "wav24kHz16bit").is_dir()):
            if wanted and subset.name not in wanted:
                continue
            transcripts = _jvs_transcripts(subset / "transcripts_utf8.txt")
            for path in sorted((subset / "wav24kHz16bit").glob("*.wav")):
                text = transcripts.get(path.stem)
                untranscribed += text is None
                utterances.append(
                    Utterance(f"{speaker.name}_{subset.name}_{path.stem}", path, text or "", speaker=speaker.name)
                )
    if not utterances:
        which = f" of subsets {sorted(wanted)}" if wanted else ""
        raise FileNotFoundError(f"no JVS wav files{which} under {root}; expected {JVS_LAYOUT}")
    if untranscribed:
        log.warning("%s: %d of %d wav files have no transcript line (empty text)", root, untranscribed, len(utterances))
    return utterances


def _jvs_transcripts(path: Path) -> dict[str, str]:
    """``ID:text`` lines; a missing file means no transcripts."""
    if not path.is_file():
        return {}
    out = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, text = line.partition(":")
        if not sep or not key.strip():
            raise CorpusError(f"{path}:{line_no}: expected 'ID:text' (JVS transcripts_utf8.txt)")
        out[key.strip()] = text.strip()
    return out


FLEURS_SPLITS = ("train", "dev", "test")
FLEURS_COLUMNS = "id, file_name, raw_transcription, transcription, characters, num_samples, gender"
FLEURS_LAYOUT = "FLEURS layout: <lang>/<split>.tsv and <lang>/audio/<split>/<file_name> (splits train, dev, test)"


def read_fleurs(root: str | Path, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """FLEURS / FLEURS-R: ``root`` is a language folder (``<split>.tsv`` + ``audio/<split>/``) or
    the parent of language folders. ``subsets`` names splits (train, dev, test); default all.
    Text is the normalised ``transcription`` column (the raw one when that is empty)."""
    root = _corpus_dir(root, FLEURS_LAYOUT)
    splits = list(subsets or FLEURS_SPLITS)
    unknown = [s for s in splits if s not in FLEURS_SPLITS]
    if unknown:
        raise CorpusError(f"unknown FLEURS splits {unknown}; known: {list(FLEURS_SPLITS)}")

    def is_language(d: Path) -> bool:
        return any((d / f"{s}.tsv").is_file() for s in FLEURS_SPLITS)

    languages = [root] if is_language(root) else sorted(d for d in root.iterdir() if d.is_dir() and is_language(d))
    if not languages:
        raise FileNotFoundError(f"no <split>.tsv in {root} or its sub-folders; expected {FLEURS_LAYOUT}")
    utterances = []
    for lang in languages:
        for split in splits:
            utterances += _fleurs_split(lang, split)
    if not utterances:
        raise FileNotFoundError(f"no FLEURS utterances of splits {splits} under {root}; expected {FLEURS_LAYOUT}")
    return utterances


def _fleurs_split(lang: Path, split: str) -> list[Utterance]:
    tsv = lang / f"{split}.tsv"
    if not tsv.is_file():
        return []
    out = []
    for line_no, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 4 or not fields[1].strip():
            raise CorpusError(f"{tsv}:{line_no}: expected tab-separated columns {FLEURS_COLUMNS}")
        file_name, raw, normalized = fields[1].strip(), fields[2].strip(), fields[3].strip()
        path = lang / "audio" / split / file_name
        out.append(Utterance(f"{lang.name}_{split}_{Path(file_name).stem}", path, normalized or raw))
    return out


TRANSCRIPT_SUFFIXES = (".txt", ".lab")


def read_directory(root: str | Path, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """A plain directory of audio files (recursive), each with an optional transcript beside it
    (``<name>.txt`` or ``<name>.lab``); without one the text is empty."""
    _no_subsets("directory", subsets)
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


def read_voices(root: str | Path, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """The synthetic multi-voice corpus (voices.py) at ``root``, built there first if it is not: LJSpeech layout,
    each utterance with its voice as speaker; the held-out voices' utterances come last."""
    from pipeline.data.voices import read_voices_corpus

    return read_voices_corpus(root, subsets)


READERS: dict[str, Callable[..., list[Utterance]]] = {
    "ljspeech": read_ljspeech,
    "libritts": read_libritts,
    "libritts_r": read_libritts,  # LibriTTS-R keeps LibriTTS's layout
    "jvs": read_jvs,
    "fleurs_r": read_fleurs,  # FLEURS-R keeps FLEURS's layout
    "directory": read_directory,
    "voices": read_voices,
}


def mlflow_dataset(location: str | Path, name: str, digest: str):
    """An MLflow dataset (``mlflow.data``) for a run's inputs: ``location`` (a directory or an ``s3://`` URI)
    says where the data lives, ``digest`` what it holds."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    location = str(location)
    with warnings.catch_warnings():  # a local path matches two equivalent source kinds
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(location if "://" in location else str(Path(location).resolve()))
    return MetaDataset(source=source, name=name, digest=digest)


def corpus_dataset(name: str, root: str | Path | None, utterances: list[Utterance]):
    """The utterances a job reads from a corpus, as an MLflow dataset named ``name`` (``data.name``). The
    digest covers each utterance's ID and file size, not the audio bytes (a big corpus is not read twice
    to name it): another subset, a file added, removed or re-encoded gives another digest."""
    lines = sorted(f"{u.id}\t{Path(u.path).stat().st_size}" for u in utterances)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return mlflow_dataset(DEMO_DIR if root is None else root, name, digest)


def read_corpus(fmt: str, root: str | Path | None, subsets: Iterable[str] | None = None) -> list[Utterance]:
    """Read a corpus in layout ``fmt``; ``root=None`` is the embedded demo corpus (LJSpeech layout)."""
    if fmt not in READERS:
        raise ValueError(f"unknown corpus format {fmt!r}; known: {sorted(READERS)}")
    if root is None and fmt != "ljspeech":
        raise ValueError(
            f"data.root must be set for corpus format {fmt!r} (null is the embedded demo corpus, "
            "which is in ljspeech layout)"
        )
    return READERS[fmt](DEMO_DIR if root is None else root, list(subsets or ()))
