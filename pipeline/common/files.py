"""Small file helpers shared by the engine, the data code and the importers."""

from __future__ import annotations

import hashlib
import posixpath
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


class UnsafePath(ValueError):
    """A name that would put a file outside the directory or prefix it is written under."""


def safe_relative(name: str) -> str:
    """``name`` as a normalised relative POSIX path; UnsafePath when it is empty, absolute, climbs out with
    ``..`` or holds a NUL. Names come from third-party data (a crawl's manifest, a shard's member names), so
    every writer of a named file checks them (docs/reliability.md)."""
    if not name or "\x00" in name:
        raise UnsafePath(f"{name!r} is empty or holds a NUL character")
    if name.startswith("/"):
        raise UnsafePath(f"{name!r} is absolute; an output name must be relative to the output")
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise UnsafePath(f"{name!r} leads outside the output (..)")
    return normal


def contained(root: str, name: str) -> str:
    """Where ``name`` is written under ``root`` (a local directory or an ``s3://`` prefix), checked: the name by
    ``safe_relative``, and locally every existing part of the path with symlinks resolved, so a symlink inside
    the output tree cannot lead a write elsewhere. UnsafePath when the file would land outside ``root``."""
    relative = safe_relative(name)
    if root.startswith("s3://"):
        return f"{root.rstrip('/')}/{relative}"
    base = Path(root).expanduser().resolve()
    target = base / relative
    if not target.resolve().is_relative_to(base):  # resolve() follows every symlink that exists on the way
        raise UnsafePath(f"{name!r} resolves outside {base} through a symlink ({target.resolve()})")
    return str(target)
