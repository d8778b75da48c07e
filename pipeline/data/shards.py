"""WebDataset-style tar shards of (clean, degraded) pairs on local disk or S3, and their reader.

Layout under the output (a directory or an ``s3://bucket/prefix``)::

    train-000000.tar ...   members <key>.clean.wav, <key>.noisy.wav, <key>.json (16-bit PCM, metadata)
    val-000000.tar ...
    manifest.json          splits -> shards (name, samples, seconds, bytes, sha256), counts, hours, config

Shards are byte-for-byte reproducible: members in a fixed order with zeroed tar metadata.
``manifest.json`` is written last, so a half-written output has no manifest and is never read.

Reading (``StreamingPairs``) streams each shard once per epoch and never needs random access:
the epoch's shard order is a permutation seeded by (seed, epoch); shard k of that order belongs to
logical worker k mod W; each logical worker shuffles a shard's samples (seeded by seed, epoch, shard)
and cuts its stream into whole batches. The data position is the number of batches of the epoch
already consumed, and because physical DataLoader workers are mapped to logical workers by that
position, a resumed epoch yields exactly the batches an uninterrupted one would have, for any
number of workers > 0 (the same number as before the stop).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pipeline.common.files import contained, safe_relative, sha256_file
from pipeline.data.corpus import mlflow_dataset
from pipeline.data.datasets import TRAIN_STREAM, crop_or_pad, with_fault_point
from pipeline.data.degrade import sample_rng

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "speech-pipeline-shards/1"
SHARD_STREAM = 3  # seeds the in-shard shuffle


class ShardError(RuntimeError):
    """A shard or manifest that cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------
# Where shards live: a local directory or an S3 prefix
# --------------------------------------------------------------------------------------------


def s3_client():
    """boto3 S3 client; any endpoint (MinIO, moto) via AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint)


class ShardStore:
    """Put and get named files under a local directory or an ``s3://bucket/prefix``."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.is_s3 = uri.startswith("s3://")
        if self.is_s3:
            bucket, _, prefix = self.uri[len("s3://") :].partition("/")
            self.bucket, self.prefix = bucket, prefix
            self._client = None
        elif "://" in uri:
            raise ShardError(f"unsupported shard location {uri!r}: use a local directory or s3://bucket/prefix")

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, local: Path, name: str) -> None:
        target = contained(self.uri, name)  # never outside the store, whatever the name
        if self.is_s3:
            self.client.upload_file(str(local), self.bucket, self._key(safe_relative(name)))
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(target).with_name(f".{Path(target).name}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)

    def open(self, name: str):
        """A binary file object to stream ``name`` from."""
        try:
            if self.is_s3:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
            return open(Path(self.uri) / name, "rb")
        except Exception as err:
            raise ShardError(f"cannot open {self.uri}/{name}: {err}") from err

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def __getstate__(self):  # DataLoader workers get their own boto3 client
        return {**self.__dict__, "_client": None}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def wav_bytes(wave: np.ndarray | torch.Tensor, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    data = wave.numpy() if torch.is_tensor(wave) else wave
    sf.write(buffer, np.clip(data, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass
class ShardInfo:
    name: str
    samples: int
    seconds: float
    bytes: int
    sha256: str


class ShardWriter:
    """Writes samples into numbered tar shards in a local directory, ``shard_size`` samples each."""

    def __init__(self, out_dir: Path, split: str, shard_size: int, on_shard: Callable[[Path, ShardInfo], None]):
        self.out_dir, self.split, self.shard_size, self.on_shard = out_dir, split, shard_size, on_shard
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._count, self._seconds = 0, 0.0

    def add(self, key: str, clean: bytes, noisy: bytes, meta: dict[str, Any], seconds: float) -> None:
        if self._tar is None:
            path = self.out_dir / f"{self.split}-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        _tar_member(self._tar, f"{key}.clean.wav", clean)
        _tar_member(self._tar, f"{key}.noisy.wav", noisy)
        _tar_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._count += 1
        self._seconds += seconds
        if self._count >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        path = Path(self._tar.name)
        self._tar.close()
        info = ShardInfo(path.name, self._count, round(self._seconds, 3), path.stat().st_size, sha256_file(path))
        self.shards.append(info)
        self.on_shard(path, info)
        self._tar, self._count, self._seconds = None, 0, 0.0

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish_shard()
        return self.shards


def read_manifest(uri: str) -> dict[str, Any]:
    store = ShardStore(uri)
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except ShardError as err:
        raise ShardError(f"no usable {MANIFEST} at {uri} (was prepare_data run and did it finish?): {err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{uri}/{MANIFEST} is not valid JSON: {err}; run prepare_data again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        raise ShardError(f"{uri}/{MANIFEST} has format {found!r}, expected {FORMAT!r}")
    try:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                str(shard["name"]), str(shard["sha256"])
    except (AttributeError, KeyError, TypeError) as err:
        raise ShardError(
            f"{uri}/{MANIFEST} is malformed (splits with their shards' name and sha256 expected: "
            f"{err!r}); run prepare_data again"
        ) from err
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Identity of the data: the shard hashes (not when or where it was written)."""
    shards = [s["sha256"] for split in sorted(manifest["splits"]) for s in manifest["splits"][split]["shards"]]
    return hashlib.sha256("".join(shards).encode()).hexdigest()[:16]


def shard_dataset(uri: str, manifest: dict[str, Any]):
    """The shard set as an MLflow dataset (source: where it lives; digest: what it holds)."""
    return mlflow_dataset(uri, f"{manifest['corpus']['name']}-shards", manifest_digest(manifest))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_shard(store: ShardStore, info: dict[str, Any]) -> list[dict[str, Any]]:
    """All samples of one shard (streamed once, sha256 checked), in stored order."""
    digest = hashlib.sha256()
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    name = info["name"]
    try:
        with store.open(name) as raw:
            reader = _HashingReader(raw, digest)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key, _, kind = member.name.partition(".")
                    data = tar.extractfile(member).read()
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][kind] = data
            reader.drain()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {store.uri}/{name} is unreadable: {err}") from err
    if digest.hexdigest() != info["sha256"]:
        raise ShardError(f"shard {store.uri}/{name} is corrupted: sha256 does not match the manifest")
    out = []
    for key in order:
        parts = samples[key]
        try:
            clean, clean_rate = sf.read(io.BytesIO(parts["clean.wav"]), dtype="float32")
            noisy, noisy_rate = sf.read(io.BytesIO(parts["noisy.wav"]), dtype="float32")
            meta = json.loads(parts["json"])
            _check_sample(meta, clean, noisy, clean_rate, noisy_rate)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise ShardError(f"shard {store.uri}/{name}: sample {key} is incomplete or unreadable ({err})") from err
        out.append({"key": key, "clean": torch.from_numpy(clean), "noisy": torch.from_numpy(noisy), "meta": meta})
    return out


def _check_sample(meta: Any, clean, noisy, clean_rate: int, noisy_rate: int) -> None:
    """A sample's parts agree: the pair has one rate and one length, the length its json states
    (``seconds`` is rounded to 0.1 ms): a member cut short is refused, not padded into training."""
    if not isinstance(meta, dict):
        raise ValueError(f"its json holds a {type(meta).__name__}, not an object")
    rate, seconds = int(meta["sample_rate"]), float(meta["seconds"])
    if clean_rate != rate or noisy_rate != rate:
        raise ValueError(f"audio at {clean_rate}/{noisy_rate} Hz, json says {rate} Hz")
    if len(clean) != len(noisy) or abs(len(clean) - seconds * rate) > rate * 1e-4 + 1:
        raise ValueError(f"clean has {len(clean)} samples, noisy {len(noisy)}, json says {seconds} s")


class _HashingReader(io.RawIOBase):
    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:  # tar's end-of-archive padding also counts for the hash
        while data := self.raw.read(1 << 16):
            self.digest.update(data)

    def read(self, size=-1):
        data = self.raw.read() if size is None or size < 0 else self.raw.read(size)
        self.digest.update(data)
        return data


def _crop_pair(sample: dict[str, Any], length: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
    clean, noisy = sample["clean"], sample["noisy"]
    spare = max(clean.numel() - length, 0)
    start = int(rng.integers(spare + 1)) if rng is not None else 0
    return {"clean": crop_or_pad(clean, length, start), "noisy": crop_or_pad(noisy, length, start)}


class StreamingPairs:
    """The train split of a shard set, streamed per epoch with a resumable batch position."""

    order_depends_on_workers = True  # shards are dealt to logical workers

    def __init__(self, uri: str, manifest: dict[str, Any], segment_samples: int, seed: int):
        self.store = ShardStore(uri)
        self.shards = manifest["splits"]["train"]["shards"]
        if not self.shards:
            raise ShardError(f"{uri}: the manifest lists no train shards")
        self.offsets = np.cumsum([0] + [s["samples"] for s in self.shards]).tolist()  # global sample ids
        self.segment_samples = segment_samples
        self.seed = seed

    def __len__(self) -> int:
        return self.offsets[-1]

    def _plan(self, epoch: int, workers: int) -> list[list[int]]:
        """Shard indices of each logical worker for this epoch."""
        order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, SHARD_STREAM])).permutation(
            len(self.shards)
        )
        return [order[w::workers].tolist() for w in range(workers)]

    def _per_worker(self, batch_size: int, workers: int) -> int:
        """Batches each logical worker yields per epoch: the same in every epoch, whatever the shard
        order, because it is what the worst possible share (the smallest shards) holds."""
        if len(self.shards) < workers:
            raise ValueError(
                f"data.num_workers={workers} but the shard set has only {len(self.shards)} train "
                "shards; use fewer workers or write smaller shards"
            )
        sizes = sorted(s["samples"] for s in self.shards)
        per_worker = sum(sizes[: len(sizes) // workers]) // batch_size
        if per_worker == 0:
            raise ValueError(
                f"batch_size={batch_size} is larger than what one data worker's shards hold; "
                "lower batch_size or data.num_workers"
            )
        return per_worker

    def num_batches(self, batch_size: int, workers: int, world: int = 1) -> int:
        """Global batches (steps) per epoch. Under torchrun the epoch is dealt to ``workers`` x ``world``
        logical workers, and rank r plays those numbered r, r + world, r + 2 world, ..."""
        workers = max(workers, 1)
        return self._per_worker(batch_size, workers * world) * workers

    def loader(
        self, epoch: int, start_batch: int, batch_size: int, workers: int, collate, rank: int = 0, world: int = 1
    ) -> DataLoader:
        stream = _EpochStream(
            self, epoch, start_batch, batch_size, max(workers, 1), with_fault_point(collate), rank, world
        )
        return DataLoader(stream, batch_size=None, num_workers=workers)

    def worker_batches(
        self, epoch: int, logical: int, skip: int, count: int, batch_size: int, workers: int, collate
    ) -> Iterator[Any]:
        """Batches ``skip``..``count-1`` of one logical worker's stream."""
        if skip >= count:
            return
        pending, produced, to_skip = [], 0, skip * batch_size
        for shard in self._plan(epoch, workers)[logical]:
            size = self.shards[shard]["samples"]
            if to_skip >= size:  # a whole shard already consumed before the stop: not even read
                to_skip -= size
                continue
            samples = read_shard(self.store, self.shards[shard])
            order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, SHARD_STREAM, shard])).permutation(
                len(samples)
            )
            for i in order[to_skip:]:
                sample_id = self.offsets[shard] + int(i)
                rng = sample_rng(self.seed, epoch, sample_id, TRAIN_STREAM)
                pending.append({**_crop_pair(samples[i], self.segment_samples, rng), "index": torch.tensor(sample_id)})
                if len(pending) == batch_size:
                    yield collate(pending)
                    pending, produced = [], produced + 1
                    if skip + produced >= count:
                        return
            to_skip = 0


class _EpochStream(IterableDataset):
    """One epoch of one rank's batches from position ``start``: physical worker p plays the rank's slot
    s = (p+start) mod W, which is logical worker rank + s x world of the W x world the epoch is dealt to.
    One process with W x world workers reads batch k from logical worker k mod (W x world); rank r reads
    batches k x world + r, so the ranks of a step together read what that process reads in ``world`` steps."""

    def __init__(
        self,
        data: StreamingPairs,
        epoch: int,
        start: int,
        batch_size: int,
        workers: int,
        collate,
        rank: int = 0,
        world: int = 1,
    ):
        self.data, self.epoch, self.start, self.batch_size, self.workers = data, epoch, start, batch_size, workers
        self.collate, self.rank, self.world = collate, rank, world

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        w = self.workers
        logical_workers = w * self.world
        count = self.data._per_worker(self.batch_size, logical_workers)
        if info is None and w > 1:
            raise RuntimeError("StreamingPairs with several logical workers needs DataLoader workers")
        slot = (physical + self.start) % w
        skip = max(0, -(-(self.start - slot) // w))  # batches of this slot before `start`
        yield from self.data.worker_batches(
            self.epoch, self.rank + slot * self.world, skip, count, self.batch_size, logical_workers, self.collate
        )


class ShardPairs(Dataset):
    """A small split (validation) held in memory: fixed crops from the start of each sample."""

    def __init__(self, uri: str, manifest: dict[str, Any], split: str, segment_samples: int):
        store = ShardStore(uri)
        self.samples = [s for info in manifest["splits"][split]["shards"] for s in read_shard(store, info)]
        self.segment_samples = segment_samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index = key[1] if isinstance(key, tuple) else key
        return {**_crop_pair(self.samples[index], self.segment_samples, None), "index": torch.tensor(index)}
