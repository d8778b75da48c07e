"""What a served model (the ``speech-restoration`` chain, the speech recognizer) accepts in a request and
how it answers a bad one.

A request is a DataFrame with one row per recording: ``audio`` (float samples) with ``sample_rate``,
``audio_base64`` (a WAV or FLAC file, base64-encoded) or ``path`` (a file on the model's machine, only
where the model config says ``allow_paths``). Every row is checked before any is used; a refusal is a
RequestError, answered with HTTP 400 and one short message that never repeats the request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from scipy.signal import resample_poly

log = logging.getLogger(__name__)

MAX_SECONDS = 60.0  # longest audio one request may carry (model config max_seconds)
MIN_RATE, MAX_RATE = 8000, 192000  # the sample rates (Hz) a request may have
MAX_CHANNELS = 2  # channels of a file sent as audio_base64 (mixed down to one)
FILE_MAGIC = (b"RIFF", b"RF64", b"fLaC")  # how the WAV, RF64 and FLAC files audio_base64 takes begin
LONG_FILES = "restore long files with pipeline.restore"  # what a too-long request is told to do instead
SEND_AUDIO = (
    "send the audio itself: audio_base64 (a WAV or FLAC file, base64-encoded) or audio (float samples) with sample_rate"
)


class RequestError(MlflowException):
    """A request the model refuses: HTTP 400 (500 with ``internal=True``) whose body is this message alone.

    The scoring server of ``mlflow models serve`` puts the whole request in front of an MlflowException's
    message ("Failed to predict data '<request>'") and a stack trace into the answer to any other
    exception; this one serializes as its own message only, so an answer never repeats the request, a
    path on the server or a traceback."""

    def __init__(self, message: str, internal: bool = False):
        super().__init__(message, error_code=INTERNAL_ERROR if internal else INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """A mono waveform from ``rate`` to ``target`` Hz with a polyphase filter (scipy's ``resample_poly``).
    Its memory is the waveforms and a filter of 20 x max(rate, target) / gcd taps (3.8 M taps, 161 MB at its
    peak while it is designed, for 191999 Hz), where torchaudio's sinc kernel grows with the product of the
    reduced rates (4.1 GiB and 20 s for one second at 16001 Hz; the polyphase filter: 15 MB and 0.1 s)."""
    if rate == target:
        return wave
    g = math.gcd(rate, target)
    return torch.from_numpy(resample_poly(wave.numpy(), target // g, rate // g).astype(np.float32))


def _given(value) -> bool:
    """A request field that is there: not absent, None or NaN (what pandas fills in for a missing one)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _rate(value, row: int) -> int:
    """A sample rate that is a whole number of Hz in [MIN_RATE, MAX_RATE]; 16000.5 or "16k" is refused,
    not truncated into some rate silently."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not (number and math.isfinite(value) and float(value).is_integer() and MIN_RATE <= value <= MAX_RATE):
        raise RequestError(f"row {row}: sample_rate must be a whole number of Hz from {MIN_RATE} to {MAX_RATE}")
    return int(value)


def _check_length(row: int, samples: int, rate: int, max_seconds: float, long_files: str = LONG_FILES) -> None:
    if samples > max_seconds * rate:
        raise RequestError(
            f"row {row}: {samples / rate:.1f} s of audio is longer than this model's limit of "
            f"{max_seconds:g} s; send shorter pieces, or {long_files}"
        )


def _samples(row: int, audio, rate, max_seconds: float, long_files: str = LONG_FILES) -> tuple[np.ndarray, int]:
    """``audio``: one channel of float samples (a list; an array locally) at ``sample_rate``."""
    rate = _rate(rate, row)
    if isinstance(audio, (str, bytes)) or not hasattr(audio, "__len__"):
        raise RequestError(f"row {row}: audio must be a list of float samples (one channel)")
    _check_length(row, len(audio), rate, max_seconds, long_files)  # before anything is converted
    try:
        samples = np.asarray(audio, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError(f"row {row}: audio must be a list of float samples (one channel)") from None
    if samples.ndim != 1:
        raise RequestError(f"row {row}: audio must be one channel of samples (a flat list)")
    return samples, rate


def _file_bytes(row: int, value, max_seconds: float, long_files: str = LONG_FILES) -> tuple[np.ndarray, int]:
    """``audio_base64``: a WAV or FLAC file's bytes, base64-encoded (raw bytes locally), mixed down to one
    channel. The length is checked on the header and at most ``max_seconds`` (+1 frame) is decoded."""
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error
            raise RequestError(f"row {row}: audio_base64 is not valid base64") from None
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise RequestError(f"row {row}: audio_base64 must be a WAV or FLAC file's bytes, base64-encoded")
    if data[:4] not in FILE_MAGIC:
        raise RequestError(f"row {row}: audio_base64 is not a WAV or FLAC file")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = _rate(f.samplerate, row)
            if f.channels > MAX_CHANNELS:
                raise RequestError(f"row {row}: the file has {f.channels} channels; send at most {MAX_CHANNELS}")
            _check_length(row, f.frames, rate, max_seconds, long_files)
            frames = f.read(int(max_seconds * rate) + 1, dtype="float32", always_2d=True)
    except RequestError:
        raise
    except Exception:  # soundfile raises LibsndfileError, RuntimeError, TypeError
        raise RequestError(f"row {row}: audio_base64 is not a readable WAV or FLAC file") from None
    _check_length(row, len(frames), rate, max_seconds, long_files)  # a header that understates the length
    return frames.mean(axis=1), rate


def _file(row: int, value, allow_paths: bool) -> tuple[np.ndarray, int]:
    """``path``: an audio file on this machine, mixed down to one channel; only where the model config says
    ``allow_paths`` (local ``mlflow.pyfunc.load_model``), refused before the path is looked at otherwise."""
    from pipeline.data.audio import AudioError, read_channels

    if not allow_paths:
        raise RequestError(f"row {row}: this model does not read files on its machine; {SEND_AUDIO}")
    if not isinstance(value, (str, Path)) or not Path(value).is_file():  # a FIFO or a device would block
        raise RequestError(f"row {row}: path must name a regular audio file, got {value!r}")
    try:
        audio, rate = read_channels(value)
    except AudioError as err:
        raise RequestError(f"row {row}: {err}") from None
    return audio.mean(dim=0).numpy(), rate


@contextmanager
def answering(work: str):
    """Around a served model's work on one request: a RequestError is logged and answered as it is (4xx, its
    short message); any other failure is logged with its traceback here and answered 500 with one line, so
    that no trace, path or request data reaches the client."""
    try:
        yield
    except RequestError as err:
        log.warning("Refused a request: %s", err.reason)
        raise
    except Exception:
        log.exception("Failed to %s a request", work)
        raise RequestError(
            f"the model failed to {work} this request; the server's log says why", internal=True
        ) from None


def request_audio(
    model_input, max_seconds: float, allow_paths: bool = False, long_files: str = LONG_FILES
) -> list[tuple[torch.Tensor, int]]:
    """One channel of audio and its rate per row of a request: ``audio`` (float samples) with
    ``sample_rate``, ``audio_base64`` (a WAV or FLAC file), or ``path`` (only with ``allow_paths``).
    Every row is checked before any is used: RequestError says what is wrong with which row (``long_files``:
    what a too-long request is told to do instead)."""
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(
            model_input if all(isinstance(v, list) for v in model_input.values()) else [model_input]
        )
    if not isinstance(model_input, pd.DataFrame) or model_input.empty:
        raise RequestError(f"expected a DataFrame with one row per recording; {SEND_AUDIO}")
    out = []
    for i, row in enumerate(model_input.to_dict("records")):
        given = [key for key in ("audio", "audio_base64", "path") if _given(row.get(key))]
        if len(given) != 1:
            raise RequestError(
                f"row {i}: give exactly one of audio_base64 (a WAV or FLAC file, base64-encoded) or "
                "audio (float samples) with sample_rate"
            )
        if given == ["audio"]:
            samples, rate = _samples(i, row["audio"], row.get("sample_rate"), max_seconds, long_files)
        elif given == ["audio_base64"]:
            samples, rate = _file_bytes(i, row["audio_base64"], max_seconds, long_files)
        else:
            samples, rate = _file(i, row["path"], allow_paths)
            _rate(rate, i)
            _check_length(i, len(samples), rate, max_seconds, long_files)
        if samples.size == 0:
            raise RequestError(f"row {i}: audio is empty")
        if not np.isfinite(samples).all():
            raise RequestError(f"row {i}: audio contains NaN or infinite samples")
        out.append((torch.from_numpy(np.array(samples, dtype=np.float32)), rate))
    return out
