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

import errno
import fnmatch
import io
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.common.files import AUDIO_SUFFIXES, UnsafePath, safe_relative
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
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def s3_client():
    from pipeline.data.shards import s3_client as client

    return client()


S3_FINAL = {
    "NoSuchKey": errno.ENOENT,
    "NoSuchBucket": errno.ENOENT,
    "404": errno.ENOENT,
    "NotFound": errno.ENOENT,
    "AccessDenied": errno.EACCES,
    "403": errno.EACCES,
}  # an S3 error code that is the object's, not the network's


def is_transient(err: BaseException | None) -> bool:
    """Whether storage failed for a passing reason (a disk or network error, an S3 time-out or 5xx), as opposed
    to a file that is missing or forbidden, which trying again does not change."""
    if isinstance(err, OSError):
        return not isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
    code = str(getattr(err, "response", None) and err.response.get("Error", {}).get("Code", ""))
    if code and code != "None":
        return code not in S3_FINAL
    return type(err).__module__.startswith(("botocore", "urllib3"))  # connection errors and time-outs


def _s3_error(uri: str, err: Exception) -> OSError:
    """An S3 failure as the OSError a local read would raise: FileNotFoundError or PermissionError (final), or
    EIO (transient)."""
    code = str(getattr(err, "response", None) and err.response.get("Error", {}).get("Code", ""))
    number = S3_FINAL.get(code, errno.EIO)
    kind = {errno.ENOENT: FileNotFoundError, errno.EACCES: PermissionError}.get(number, OSError)
    return kind(number, f"cannot read {uri}: {err}")


def read_bytes(uri: str) -> bytes:
    """The bytes of a local file or an S3 object (FileNotFoundError or PermissionError when missing or forbidden,
    another OSError when the storage failed)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            raise _s3_error(uri, err) from err
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
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as err:  # every failed upload may pass (credentials fixed, the service back): EIO
            raise OSError(errno.EIO, f"upload failed: {err}") from err
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


def _segment_regex(segment: str) -> str:
    """One path segment of a glob as a regex: ``*`` and ``?`` never cross a ``/``; ``[...]`` as in fnmatch."""
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        close = segment.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif close > 0:
            body = segment[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _pattern_regex(pattern: str) -> re.Pattern:
    """A regex for a glob relative to its root: ``**`` is any number of directories (none included)."""
    parts = ["(?:[^/]+/)*" if segment == "**" else _segment_regex(segment) + "/" for segment in pattern.split("/")]
    regex = "".join(parts)
    regex = regex + "[^/]+" if pattern.split("/")[-1] == "**" else regex.removesuffix("/")  # a last ** is any file
    return re.compile(regex + r"\Z", re.DOTALL)


def walk_files(root: str, max_depth: int | None = None):
    """Every file under ``root`` (relative POSIX paths, sorted), never descending into a symlinked directory:
    a link loop (``loop -> .``) cannot make the listing endless, and its cost is bounded by the files that
    exist. A symlink to a file is listed; ``max_depth`` stops at that many directory levels."""
    found = []
    for top, dirs, files in os.walk(root, followlinks=False):
        relative = Path(top).relative_to(root)
        depth = len(relative.parts)
        if max_depth is not None and depth >= max_depth:
            dirs[:] = []
        dirs.sort()
        found.extend((relative / name).as_posix() for name in files if max_depth is None or depth < max_depth)
    return sorted(found)


def _glob(pattern: str) -> tuple[str, list[str]]:
    """(root, matches) of a local or S3 glob; the root is the part before the first wildcard."""
    root = _glob_root(pattern)
    if is_s3(pattern):
        return root, [k for k in _s3_keys(root + "/") if fnmatch.fnmatch(k, pattern.replace("**/", "*"))]
    rest = pattern[len(root) :].lstrip("/") if root != "." else pattern
    regex = _pattern_regex(rest)
    depth = None if "**" in rest else rest.count("/") + 1
    # like glob, a wildcard does not match a hidden name (.partial files, .git)
    return root, [
        join(root, name)
        for name in walk_files(root, depth)
        if regex.match(name) and not any(part.startswith(".") for part in name.split("/"))
    ]


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
    # normalised, so that an id made from a path that climbs (../up/b.wav) is relative to the real common root
    paths = [_normal(p if is_s3(p) or os.path.isabs(p) else join(base, p)) for p in table["path"].astype(str)]
    ids = list(table["id"].astype(str)) if "id" in table.columns else None
    if ids is not None and len(set(ids)) != len(ids):
        raise ConfigError(f"input={uri}: the 'id' column has duplicates; every input needs its own id")
    if ids is None:
        local = [p for p in paths if not is_s3(p)]
        root = os.path.commonpath([os.path.dirname(p) for p in local]) if len(local) == len(paths) else ""
        ids = [_relative(p, root) if root else p.replace("s3://", "", 1) for p in paths]
    return base, list(zip(paths, ids))


def _normal(path: str) -> str:
    if is_s3(path):
        bucket, key = split_s3(path)
        return f"s3://{bucket}/{posixpath.normpath(key)}"
    return os.path.normpath(path)


def _shards(root: str) -> list[Unit] | None:
    """The units of prepare_data's shards under ``root``, or None when it holds no shard manifest."""
    manifest = join(root, "manifest.json")
    if not exists(manifest):
        return None
    try:
        splits = json.loads(read_bytes(manifest))["splits"]
        return [
            Unit("shard", root, info["name"], sha256=info["sha256"], samples=int(info.get("samples", 0)))
            for split in sorted(splits)
            for info in splits[split]["shards"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{manifest} is not a shard manifest of prepare_data: {err}") from err


def output_name(item_id: str, suffix: str, taken: set[str]) -> str:
    """``item_id`` with the output format's suffix; two inputs that would share a name (a.wav, a.flac) keep
    their own suffix in it (a.flac.wav). UnsafePath for an id that would lead outside the output."""
    item_id = safe_relative(item_id)
    path = PurePosixPath(item_id)
    name = str(path.with_suffix(suffix)) if path.suffix.lower() in AUDIO_SUFFIXES else f"{item_id}{suffix}"
    if name in taken:
        name = f"{item_id}{suffix}"
    taken.add(name)
    return name


def list_units(source: str, suffix: str) -> list[Unit]:
    """Every unit of an input (ConfigError: nothing found, an unreadable manifest, a missing path)."""
    source = (
        source
        if is_s3(source)
        else str(Path(source).expanduser().resolve())
        if not any(c in source for c in GLOB_CHARACTERS)
        else str(Path(source).expanduser())
    )
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
            pairs = [(join(source, name), name) for name in walk_files(source) if _is_audio(name)]
        else:
            raise ConfigError(f"input={source} not found")
    if not pairs:
        raise ConfigError(f"input={source} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return _file_units(source, pairs, suffix)


def _file_units(source: str, pairs: list[tuple[str, str]], suffix: str) -> list[Unit]:
    """The file units of (path, id) pairs; ConfigError naming the rows whose id would be written outside the
    output (``..``, an absolute id): a crawl's manifest is third-party data."""
    taken: set[str] = set()
    units, unsafe = [], []
    for row, (path, item_id) in enumerate(pairs):
        try:
            units.append(Unit("file", path, item_id, output_name(item_id, suffix, taken)))
        except UnsafePath as err:
            unsafe.append(f"row {row + 1} ({path}): {err}")
    if unsafe:
        raise ConfigError(
            f"input={source}: {len(unsafe)} input(s) would be written outside the output: "
            + "; ".join(unsafe[:10])
            + ("; ..." if len(unsafe) > 10 else "")
            + ". Give every input a relative id without '..'."
        )
    return units


def existing_outputs(output: str) -> set[str]:
    """The audio files under an output directory or prefix now, as names relative to it (symlinked directories
    not followed)."""
    if is_s3(output):
        prefix = output.rstrip("/") + "/"
        return {_relative(k, prefix) for k in _s3_keys(prefix) if _is_audio(k)}
    root = Path(output).expanduser()
    return {name for name in walk_files(str(root)) if _is_audio(name)} if root.is_dir() else set()


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
        raise ConfigError(
            f"output={output} is inside input={source}; restored files would be mixed with the inputs "
            "(and read as inputs next time). Choose a directory or prefix outside it."
        )
