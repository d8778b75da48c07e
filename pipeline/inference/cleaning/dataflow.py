"""The Ray Data pipeline of ``clean_corpus``: read -> decode -> restore (actor pool) -> score -> write.

- **decode** (CPU tasks, ``flat_map``): a unit (a file, or a shard read once) becomes rows with the audio of
  every channel at the encoder's rate; an unusable input becomes a row with its status and no audio.
- **restore** (``Restorer``, an actor pool: one chain per actor, ``num_gpus=1`` each on GPU machines): the
  chunks of every channel of a batch of files are restored together (``pipeline/inference/batched.py``).
- **score** (``Scorer``, CPU actors): DNSMOS P.835 of the restored and of the input audio, and the speaker
  similarity of the two (``pipeline/models/speaker_encoder.py``), all at 16 kHz.
- **write** (CPU tasks): the restored audio as WAV or FLAC, written whole or not at all
  (``sources.write_atomic``); the row that leaves this stage is the file's manifest row.

Audio travels between stages as float32 bytes with its shape in ``channels`` and ``samples``, so a batch is a
plain table whatever the lengths. Ray retries a task or restarts an actor lost with its worker.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.common import faults
from pipeline.common.files import UnsafePath, contained
from pipeline.inference.cleaning.sources import is_transient, join, read_bytes, write_atomic

log = logging.getLogger(__name__)

SCORE_RATE = 16000  # DNSMOS and the speaker encoder
SCORES = (
    "dnsmos_sig",
    "dnsmos_bak",
    "dnsmos_ovrl",
    "input_dnsmos_sig",
    "input_dnsmos_bak",
    "input_dnsmos_ovrl",
    "speaker_similarity",
)
OK = ""  # the status of a row still on its way; a final status is restored, skipped: ..., failed: ... or RETRYABLE ...
RETRYABLE = "failed (retryable): "  # a passing failure (storage, network, memory): a resume does the input again
OUTPUT_EXISTS = "skipped: output exists (overwrite=true replaces it)"  # it was there before the job started
STORAGE_FULL = RETRYABLE + "output storage full: "  # the job stops taking new work at the first one
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def read_failure(err: OSError) -> str:
    """The status of an input that could not be read: final when the input is missing or forbidden, retryable
    when the storage or network failed (EIO, a stale NFS handle, an S3 time-out or 5xx)."""
    return f"{RETRYABLE}cannot read: {err}" if is_transient(err) else f"skipped: missing: {err}"


def write_failure(target: str, err: OSError) -> str:
    """The status of a restored file that could not be written: always retryable (the input was fine), and
    ``STORAGE_FULL`` when no more can be written (no space, quota, read-only file system)."""
    prefix = STORAGE_FULL if err.errno in FULL_ERRNOS else RETRYABLE
    return f"{prefix}cannot write {target}: {err}"


def _row(unit: dict, item_id: str, source: str, output: str) -> dict:
    return {
        "id": item_id,
        "source": source,
        "output": output,
        "status": OK,
        "seconds": 0.0,
        "input_rate": 0,
        "input_channels": 0,
        "samples": 0,
        "audio": b"",
    }


def _with_audio(row: dict, audio: torch.Tensor, rate: int, rate_in: int) -> dict:
    from pipeline.inference.requests import resample

    channels = torch.stack([resample(c.float(), rate, rate_in) for c in audio])
    row.update(
        seconds=audio.shape[-1] / rate,
        input_rate=rate,
        input_channels=int(audio.shape[0]),
        samples=int(channels.shape[-1]),
        audio=channels.contiguous().numpy().tobytes(),
    )
    return row


def decode(unit: dict, rate_in: int, suffix: str) -> list[dict]:
    """The rows of one unit, with every channel's audio at ``rate_in``."""
    from pipeline.data.audio import AudioError, decode_channels

    if unit["kind"] == "shard":
        return _decode_shard(unit, rate_in, suffix)
    row = _row(unit, unit["id"], unit["source"], unit["output"])
    try:
        audio, rate = decode_channels(read_bytes(unit["source"]), unit["source"])
    except AudioError as err:
        return [dict(row, status=f"skipped: {err.reason}: {err}")]
    except OSError as err:
        return [dict(row, status=read_failure(err))]
    return [_with_audio(row, audio, rate, rate_in)]


def _decode_shard(unit: dict, rate_in: int, suffix: str) -> list[dict]:
    from pipeline.data.shards import ShardError, ShardStore, read_shard

    stem = unit["id"].removesuffix(".tar")
    skip, protected = set(unit.get("skip") or ()), set(unit.get("protected") or ())
    try:
        samples = read_shard(ShardStore(unit["source"]), {"name": unit["id"], "sha256": unit["sha256"]})
    except ShardError as err:
        status = f"{RETRYABLE}{err}" if err.__cause__ and is_transient(err.__cause__) else f"failed: {err}"
        return [dict(_row(unit, stem, join(unit["source"], unit["id"]), ""), status=status)]
    rows = []
    for sample in samples:
        item_id = f"{stem}/{sample['key']}"
        if item_id in skip:
            continue
        row = _row(unit, item_id, f"{join(unit['source'], unit['id'])}#{sample['key']}.noisy.wav", item_id + suffix)
        if row["output"] in protected:
            rows.append(dict(row, status=OUTPUT_EXISTS))
            continue
        rows.append(_with_audio(row, sample["noisy"][None], int(sample["meta"]["sample_rate"]), rate_in))
    return rows


def _audio(row, column: str = "audio") -> np.ndarray:
    return np.frombuffer(row[column], dtype=np.float32).reshape(int(row["input_channels"]), -1)


class Restorer:
    """One restoration chain, loaded once; restores a batch of rows at a time. ``options``: device and precision
    (decided once by the entry point), chunking, ``batch_size`` windows per forward pass, torch ``threads``."""

    def __init__(self, checkpoints: list, options: dict):
        import ray

        from pipeline.engine.stage import Precision
        from pipeline.inference.chain import RestorationChain

        files = ray.get(checkpoints[0])  # {"adapter/<name>": bytes, "vocoder/<name>": bytes}
        threads = int(options.get("threads") or 0)
        if threads:
            torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory(prefix="clean-corpus-chain-") as tmp:  # read whole by from_checkpoints
            for name, data in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            self.chain = RestorationChain.from_checkpoints(
                Path(tmp) / "adapter",
                Path(tmp) / "vocoder",
                Precision.from_config(options["device"], options["precision"]),
                ssl_weights=options.get("ssl_weights") or None,
                chunk_seconds=options["chunk_seconds"],
                context_seconds=options["context_seconds"],
                fade_seconds=options["fade_seconds"],
            )
        self.max_batch = int(options["batch_size"])
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _restore(self, rows: list) -> tuple[list[np.ndarray], float]:
        from pipeline.inference.batched import restore_many

        waves = [torch.from_numpy(channel.copy()) for row in rows for channel in _audio(row)]
        start = time.perf_counter()
        restored = restore_many(self.chain, waves, self.max_batch)
        seconds = time.perf_counter() - start
        out, i = [], 0
        for row in rows:
            n = int(row["input_channels"])
            out.append(torch.stack(restored[i : i + n]).numpy().astype(np.float32))
            i += n
        return out, seconds

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True)
        batch["restored"], batch["restore_seconds"] = [b""] * len(batch), 0.0
        batch["output_rate"], batch["worker"] = self.chain.rate_out, self.worker
        todo = [i for i in range(len(batch)) if batch.at[i, "status"] == OK]
        rows = [batch.iloc[i] for i in todo]
        faults.point("clean.restore")  # a batch in hand (tests/e2e/test_clean_corpus_faults.py)
        try:
            results = [(todo, *self._restore(rows))] if rows else []
        except Exception:  # find the rows that fail: restore them one by one
            results = []
            for i, row in zip(todo, rows):
                try:
                    results.append(([i], *self._restore([row])))
                except Exception as err:  # out of memory may pass with fewer files at once; else it is final
                    retry = RETRYABLE if isinstance(err, (MemoryError, torch.OutOfMemoryError)) else "failed: "
                    batch.at[i, "status"] = f"{retry}{type(err).__name__}: {str(err)[:300]}"
        for indices, restored, seconds in results:
            total = sum(float(batch.at[i, "seconds"]) for i in indices) or 1.0
            for i, audio in zip(indices, restored):
                batch.at[i, "restored"] = audio.tobytes()
                batch.at[i, "restore_seconds"] = seconds * float(batch.at[i, "seconds"]) / total
        return batch


def _mono_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    from pipeline.inference.requests import resample

    return resample(torch.from_numpy(audio.mean(axis=0)), rate, SCORE_RATE).numpy()


class Scorer:
    """The quality columns of a batch: DNSMOS of the restored and the input audio, speaker similarity."""

    def __init__(self, enabled: bool, rate_in: int):
        self.enabled, self.rate_in = enabled, rate_in
        if enabled:
            from pipeline.models.speaker_encoder import load_speaker_encoder

            self.speaker = load_speaker_encoder()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from pipeline.inference.metrics import dnsmos
        from pipeline.models.speaker_encoder import speaker_similarity

        batch = batch.reset_index(drop=True)
        for name in SCORES:
            batch[name] = np.nan
        for i in range(len(batch)):
            if not self.enabled or batch.at[i, "status"] != OK:
                continue
            row = batch.iloc[i]
            source = _mono_16k(_audio(row), self.rate_in)
            restored = _mono_16k(_audio(row, "restored"), int(row["output_rate"]))
            scores = {
                **dnsmos(restored),
                **{f"input_{k}": v for k, v in dnsmos(source).items()},
                "speaker_similarity": speaker_similarity(self.speaker, source, restored, volume_norm=True),
            }
            for name, value in scores.items():
                batch.at[i, name] = value
        return batch.drop(columns=["audio"])


def write(batch: pd.DataFrame, output: str, file_format: str, subtype: str) -> pd.DataFrame:
    """Write each restored row's audio under ``output``; the rows, without audio, as manifest rows. Every
    output reaching this stage is the job's own (an output that existed before the job is skipped when read),
    so it is replaced whole; a name that would land outside ``output`` is skipped."""
    import soundfile as sf

    batch = batch.reset_index(drop=True)
    for i in range(len(batch)):
        name = batch.at[i, "output"]
        batch.at[i, "output"] = ""  # until the file is written
        if batch.at[i, "status"] != OK:
            continue
        try:
            target = contained(output, name)
        except UnsafePath as err:
            batch.at[i, "status"] = f"skipped: unsafe output name: {err}"
            continue
        audio = _audio(batch.iloc[i], "restored")
        data = io.BytesIO()
        sf.write(data, audio.T, int(batch.at[i, "output_rate"]), subtype=subtype, format=file_format.upper())
        try:
            write_atomic(target, data.getvalue())
        except OSError as err:
            batch.at[i, "status"] = write_failure(target, err)
            continue
        batch.at[i, "status"], batch.at[i, "output"] = "restored", target
    return batch.drop(columns=["restored", "samples"])
