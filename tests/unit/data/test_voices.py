"""The synthetic multi-voice corpus (pipeline/data/voices.py): its plan and held-out split, builds of a small corpus
(a dozen utterances, seconds), the cache's build-once rules, and the error for a missing synthesiser. Tests that
synthesise are skipped where Debian's flite, festival or espeak-ng is not installed (scripts/setup.sh installs them)."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf

from pipeline.config.compose import compose_config
from pipeline.data import voices
from pipeline.data.corpus import CorpusError, load_corpus_audio, read_corpus
from pipeline.data.sentences import english_sentences
from pipeline.data.synth import COMMANDS, SynthesiserError
from pipeline.data.voices import (
    MANIFEST,
    VoicesSpec,
    build_corpus,
    default_voices_dir,
    ensure_voices_corpus,
    heldout_row_count,
    plan,
)

# One voice of each synthesiser in training, a flite and an espeak-ng voice held out: 9 + 2 utterances.
SMALL = VoicesSpec(
    sentences=10,
    voices_per_sentence=1,
    voices=("flite-kal16", "festival-ked", "espeak-en-us-m1", "flite-slt", "espeak-en-f4"),
    heldout_voices=("flite-slt", "espeak-en-f4"),
)
FESTIVAL_VOICES = Path("/usr/share/festival/voices/english")
MISSING = sorted(command for command in set(COMMANDS.values()) if shutil.which(command) is None) + [
    f"festival's {name}" for name in ("kal_diphone", "ked_diphone") if not (FESTIVAL_VOICES / name).is_dir()
]
needs_synthesisers = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed (scripts/setup.sh installs Debian's synthesisers)"
)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return ensure_voices_corpus(tmp_path_factory.mktemp("voices") / "small", SMALL, workers=1)


def split_rows(rows):
    train = [row for row in rows if not row.heldout]
    heldout = [row for row in rows if row.heldout]
    return train, heldout


# --- the plan (no synthesis) --------------------------------------------------------------------


def test_default_plan_holds_out_voices_and_sentences_at_the_end():
    spec = VoicesSpec()
    rows = plan(spec)
    assert rows == plan(VoicesSpec())  # deterministic
    train, heldout = split_rows(rows)
    assert rows[-len(heldout) :] == heldout and len(heldout) == heldout_row_count(spec) == 80
    assert {row.voice for row in heldout} == set(spec.heldout_voices)
    assert not {row.voice for row in train} & {row.voice for row in heldout}
    assert not {row.text for row in train} & {row.text for row in heldout}
    assert len({row.voice for row in rows}) >= 8 and len({row.id for row in rows}) == len(rows) == 800
    assert all(0.85 <= row.speed <= 1.15 and 0.92 <= row.pitch <= 1.08 for row in rows)


def test_each_training_voice_speaks_about_as_much():
    train, _ = split_rows(plan(VoicesSpec()))
    counts = {voice: sum(row.voice == voice for row in train) for voice in {row.voice for row in train}}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_sentences_are_deterministic_distinct_and_spelled_with_letters():
    sentences = english_sentences(300, 7)
    assert sentences == english_sentences(300, 7) and english_sentences(30, 7) == sentences[:30]
    assert len(set(sentences)) == 300 and sentences != english_sentences(300, 8)
    assert set("".join(sentences)) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ',.?!")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"heldout_voices": ("nobody",)}, "must be some of the voices"),
        ({"voices": ("flite-awb", "no-such-voice")}, "unknown voices"),
        ({"voices_per_sentence": 16}, "voices_per_sentence=16"),
    ],
)
def test_plan_refuses_settings_that_leave_a_split_empty(change, message):
    with pytest.raises(ValueError, match=message):
        plan(VoicesSpec(**change))


def test_the_voices_preset_validates_on_the_heldout_rows(monkeypatch):
    monkeypatch.delenv(voices.DIR_ENV, raising=False)
    data = compose_config("train_adapter", ["data=voices"]).data
    assert (data.format, data.val_size) == ("voices", heldout_row_count(VoicesSpec()))
    assert data.root == str(default_voices_dir())
    monkeypatch.setenv(voices.DIR_ENV, "/data/voices")
    assert compose_config("train_adapter", ["data=voices"]).data.root == "/data/voices" == str(default_voices_dir())


# --- a missing synthesiser, the cache (no synthesis) ---------------------------------------------


def test_a_missing_synthesiser_names_the_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # nothing there
    expected = (
        "espeak-ng, flite, text2wave not found on PATH.*apt-get install espeak-ng festival festvox-kdlpc16k flite"
    )
    with pytest.raises(SynthesiserError, match=expected):
        build_corpus(tmp_path / "corpus", SMALL)
    assert not (tmp_path / "corpus" / MANIFEST).exists()


def test_a_voice_that_does_not_speak_names_its_package(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "text2wave"  # festival without the ked voice: SIOD's error, exit status 1
    fake.write_text("#!/bin/sh\necho 'SIOD ERROR: unbound variable : voice_ked_diphone' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    spec = VoicesSpec(voices=("festival-ked", "festival-kal"), heldout_voices=("festival-kal",), voices_per_sentence=1)
    expected = "festival-ked: .*voice_ked_diphone.*apt-get install festival festvox-kdlpc16k"
    with pytest.raises(SynthesiserError, match=expected):
        build_corpus(tmp_path / "corpus", spec)


class Killed(BaseException):
    """As KeyboardInterrupt or SystemExit: not an Exception."""


def fake_build(calls, fail=False, seconds=0.0):
    """A stand-in for build_corpus that writes a manifest (or fails half-way), counting its calls."""

    def build(out, spec, workers):
        calls.append(out)
        (out / "wavs").mkdir(parents=True)
        time.sleep(seconds)
        if fail:
            raise Killed  # a build interrupted half-way
        summary = {"generator_version": voices.GENERATOR_VERSION, "spec": voices._plain(spec)}
        summary |= {"utterances": {"total": 0}, "seconds": {"total": 0.0}}
        (out / MANIFEST).write_text(json.dumps(summary))
        return summary

    return build


def test_an_interrupted_build_leaves_no_corpus_and_the_next_build_clears_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(voices, "build_corpus", fake_build(calls, fail=True))
    with pytest.raises(Killed):
        ensure_voices_corpus(tmp_path / "voices", SMALL)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    (tmp_path / ".voices.partial-left").mkdir()  # as a killed process leaves it
    monkeypatch.setattr(voices, "build_corpus", fake_build(calls))
    root = ensure_voices_corpus(tmp_path / "voices", SMALL)
    assert (root / MANIFEST).is_file() and not (tmp_path / ".voices.partial-left").exists()
    assert ensure_voices_corpus(root, SMALL) == root and len(calls) == 2  # built once, then reused


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(voices, "build_corpus", fake_build(calls, seconds=0.3))
    roots = []
    threads = [
        threading.Thread(target=lambda: roots.append(ensure_voices_corpus(tmp_path / "v", SMALL))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and roots == [tmp_path / "v"] * 2


def test_a_directory_holding_something_else_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(voices, "build_corpus", fake_build([]))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a finished voices corpus"):
        ensure_voices_corpus(tmp_path / "mine", SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    ensure_voices_corpus(tmp_path / "other", SMALL)
    with pytest.raises(CorpusError, match="other settings"):
        ensure_voices_corpus(tmp_path / "other", VoicesSpec())


# --- a small corpus, synthesised -----------------------------------------------------------------


@needs_synthesisers
def test_two_builds_give_the_same_files(small_corpus, tmp_path):
    again = ensure_voices_corpus(tmp_path / "again", SMALL, workers=2)  # two processes: the same files in order
    files = sorted(p.relative_to(small_corpus) for p in small_corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 3 + 11
    for name in files:
        assert (small_corpus / name).read_bytes() == (again / name).read_bytes(), name


@needs_synthesisers
def test_read_corpus_reads_it_with_the_heldout_rows_last(small_corpus):
    utterances = read_corpus("voices", small_corpus)
    assert [u.id for u in utterances] == [u.id for u in read_corpus("ljspeech", small_corpus)]
    summary = json.loads((small_corpus / MANIFEST).read_text())
    heldout = utterances[-summary["val_size"] :]
    train = utterances[: -summary["val_size"]]
    assert summary["val_size"] == heldout_row_count(SMALL) == 2
    assert {u.speaker for u in heldout} == set(SMALL.heldout_voices)
    assert not {u.speaker for u in train} & {u.speaker for u in heldout}
    assert not {u.text for u in train} & {u.text for u in heldout}
    kept, waves = load_corpus_audio(utterances, 16000)  # none skipped as clipped or silent: the split stays put
    assert len(kept) == len(utterances)
    info = sf.info(str(utterances[0].path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert summary["seconds"]["total"] == pytest.approx(sum(len(w) for w in waves) / 16000, abs=0.05)
    with pytest.raises(CorpusError, match="not used by the voices format"):
        read_corpus("voices", small_corpus, ["train"])
