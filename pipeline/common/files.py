"""Small file helpers shared by the engine, the data code and the importers."""

from __future__ import annotations

import hashlib
from pathlib import Path

# What the corpus readers, the noise/RIR folders and transcribe read as audio (soundfile: libsndfile >= 1.1 reads MP3).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
