"""GE2E speaker encoder for speaker similarity, with Resemblyzer's pretrained weights.

Our own implementation of the speaker encoder of Resemblyzer 0.1.4 (``VoiceEncoder``, a GE2E
model after Wan et al., "Generalized End-to-End Loss for Speaker Verification", 2018):

- front end: 40-channel mel *power* spectrogram (not log) of 16 kHz audio, 25 ms periodic Hann
  window (n_fft 400), 10 ms hop, centred frames zero-padded at the edges, Slaney mel scale and
  Slaney area normalisation, 0-8 kHz, i.e. ``librosa.feature.melspectrogram`` with librosa 0.10+
  defaults, computed here with ``torch.stft`` and our own filterbank;
- network: LSTM(40, 256, 3 layers) -> last hidden state of the last layer -> Linear(256, 256) ->
  ReLU -> L2 normalisation;
- utterance embedding: the mel is cut into partial windows of 160 frames (1.6 s), 77 frames apart
  (1.3 partials per second), the wave zero-padded so the last window fits; a trailing window less
  than 75 % covered by the wave is dropped unless it is the only one. The partial embeddings are
  averaged and the mean re-normalised.

The weights are the ``pretrained.pt`` file shipped inside the ``resemblyzer`` package
(``pip install resemblyzer==0.1.4``), read with ``torch.load(weights_only=True)``; only the file is
used, Resemblyzer's modules are never imported (its audio module needs ``webrtcvad``).

What is not reproduced: Resemblyzer's ``preprocess_wav`` trims long silences with webrtcvad's
voice-activity detector and resamples with librosa; neither is done here (callers pass 16 kHz
audio). Its volume normalisation (raise quiet audio to -30 dBFS, never lower it) is reproduced
faithfully by :func:`normalize_volume` and is opt-in through ``volume_norm=True``.

Reference: with ``volume_norm=False`` (the default), :func:`embed` equals
``resemblyzer.VoiceEncoder.embed_utterance(wav)`` on the same float32 16 kHz array (not passed
through ``preprocess_wav``) within 1e-5 per component, and :func:`mel_spectrogram` equals
``resemblyzer.audio.wav_to_mel_spectrogram`` within 1e-5 of the spectrogram's peak (measured 2e-7)
(tests/unit/models/test_speaker_encoder.py checks both with every parameter randomised).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms step
N_MELS = 40
HIDDEN_SIZE = 256
EMBEDDING_SIZE = 256
NUM_LAYERS = 3
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
PARTIALS_PER_SECOND = 1.3
MIN_COVERAGE = 0.75
# speaker_similarity scores only waves that fill one partial window to MIN_COVERAGE (1.2 s)
MIN_SAMPLES = int(MIN_COVERAGE * PARTIAL_FRAMES * HOP_LENGTH)
# a wave whose peak stays below -80 dBFS counts as silent
SILENCE_PEAK = 1e-4
VOLUME_TARGET_DBFS = -30.0
RESEMBLYZER_REQUIREMENT = "resemblyzer==0.1.4"

WaveLike = np.ndarray | torch.Tensor


class SpeakerEncoderError(RuntimeError):
    """Resemblyzer's pretrained weights cannot be found or loaded."""


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    mel = hz / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    log_region = hz >= min_log_hz
    mel[log_region] = min_log_mel + np.log(hz[log_region] / min_log_hz) / logstep
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    hz = mel * f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    log_region = mel >= min_log_mel
    hz[log_region] = min_log_hz * np.exp(logstep * (mel[log_region] - min_log_mel))
    return hz


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular Slaney-scale filters, area-normalised, 0 Hz to Nyquist: (n_mels, n_fft // 2 + 1)."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    top = _hz_to_mel(np.array([sample_rate / 2]))[0]
    edges = _mel_to_hz(np.linspace(0.0, top, n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def _as_wave(wave: WaveLike) -> torch.Tensor:
    """A mono wave as a 1-D float32 tensor; a (1, samples) array is accepted as mono."""
    tensor = wave if isinstance(wave, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(wave))
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise ValueError(f"expected a mono wave (samples,), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"expected a float wave, got dtype {tensor.dtype}")
    return tensor.to(torch.float32)


def normalize_volume(
    wave: WaveLike, target_dbfs: float = VOLUME_TARGET_DBFS, increase_only: bool = True
) -> torch.Tensor:
    """Scale a wave to ``target_dbfs`` RMS (Resemblyzer's ``normalize_volume``, increase only by default).

    A silent wave is returned unchanged (Resemblyzer's would turn it into NaN).
    """
    tensor = _as_wave(wave)
    rms = float(torch.sqrt(torch.mean(tensor.double() ** 2))) if tensor.numel() else 0.0
    if rms == 0.0:
        return tensor
    change_db = target_dbfs - 20 * math.log10(rms)
    if change_db < 0 and increase_only:
        return tensor
    return tensor * float(10 ** (change_db / 20))


def partial_slices(
    n_samples: int, rate: float = PARTIALS_PER_SECOND, min_coverage: float = MIN_COVERAGE
) -> list[slice]:
    """Mel-frame windows of the partial utterances of a wave of ``n_samples`` (at least one).

    Multiply a window's bounds by :data:`HOP_LENGTH` for its samples; the last may reach past the
    wave, which is then zero-padded. Same arithmetic as Resemblyzer's ``compute_partial_slices``.
    """
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage={min_coverage} must be in (0, 1]")
    n_frames = int(np.ceil((n_samples + 1) / HOP_LENGTH))
    frame_step = int(np.round((SAMPLE_RATE / rate) / HOP_LENGTH))
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise ValueError(
            f"rate={rate} partials per second gives a step of {frame_step} frames; "
            f"it must be between 1 and {PARTIAL_FRAMES}"
        )
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    slices = [slice(start, start + PARTIAL_FRAMES) for start in range(0, steps, frame_step)]
    last = slices[-1]
    coverage = (n_samples - last.start * HOP_LENGTH) / (PARTIAL_FRAMES * HOP_LENGTH)
    if coverage < min_coverage and len(slices) > 1:
        slices.pop()
    return slices


class SpeakerEncoder(nn.Module):
    """GE2E speaker encoder: mel partials -> 3-layer LSTM -> linear -> ReLU -> unit vector.

    Parameter names match Resemblyzer's ``VoiceEncoder`` (``lstm.*``, ``linear.*``). The mel
    filterbank and window are non-persistent buffers, so they follow ``.to(device)`` but stay out
    of the state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN_SIZE, NUM_LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN_SIZE, EMBEDDING_SIZE)
        self.relu = nn.ReLU()
        self.register_buffer("mel_basis", torch.from_numpy(mel_filterbank()), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """Embeddings (batch, 256) of mel windows (batch, frames, 40), each L2-normalised."""
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        return raw / torch.norm(raw, dim=1, keepdim=True)

    def mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Mel power spectrogram (frames, 40) of a 1-D 16 kHz wave; frames = 1 + samples // 160."""
        spec = torch.stft(
            wave,
            N_FFT,
            hop_length=HOP_LENGTH,
            win_length=N_FFT,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        power = spec.real**2 + spec.imag**2
        return (self.mel_basis @ power).T


def mel_spectrogram(encoder: SpeakerEncoder, wave: WaveLike) -> torch.Tensor:
    """The encoder's front end on a mono 16 kHz wave: (frames, 40) on the encoder's device."""
    return encoder.mel(_as_wave(wave).to(encoder.mel_basis.device))


def _weights_path() -> Path:
    """Resemblyzer's packaged ``pretrained.pt``, located without importing the package."""
    try:
        spec = importlib.util.find_spec("resemblyzer")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SpeakerEncoderError(
            "the speaker encoder's weights come with the resemblyzer package, which is not installed: "
            f"pip install {RESEMBLYZER_REQUIREMENT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained.pt"
    if not path.is_file():
        raise SpeakerEncoderError(f"{path} is missing: reinstall with pip install {RESEMBLYZER_REQUIREMENT}")
    return path


def _packaged_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``lstm.*`` and ``linear.*`` tensors of Resemblyzer's checkpoint, on CPU."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise SpeakerEncoderError(
            f"cannot read {path} ({err}); reinstall with pip install {RESEMBLYZER_REQUIREMENT}"
        ) from err
    state = checkpoint.get("model_state") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise SpeakerEncoderError(f"{path} has no 'model_state'; expected {RESEMBLYZER_REQUIREMENT}'s file")
    return {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}


def load_speaker_encoder(device: str | torch.device = "cpu") -> SpeakerEncoder:
    """Resemblyzer's pretrained GE2E weights in a :class:`SpeakerEncoder`, eval mode, gradients off."""
    path = _weights_path()
    state = _packaged_state(path)
    encoder = SpeakerEncoder()
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SpeakerEncoderError(
            f"{path} does not fit the encoder ({err}); expected {RESEMBLYZER_REQUIREMENT}'s file"
        ) from err
    encoder.requires_grad_(False)
    log.debug("speaker encoder loaded from %s on %s", path, device)
    return encoder.eval().to(device)


@torch.no_grad()
def embed_many(
    encoder: SpeakerEncoder,
    waves: Sequence[WaveLike],
    *,
    volume_norm: bool = False,
    rate: float = PARTIALS_PER_SECOND,
    min_coverage: float = MIN_COVERAGE,
    max_partials: int = 256,
) -> torch.Tensor:
    """Utterance embeddings (len(waves), 256) of mono 16 kHz waves, on the encoder's device.

    All partial windows of all waves go through the LSTM together, ``max_partials`` at a time.
    """
    device = encoder.mel_basis.device
    windows: list[torch.Tensor] = []
    counts: list[int] = []
    for wave in waves:
        tensor = _as_wave(wave)
        if volume_norm:
            tensor = normalize_volume(tensor)
        slices = partial_slices(len(tensor), rate, min_coverage)
        needed = slices[-1].stop * HOP_LENGTH
        tensor = tensor.to(device)
        if needed >= len(tensor):
            tensor = nn.functional.pad(tensor, (0, needed - len(tensor)))
        mel = encoder.mel(tensor)
        windows.extend(mel[s] for s in slices)
        counts.append(len(slices))
    if not windows:
        return torch.empty(0, EMBEDDING_SIZE, device=device)
    stacked = torch.stack(windows)
    partials = torch.cat([encoder(stacked[i : i + max_partials]) for i in range(0, len(stacked), max_partials)])
    means = torch.stack([chunk.mean(dim=0) for chunk in partials.split(counts)])
    return means / torch.norm(means, dim=1, keepdim=True)


def embed(
    encoder: SpeakerEncoder,
    wave: WaveLike,
    *,
    volume_norm: bool = False,
    rate: float = PARTIALS_PER_SECOND,
    min_coverage: float = MIN_COVERAGE,
) -> torch.Tensor:
    """Utterance embedding (256,) of a mono 16 kHz wave, unit length, on the encoder's device.

    With the defaults this is Resemblyzer's ``embed_utterance(wave)``.
    """
    return embed_many(encoder, [wave], volume_norm=volume_norm, rate=rate, min_coverage=min_coverage)[0]


def _unusable(wave: WaveLike) -> str | None:
    """Why a wave cannot be scored, or None."""
    try:
        tensor = _as_wave(wave)
    except (ValueError, TypeError, RuntimeError) as err:
        return str(err)
    if len(tensor) < MIN_SAMPLES:
        return f"{len(tensor)} samples, fewer than the {MIN_SAMPLES} one partial window needs"
    if not bool(torch.isfinite(tensor).all()):
        return "non-finite samples"
    if float(tensor.abs().max()) < SILENCE_PEAK:
        return "silent"
    return None


def speaker_similarity(encoder: SpeakerEncoder, a: WaveLike, b: WaveLike, *, volume_norm: bool = False) -> float:
    """Cosine similarity of the speaker embeddings of two mono 16 kHz waves, in [-1, 1].

    NaN, never an exception, when either wave cannot be scored: not mono, non-finite, shorter
    than :data:`MIN_SAMPLES` (1.2 s) or silent (peak below :data:`SILENCE_PEAK`).
    """
    for name, wave in (("a", a), ("b", b)):
        reason = _unusable(wave)
        if reason is not None:
            log.debug("speaker similarity is NaN: wave %s is unusable (%s)", name, reason)
            return float("nan")
    pair = embed_many(encoder, [a, b], volume_norm=volume_norm)
    return float(torch.dot(pair[0].double(), pair[1].double()))
