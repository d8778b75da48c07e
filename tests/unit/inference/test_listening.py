"""Listening pages play inside MLflow's artifact viewer: media embedded as data: URIs within a budget."""

import base64
import re

import numpy as np

from pipeline.inference.listening import Example, MediaEmbedder, write_listening_page


def _page(tmp_path, seconds: float = 1.0):
    rng = np.random.default_rng(0)
    examples = [
        Example(
            f"utt-{i}",
            "some text · ü",
            {
                "clean": rng.standard_normal(int(16000 * seconds)) * 0.1,
                "degraded": rng.standard_normal(int(16000 * seconds)) * 0.1,
            },
        )
        for i in range(2)
    ]
    return write_listening_page(tmp_path, "a page · ü", examples, 16000)


def test_audio_and_spectrograms_are_embedded_and_also_written_beside_the_page(tmp_path):
    page = _page(tmp_path).read_text(encoding="utf-8")
    assert "<meta charset='utf-8'>" in page and "a page · ü" in page
    sources = re.findall(r"src='([^']+)'", page)
    assert len(sources) == 2 * 2 + 2  # two players and one spectrogram per example
    assert all(s.startswith(("data:audio/wav;base64,", "data:image/png;base64,")) for s in sources)
    first = base64.b64decode(sources[0].split(",", 1)[1])
    assert first == (tmp_path / "utt-0_clean.wav").read_bytes() and first[:4] == b"RIFF"


def test_media_beyond_the_budget_are_linked_by_name_with_a_note(tmp_path):
    _page(tmp_path)
    media = MediaEmbedder(tmp_path, budget=(tmp_path / "utt-0_clean.wav").stat().st_size)
    assert media.src("utt-0_clean.wav").startswith("data:audio/wav;base64,")
    assert media.src("utt-0_degraded.wav") == "utt-0_degraded.wav"
    assert "linked by name" in media.note()


def test_a_long_id_gives_a_short_distinct_file_name():
    """A crawl's ids can be 245 characters; with the suffixes that is over a file system's 255 bytes."""
    from pipeline.inference.listening import MAX_NAME, safe_name

    long_a, long_b = "a/" * 120 + "x.wav", "a/" * 120 + "y.wav"
    assert len(safe_name(long_a)) == MAX_NAME and safe_name(long_a) != safe_name(long_b)
    assert safe_name("sub/utt 01.wav") == "sub_utt_01_wav"
