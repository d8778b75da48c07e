"""Corpus readers on small trees built in each corpus's real layout, and bad-audio handling."""

import logging

import numpy as np
import pytest
import soundfile as sf

from pipeline.data.audio import AudioError, load_audio
from pipeline.data.corpus import (
    READERS,
    CorpusError,
    Utterance,
    corpus_dataset,
    load_corpus_audio,
    read_corpus,
)

RATE = 16000


def tone(seconds: float = 0.2, rate: int = RATE, freq: float = 220.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def write_wav(path, wave=None, rate: int = RATE):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(rate=rate) if wave is None else wave, rate)
    return path


def test_every_format_is_registered():
    assert set(READERS) == {"ljspeech", "libritts", "libritts_r", "jvs", "fleurs_r", "directory", "voices"}


def test_utterance_keeps_positional_order_and_speaker_is_optional(tmp_path):
    utt = Utterance("a", tmp_path / "a.wav", "hello")
    assert (utt.id, utt.text, utt.speaker) == ("a", "hello", "")


# --- LJSpeech ---------------------------------------------------------------------------------


def test_ljspeech(tmp_path):
    write_wav(tmp_path / "wavs" / "LJ001-0001.wav")
    write_wav(tmp_path / "wavs" / "LJ001-0002.wav")
    (tmp_path / "metadata.csv").write_text("LJ001-0001|Raw 1|Normalized one\nLJ001-0002|Two|\n", encoding="utf-8")
    utts = read_corpus("ljspeech", tmp_path)
    assert [(u.id, u.text) for u in utts] == [("LJ001-0001", "Normalized one"), ("LJ001-0002", "Two")]
    assert all(u.path.is_file() for u in utts)


def test_ljspeech_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "metadata.csv").write_text("ok|text\nbroken line\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"metadata.csv:2: expected 'id\|text"):
        read_corpus("ljspeech", tmp_path)


# --- LibriTTS / LibriTTS-R --------------------------------------------------------------------


def build_libritts(root, subsets=("train-clean-100", "dev-clean")):
    for subset in subsets:
        for speaker, chapter in (("84", "121123"), ("1034", "121119")):
            for utt in ("000001_000000", "000002_000001"):
                stem = f"{speaker}_{chapter}_{utt}"
                wav = write_wav(root / subset / speaker / chapter / f"{stem}.wav")
                wav.with_name(f"{stem}.normalized.txt").write_text(f"Normalized {stem}.\n", encoding="utf-8")
                wav.with_name(f"{stem}.original.txt").write_text(f"ORIGINAL {stem}", encoding="utf-8")
        (root / subset / "84" / "121123" / "84_121123.trans.tsv").write_text("ignored", encoding="utf-8")


@pytest.mark.parametrize("fmt", ["libritts", "libritts_r"])
def test_libritts_corpus_root(tmp_path, fmt):
    build_libritts(tmp_path)
    utts = read_corpus(fmt, tmp_path)
    assert len(utts) == 8
    first = next(u for u in utts if u.id == "84_121123_000001_000000")
    assert first.speaker == "84" and first.text == "Normalized 84_121123_000001_000000."
    assert {u.speaker for u in utts} == {"84", "1034"}
    assert [u.path.parts[-4] for u in utts[:4]] == ["dev-clean"] * 4  # sorted by subset
    only_train = read_corpus(fmt, tmp_path, ["train-clean-100"])
    assert len(only_train) == 4 and all("train-clean-100" in u.path.parts for u in only_train)


def test_libritts_subset_directory_and_original_text_fallback(tmp_path):
    build_libritts(tmp_path, subsets=("train-clean-360",))
    stem = "1034_121119_000002_000001"
    (tmp_path / "train-clean-360" / "1034" / "121119" / f"{stem}.normalized.txt").unlink()
    utts = read_corpus("libritts_r", tmp_path / "train-clean-360")
    assert len(utts) == 4
    assert next(u for u in utts if u.id == stem).text == f"ORIGINAL {stem}"


def test_libritts_errors_name_the_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected LibriTTS layout"):
        read_corpus("libritts", tmp_path / "nowhere")
    write_wav(tmp_path / "flat" / "a.wav")
    with pytest.raises(FileNotFoundError, match=r"no wav files under .*flat; expected LibriTTS layout"):
        read_corpus("libritts", tmp_path / "flat")
    build_libritts(tmp_path / "corpus")
    with pytest.raises(FileNotFoundError, match=r"subsets \['train-other-500'\] not found"):
        read_corpus("libritts", tmp_path / "corpus", ["train-other-500"])


# --- JVS --------------------------------------------------------------------------------------


def build_jvs(root):
    for speaker in ("jvs001", "jvs002"):
        for subset, stems in (
            ("parallel100", ["VOICEACTRESS100_001", "VOICEACTRESS100_002"]),
            ("nonpara30", ["BASIC5000_0025"]),
            ("whisper10", ["VOICEACTRESS100_003"]),
            ("falset10", ["VOICEACTRESS100_004"]),
        ):
            for stem in stems:
                write_wav(root / speaker / subset / "wav24kHz16bit" / f"{stem}.wav", rate=24000)
            lines = [f"{stem}:テキスト{stem[-1]}" for stem in stems]
            if speaker == "jvs002" and subset == "parallel100":
                lines = lines[:1]  # VOICEACTRESS100_002 has no transcript line
            (root / speaker / subset / "transcripts_utf8.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / speaker / "lab").mkdir()  # other folders are ignored


def test_jvs(tmp_path, caplog):
    build_jvs(tmp_path)
    with caplog.at_level(logging.WARNING):
        utts = read_corpus("jvs", tmp_path)
    assert len(utts) == 10
    assert {u.speaker for u in utts} == {"jvs001", "jvs002"}
    first = next(u for u in utts if u.id == "jvs001_parallel100_VOICEACTRESS100_001")
    assert first.text == "テキスト1" and first.speaker == "jvs001"
    assert next(u for u in utts if u.id == "jvs002_parallel100_VOICEACTRESS100_002").text == ""
    assert "1 of 10 wav files have no transcript line" in caplog.text
    whisper = read_corpus("jvs", tmp_path, ["whisper10"])
    assert [u.id for u in whisper] == ["jvs001_whisper10_VOICEACTRESS100_003", "jvs002_whisper10_VOICEACTRESS100_003"]
    assert len(read_corpus("jvs", tmp_path / "jvs002")) == 5  # one speaker folder as root
    _, waves = load_corpus_audio(utts[:1], RATE)  # 24 kHz is resampled
    assert abs(waves[0].numel() - int(0.2 * RATE)) <= 1


def test_jvs_errors(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no speaker folders \(jvs001, ...\) in .*; expected JVS layout"):
        read_corpus("jvs", tmp_path)
    build_jvs(tmp_path / "jvs_ver1")
    (tmp_path / "jvs_ver1" / "jvs001" / "nonpara30" / "transcripts_utf8.txt").write_text("no colon here\n")
    with pytest.raises(CorpusError, match=r"nonpara30/transcripts_utf8.txt:1: expected 'ID:text'"):
        read_corpus("jvs", tmp_path / "jvs_ver1")


# --- FLEURS-R ---------------------------------------------------------------------------------


def build_fleurs(root, languages=("en_us", "ja_jp")):
    for lang in languages:
        for split, count in (("train", 2), ("dev", 1), ("test", 1)):
            rows = []
            for i in range(count):
                name = f"{lang}{split}{i}.wav"
                write_wav(root / lang / "audio" / split / name, rate=24000)
                rows.append(
                    "\t".join(
                        [str(1000 + i), name, f"Raw Text {i}.", f"normalized text {i}", "n o r m", "4800", "FEMALE"]
                    )
                )
            (root / lang / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_fleurs_r_parent_of_languages_and_language_folder(tmp_path):
    build_fleurs(tmp_path)
    utts = read_corpus("fleurs_r", tmp_path)
    assert len(utts) == 8 and all(u.path.is_file() for u in utts)
    first = utts[0]
    assert first.id == "en_us_train_en_ustrain0" and first.text == "normalized text 0"
    assert first.path == tmp_path / "en_us" / "audio" / "train" / "en_ustrain0.wav"
    one_language = read_corpus("fleurs_r", tmp_path / "ja_jp", ["dev", "test"])
    assert [u.id for u in one_language] == ["ja_jp_dev_ja_jpdev0", "ja_jp_test_ja_jptest0"]


def test_fleurs_r_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no <split>.tsv in .*; expected FLEURS layout"):
        read_corpus("fleurs_r", tmp_path)
    build_fleurs(tmp_path, languages=("en_us",))
    with pytest.raises(CorpusError, match="unknown FLEURS splits"):
        read_corpus("fleurs_r", tmp_path, ["validation"])
    (tmp_path / "en_us" / "dev.tsv").write_text("only-one-column\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"dev.tsv:1: expected tab-separated columns id, file_name"):
        read_corpus("fleurs_r", tmp_path)


def test_fleurs_missing_audio_is_skipped_and_counted(tmp_path, caplog):
    build_fleurs(tmp_path, languages=("en_us",))
    (tmp_path / "en_us" / "audio" / "train" / "en_ustrain1.wav").unlink()
    with caplog.at_level(logging.WARNING):
        kept, _ = load_corpus_audio(read_corpus("fleurs_r", tmp_path), RATE)
    assert len(kept) == 3
    assert "skipped 1 of 4 audio files (missing: 1)" in caplog.text


# --- plain directory and general errors --------------------------------------------------------


def test_directory(tmp_path):
    write_wav(tmp_path / "a.wav")
    write_wav(tmp_path / "sub" / "b.wav")
    (tmp_path / "a.txt").write_text("hello\n")
    assert [(u.id, u.text) for u in read_corpus("directory", tmp_path)] == [("a", "hello"), ("sub/b", "")]


def test_unknown_format_and_root_required(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus format 'timit'"):
        read_corpus("timit", tmp_path)
    with pytest.raises(ValueError, match="data.root must be set for corpus format 'jvs'"):
        read_corpus("jvs", None)
    with pytest.raises(CorpusError, match="data.subsets=.* is not used by the directory format"):
        read_corpus("directory", tmp_path, ["train"])


# --- bad audio --------------------------------------------------------------------------------


def make_bad_files(root):
    """One file per skip reason, plus files that are fixed on load (stereo, odd rate)."""
    bad = {
        "missing": root / "missing.wav",
        "unreadable": root / "garbage.wav",
        "empty": root / "empty.wav",
        "silent": root / "silent.wav",
        "non-finite": root / "nan.wav",
        "clipped": root / "clipped.wav",
    }
    bad["unreadable"].write_bytes(b"RIFF not really a wav")
    sf.write(bad["empty"], np.zeros(0), RATE)
    sf.write(bad["silent"], np.zeros(RATE // 10), RATE)
    nan = tone()
    nan[100] = np.nan
    sf.write(bad["non-finite"], nan, RATE, subtype="FLOAT")
    sf.write(bad["clipped"], np.clip(tone(amplitude=3.0), -1, 1), RATE)
    good = {
        "stereo": write_wav(root / "stereo.wav", np.stack([tone(), tone(freq=330)], axis=1)),
        "odd rate": write_wav(root / "odd.wav", tone(rate=22050), rate=22050),
        "normalised to 0 dBFS": write_wav(root / "peak.wav", peak_normalised()),
    }
    return bad, good


@pytest.mark.parametrize("reason", ["missing", "unreadable", "empty", "silent", "non-finite", "clipped"])
def test_each_bad_audio_reason_is_reported(tmp_path, reason):
    bad, _ = make_bad_files(tmp_path)
    with pytest.raises(AudioError) as info:
        load_audio(bad[reason], RATE, max_clipped_fraction=0.001)
    assert info.value.reason == reason and str(bad[reason]) in str(info.value)


def test_clipping_check_is_off_for_plain_load_audio(tmp_path):
    bad, _ = make_bad_files(tmp_path)
    assert load_audio(bad["clipped"], RATE).numel() == int(0.2 * RATE)


def test_corpus_loading_skips_and_counts_every_reason_once(tmp_path, caplog):
    bad, good = make_bad_files(tmp_path)
    utts = [Utterance(name, path, "") for name, path in {**bad, **good}.items()]
    with caplog.at_level(logging.INFO, logger="pipeline.data.corpus"):
        kept, waves = load_corpus_audio(utts, RATE)
    assert [u.id for u in kept] == list(good)
    assert all(w.ndim == 1 and torch_is_finite(w) for w in waves)
    assert abs(waves[1].numel() - int(0.2 * RATE)) <= 1  # 22050 Hz resampled
    summaries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(summaries) == 1
    assert (
        "skipped 6 of 9 audio files (clipped: 1, empty: 1, missing: 1, non-finite: 1, silent: 1, unreadable: 1)"
    ) in summaries[0]
    assert "mixed down to mono: 1" in caplog.text and "resampled from 22050 Hz: 1" in caplog.text
    kept_all, _ = load_corpus_audio(utts, RATE, max_clipped_fraction=None)
    assert "clipped" in [u.id for u in kept_all]


def test_corpus_with_no_usable_audio_fails_with_the_counts(tmp_path):
    bad, _ = make_bad_files(tmp_path)
    with pytest.raises(AudioError, match=r"no usable audio files in the corpus \(.*silent: 1"):
        load_corpus_audio([Utterance(k, p, "") for k, p in bad.items()], RATE)


def peak_normalised() -> np.ndarray:
    """Speech-like: a swelling tone normalised to full scale, so only its loudest peaks reach it."""
    wave = tone() * np.hanning(int(0.2 * RATE))
    return wave / np.abs(wave).max()


def torch_is_finite(wave) -> bool:
    return bool(np.isfinite(wave.numpy()).all())


def test_asr_corpus_scan_skips_files_that_would_fail_mid_epoch(tmp_path):
    from pipeline.config import compose_config
    from pipeline.models.asr import CharVocabulary, ConformerCTC
    from pipeline.stages.train_asr import select_utterances

    bad, good = make_bad_files(tmp_path)
    utts = [Utterance(name, path, "a") for name, path in {**bad, **good}.items()]
    asr = compose_config("train_asr", ["asr=tiny"]).asr
    kept = select_utterances(utts, CharVocabulary(asr.vocabulary), ConformerCTC(asr), RATE, None)
    assert {u.id for u in kept} == set(good) | {"clipped"}  # ASR keeps clipped audio
    for utt in kept:
        load_audio(utt.path, RATE)  # what the dataset does mid-epoch


def test_a_corpus_as_an_mlflow_dataset_is_named_by_its_files_and_the_digest_follows_them(tmp_path):
    for name in ("a", "b", "c"):
        write_wav(tmp_path / "wavs" / f"{name}.wav")
    utterances = read_corpus("directory", tmp_path)
    dataset = corpus_dataset("mine", tmp_path, utterances)
    assert dataset.name == "mine" and dataset.source.to_dict()["uri"] == str(tmp_path.resolve())
    assert corpus_dataset("mine", tmp_path, list(reversed(utterances))).digest == dataset.digest  # order-free
    assert corpus_dataset("mine", tmp_path, utterances[:2]).digest != dataset.digest  # another selection
    write_wav(tmp_path / "wavs" / "c.wav", tone(seconds=0.3))  # a file re-encoded or replaced
    assert corpus_dataset("mine", tmp_path, read_corpus("directory", tmp_path)).digest != dataset.digest
    demo = corpus_dataset("demo", None, read_corpus("ljspeech", None))
    assert demo.source.to_dict()["uri"].endswith("pipeline/data/demo")  # the embedded demo corpus
