"""Where a corpus to clean comes from and where its restored files go: local paths or ``s3://`` addresses.

An input is one of (docs/cleaning.md):

- a directory tree (every audio file under it) or one audio file;
- a glob (``corpus/**/*.flac``, ``s3://bucket/crawl/*/*.wav``);
- a manifest, ``.csv`` or ``.parquet``, with a ``path`` column (relative paths are relative to the manifest)
  and, optionally, an ``id`` column;
- the project's WebDataset shards (a directory or prefix with prepare_data's ``manifest.json``): each
  sample's ``noisy.wav`` is an input.

Every input gets an ``id`` (its path relative to the input's root, or ``<shard>/<key>``) and an output name
under the output: the same relative path with the output format's suffix. What a read task opens is a
``Unit``: one file, or one whole shard (read once, sha256 checked, every sample an input).
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.common.files import AUDIO_SUFFIXES
from pipeline.config import ConfigError

MANIFEST_SUFFIXES = (".csv", ".parquet")
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class Unit:
    """What one read task opens: a file (one input) or a shard (every sample in it is an input)."""

    kind: str  # file | shard
    source: str  # the file's path or s3:// address; a shard's directory or prefix
    id: str  # a file's id; a shard's file name (e.g. train-000000.tar)
    output: str = ""  # a file's output name under the output (shards name theirs when read)
    sha256: str = ""  # a shard's digest from its manifest
    samples: int = 0  # a shard's inputs, as its manifest counts them


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def s3_client():
    from pipeline.data.shards import s3_client as client

    return client()


def read_bytes(uri: str) -> bytes:
    """The bytes of a local file or an S3 object (OSError when missing or unreadable)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            raise OSError(f"cannot read {uri}: {err}") from err
    return Path(uri).read_bytes()


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False
    return Path(uri).exists()


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_s3(root) else str(Path(root) / name)


def write_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that no reader ever sees half of it: a local file is written under a
    temporary name beside it and renamed; an S3 object appears whole when its upload completes."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _s3_keys(prefix_uri: str) -> list[str]:
    """Every object address under an S3 prefix, sorted."""
    bucket, prefix = split_s3(prefix_uri)
    keys: list[str] = []
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            keys.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
    except Exception as err:
        raise ConfigError(f"cannot list {prefix_uri}: {err}") from err
    return sorted(keys)


def _is_audio(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in AUDIO_SUFFIXES


def _relative(path: str, root: str) -> str:
    if is_s3(path):
        return posixpath.relpath(split_s3(path)[1], split_s3(root)[1] or ".")
    return Path(path).relative_to(root).as_posix()


def _glob_root(pattern: str) -> str:
    cut = min(pattern.find(c) for c in GLOB_CHARACTERS if c in pattern)
    return pattern[:cut].rpartition("/")[0] or "."


def _glob(pattern: str) -> tuple[str, list[str]]:
    """(root, matches) of a local or S3 glob; the root is the part before the first wildcard."""
    root = _glob_root(pattern)
    if is_s3(pattern):
        return root, [k for k in _s3_keys(root + "/") if fnmatch.fnmatch(k, pattern.replace("**/", "*"))]
    return root, sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _from_manifest(uri: str) -> tuple[str, list[tuple[str, str]]]:
    """(root, [(path, id)]) of a CSV or Parquet manifest with a ``path`` column (and maybe ``id``)."""
    import pandas as pd

    data = io.BytesIO(read_bytes(uri))
    try:
        table = pd.read_parquet(data) if uri.endswith(".parquet") else pd.read_csv(data, dtype=str)
    except Exception as err:
        raise ConfigError(f"input={uri} is not a readable {uri.rsplit('.', 1)[-1]} manifest: {err}") from err
    if "path" not in table.columns:
        raise ConfigError(f"input={uri} has no 'path' column (it has: {', '.join(map(str, table.columns))})")
    base = uri.rpartition("/")[0] if is_s3(uri) else str(Path(uri).resolve().parent)
    paths = [p if is_s3(p) or os.path.isabs(p) else join(base, p) for p in table["path"].astype(str)]
    ids = list(table["id"].astype(str)) if "id" in table.columns else None
    if ids is not None and len(set(ids)) != len(ids):
        raise ConfigError(f"input={uri}: the 'id' column has duplicates; every input needs its own id")
    if ids is None:
        local = [p for p in paths if not is_s3(p)]
        root = os.path.commonpath([os.path.dirname(p) for p in local]) if len(local) == len(paths) else ""
        ids = [_relative(p, root) if root else p.replace("s3://", "", 1) for p in paths]
    return base, list(zip(paths, ids))


def _shards(root: str) -> list[Unit] | None:
    """The units of prepare_data's shards under ``root``, or None when it holds no shard manifest."""
    manifest = join(root, "manifest.json")
    if not exists(manifest):
        return None
    try:
        splits = json.loads(read_bytes(manifest))["splits"]
        return [Unit("shard", root, info["name"], sha256=info["sha256"], samples=int(info.get("samples", 0))) for split in sorted(splits)
                for info in splits[split]["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{manifest} is not a shard manifest of prepare_data: {err}") from err


def output_name(item_id: str, suffix: str, taken: set[str]) -> str:
    """``item_id`` with the output format's suffix; two inputs that would share a name (a.wav, a.flac) keep
    their own suffix in it (a.flac.wav)."""
    path = PurePosixPath(item_id)
    name = str(path.with_suffix(suffix)) if path.suffix.lower() in AUDIO_SUFFIXES else f"{item_id}{suffix}"
    if name in taken:
        name = f"{item_id}{suffix}"
    taken.add(name)
    return name


def list_units(source: str, suffix: str) -> list[Unit]:
    """Every unit of an input (ConfigError: nothing found, an unreadable manifest, a missing path)."""
    source = source if is_s3(source) else str(Path(source).expanduser().resolve()) if not any(
        c in source for c in GLOB_CHARACTERS) else str(Path(source).expanduser())
    if source.lower().endswith(MANIFEST_SUFFIXES):
        if not exists(source):
            raise ConfigError(f"input={source} not found")
        _, pairs = _from_manifest(source)
    elif any(c in source for c in GLOB_CHARACTERS):
        root, matches = _glob(source)
        pairs = [(m, _relative(m, root)) for m in matches if _is_audio(m)]
    else:
        shards = _shards(source.rstrip("/"))
        if shards is not None:
            return shards
        if is_s3(source):
            prefix = source.rstrip("/") + "/"
            pairs = [(k, _relative(k, prefix)) for k in _s3_keys(prefix) if _is_audio(k)]
        elif Path(source).is_file():
            pairs = [(source, Path(source).name)]
        elif Path(source).is_dir():
            pairs = [(str(p), p.relative_to(source).as_posix()) for p in sorted(Path(source).rglob("*"))
                     if p.is_file() and _is_audio(p.name)]
        else:
            raise ConfigError(f"input={source} not found")
    if not pairs:
        raise ConfigError(f"input={source} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    taken: set[str] = set()
    return [Unit("file", path, item_id, output_name(item_id, suffix, taken)) for path, item_id in pairs]


def _root(source: str) -> str | None:
    """The directory or prefix a directory or glob input lists (None for a manifest: its paths are explicit)."""
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return None
    if any(c in source for c in GLOB_CHARACTERS):
        return _glob_root(source)
    if not is_s3(source) and Path(source).expanduser().is_file():
        return str(Path(source).expanduser().resolve().parent)
    return source


def check_output(source: str, output: str) -> None:
    """ConfigError when the output is a file, or is inside the directory or prefix the input lists (restored
    files would be mixed with the inputs, and read as inputs next time)."""
    if not is_s3(output) and Path(output).expanduser().is_file():
        raise ConfigError(f"output={output} is a file; give a directory or an s3:// prefix")
    root = _root(source)
    if root is None or is_s3(root) != is_s3(output):
        return
    if is_s3(output):
        inside = (output.rstrip("/") + "/").startswith(root.rstrip("/") + "/")
    else:
        out, src = Path(output).expanduser().resolve(), Path(root).expanduser().resolve()
        inside = out == src or src in out.parents
    if inside:
        raise ConfigError(f"output={output} is inside input={source}; restored files would be mixed with the inputs "
                          "(and read as inputs next time). Choose a directory or prefix outside it.")
