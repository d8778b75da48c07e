"""Synthesise the embedded demo corpus (LJSpeech layout) with espeak-ng.

Run once by a maintainer; the output is committed under ``pipeline/data/demo``:

    sudo apt-get install espeak-ng sox
    .venv/bin/python scripts/make_demo_corpus.py

Each sentence is spoken by espeak-ng at 16 kHz (voice and speed vary so the corpus is not one
monotone), trimmed of leading/trailing silence by sox, and written as 16-bit PCM WAV. The corpus
is small on purpose (about 2 MB) so the repository stays light.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("make_demo_corpus")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech restoration turns noisy recordings into clean audio.",
    "Please call Stella and ask her to bring these things.",
    "The rain in the valley fell softly all night.",
    "A checkpoint is saved every few hundred steps.",
    "She sells sea shells by the sea shore.",
    "Training resumed from the last committed checkpoint.",
    "The museum opens at nine in the morning.",
    "Every good model starts with clean data.",
    "The old clock on the wall struck twelve.",
    "We measured the noise in the small room.",
    "Bright lights filled the empty station.",
    "The children played football after school.",
    "Turn left at the second traffic light.",
    "My brother plays the violin very well.",
    "The river flows quietly toward the sea.",
    "Fresh bread smells wonderful in the morning.",
    "The meeting was moved to Thursday afternoon.",
    "A cold wind blew across the open field.",
    "The train to the city leaves at seven.",
    "He wrote a long letter to his grandmother.",
    "The garden was full of red and yellow flowers.",
    "Our team finished the project ahead of time.",
    "The cat slept on the warm window sill.",
    "Listen carefully to the sound of the waves.",
    "The library closes early on Sunday.",
    "She found a silver coin under the bench.",
    "The pilot announced a short delay.",
    "Heavy snow covered the mountain road.",
    "The students asked many good questions.",
    "A small boat sailed past the lighthouse.",
    "The soup needs a little more salt.",
    "Thunder rolled over the distant hills.",
    "The doctor will see you in ten minutes.",
    "They painted the kitchen a pale blue.",
    "The recording was made in a quiet studio.",
]

VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m5", "en-gb+f2"]
SPEEDS = [150, 165, 175]


def synthesise(text: str, voice: str, speed: int, out: Path, tmp: Path) -> None:
    """Speak ``text`` to ``out`` as 16 kHz mono 16-bit WAV, silence trimmed."""
    raw = tmp / "raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(
        [
            "sox",
            str(raw),
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            str(out),
            "silence",
            "1",
            "0.05",
            "0.5%",
            "reverse",
            "silence",
            "1",
            "0.05",
            "0.5%",
            "reverse",
            "pad",
            "0.05",
            "0.05",
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "demo"
    parser.add_argument("--output", type=Path, default=default_out)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install it with 'apt-get install espeak-ng sox'")

    wavs = args.output / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            utt_id = f"DEMO-{i + 1:04d}"
            voice = VOICES[i % len(VOICES)]
            speed = SPEEDS[i % len(SPEEDS)]
            synthesise(text, voice, speed, wavs / f"{utt_id}.wav", Path(tmp))
            rows.append(f"{utt_id}|{text}|{text}")
            log.info("%s %s %s", utt_id, voice, text)
    (args.output / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    log.info("wrote %d utterances to %s", len(rows), args.output)


if __name__ == "__main__":
    main()
