"""The trained restoration chain: degraded audio -> encoder with trained adapters -> HiFi-GAN -> clean audio.

A chain is two verified checkpoints: a finetune_vocoder checkpoint (the generator, and in its
``model_args`` the encoder preset, adapter and vocoder settings) and the train_adapter checkpoint it
was fine-tuned on (pinned in its ``inputs`` as ``adapter_run`` and ``adapter_step``), found in a run or a
model (pipeline/inference/chain_checkpoints.py; ``resolve_chain``) and loaded (``load_chain``). ``restore``,
``evaluate`` and the ``speech-restoration`` MLflow model all load a chain this way.

Long audio is restored in chunks so memory stays bounded: each chunk of ``chunk_seconds`` is run with
``context_seconds`` of audio on both sides (the encoder attends over its whole input, so a chunk sees
what surrounds it) and neighbouring chunks are cross-faded over ``fade_seconds``. Only one chunk's
features exist at a time; the input and the output waveforms are held whole.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.config import AdapterConfig, EncoderConfig, VocoderConfig
from pipeline.engine.checkpoint_files import CheckpointError, verify
from pipeline.engine.checkpoint_migrate import read_state
from pipeline.engine.stage import Precision
from pipeline.inference.chain_checkpoints import (
    ADAPTER_STAGE,
    CHAIN_STAGE,
    VOCODER_STAGE,
    ChainCheckpoints,
    chain_from_model,
    chain_from_run,
    verify_stage,
)
from pipeline.inference.requests import MAX_SECONDS, answering, request_audio, resample
from pipeline.models.adapters import build_adapted_encoder
from pipeline.models.encoder import LOGMEL, encoder_geometry, window
from pipeline.models.hifigan import build_generator


@dataclass(frozen=True)
class Chunk:
    """One run of the chain in a restoration (``RestorationChain.plan_chunks``): the input window it sees and
    the part of its output that goes into the restored wave, with the cross-fade ramps at that part's ends."""

    start: int  # the window's first input sample (negative, or past the wave's end: zeros there)
    length: int  # input samples in the window, at the encoder rate
    frames: int  # encoder frames of the window: its output is frames x hop_out samples
    keep: tuple[int, int]  # [from, to) of the window's output samples that this chunk contributes
    offset: int  # where the kept samples go in the restored wave
    fade_in: int  # samples of the rising ramp at the start of the kept part (0: none)
    fade_out: int  # samples of the falling ramp at its end (0: none)

    def weights(self) -> torch.Tensor:
        """The weight of each kept sample in the overlap-add: 1, with linear ramps over the fades."""
        weight = torch.ones(self.keep[1] - self.keep[0])
        if self.fade_in:
            weight[: self.fade_in] = _ramp(self.fade_in)
        if self.fade_out:
            weight[-self.fade_out :] = 1.0 - _ramp(self.fade_out)
        return weight


def _ramp(samples: int) -> torch.Tensor:
    return (torch.arange(samples, dtype=torch.float32) + 0.5) / samples


def assemble(pieces: Iterable[torch.Tensor], plan: list[Chunk], length: int) -> torch.Tensor:
    """Overlap-add the chain's outputs of ``plan``'s chunks (in plan order) into a wave of ``length`` samples."""
    out = torch.zeros(max(c.offset + c.keep[1] - c.keep[0] for c in plan))
    for chunk, piece in zip(plan, pieces, strict=True):
        kept = piece[chunk.keep[0] : chunk.keep[1]]
        out[chunk.offset : chunk.offset + kept.numel()] += kept * chunk.weights()
    return out[:length]


class RestorationChain:
    """The chain, rebuilt from its checkpoints on one device, ready to restore waveforms."""

    def __init__(
        self,
        ssl,
        adapter,
        vocoder,
        precision: Precision | None = None,
        chunk_seconds: float = 10.0,
        context_seconds: float = 1.0,
        fade_seconds: float = 0.5,
    ):
        """A chain of ``ssl`` (EncoderConfig), ``adapter`` (AdapterConfig) and ``vocoder`` (VocoderConfig) with
        freshly initialised adapters and generator: ``from_checkpoints`` loads trained ones."""
        self.precision = precision or Precision.from_config("cpu", "32")
        self.device = self.precision.device
        self.adapted = build_adapted_encoder(ssl, adapter)
        self.generator = build_generator(ssl.embed_dim, vocoder)
        self.adapted.to(self.device).eval().requires_grad_(False)
        self.generator.to(self.device).eval().requires_grad_(False)
        self.has_adapters = True  # False: a vocoder-only chain (copy synthesis only)
        cleaner = "feature cleaner" if ssl.family == LOGMEL else "parallel adapters"
        # what the chain is made of, in words (evaluation and registry descriptions)
        self.architecture = (
            f"front end `{ssl.name}` ({ssl.family}, layer {ssl.layer}) with {cleaner}, vocoder `{vocoder.name}` "
            f"({vocoder.generator})"
        )
        self.adapters_on = True
        self.rate_in, self.rate_out = int(ssl.sample_rate), int(vocoder.sample_rate)
        self.hop_in, receptive = encoder_geometry(ssl)
        self.hop_out = self.generator.hop
        extra = receptive - self.hop_in
        self.context = (extra // 2, extra - extra // 2)
        frame_rate = self.rate_in / self.hop_in
        self.chunk_frames = max(int(round(chunk_seconds * frame_rate)), 0)  # 0: the whole file at once
        self.fade_frames = max(int(round(fade_seconds * frame_rate)), 1)
        self.context_frames = max(int(round(context_seconds * frame_rate)), self.fade_frames)
        if self.chunk_frames and self.chunk_frames < self.fade_frames:
            raise ValueError(f"chunk_seconds={chunk_seconds} must be at least fade_seconds={fade_seconds}")

    @classmethod
    def from_checkpoints(
        cls,
        adapter_dir: Path | None,
        vocoder_dir: Path,
        precision: Precision | None = None,
        ssl_weights: str | None = None,
        **options,
    ) -> RestorationChain:
        """The chain of a verified finetune_vocoder checkpoint and the train_adapter checkpoint it was
        fine-tuned on (weights loaded with ``weights_only=True``); ``options`` are the chunking settings.
        ``adapter_dir=None`` with a pretrain_vocoder checkpoint: a vocoder-only chain, for copy synthesis."""
        vocoder_meta = verify_stage(vocoder_dir, CHAIN_STAGE if adapter_dir is not None else VOCODER_STAGE)
        adapter_meta = verify_stage(adapter_dir, ADAPTER_STAGE) if adapter_dir is not None else None
        args = vocoder_meta["model_args"]
        ssl = OmegaConf.merge(OmegaConf.structured(EncoderConfig), args["ssl"])
        if ssl_weights:
            ssl.weights = ssl_weights
        if ssl.weights and not Path(ssl.weights).expanduser().exists():
            raise CheckpointError(
                f"The chain's encoder weights {ssl.weights} are not on this machine; give "
                "ssl_weights=<the same encoder's Hugging Face directory or state dict>"
            )
        if adapter_meta is not None:
            trained = adapter_meta["model_args"]["ssl"]
            if (trained["name"], trained["layer"]) != (ssl.name, ssl.layer):
                raise CheckpointError(
                    f"The adapter checkpoint {adapter_dir} was trained on encoder {trained['name']} "
                    f"layer {trained['layer']}, the vocoder on {ssl.name} layer {ssl.layer}"
                )
        chain = cls(
            ssl,
            OmegaConf.merge(OmegaConf.structured(AdapterConfig), args.get("adapter", {})),
            OmegaConf.merge(OmegaConf.structured(VocoderConfig), args["vocoder"]),
            precision,
            **options,
        )
        if adapter_dir is not None:
            adapter_state = read_state(adapter_dir, adapter_meta)["modules"]
            for key, module in chain.adapted.trainable_modules().items():
                module.load_state_dict(adapter_state[key])
        else:
            chain.has_adapters = False
        chain.generator.load_state_dict(read_state(vocoder_dir, vocoder_meta)["modules"]["generator"])
        return chain

    def plan_chunks(self, num_samples: int) -> list[Chunk]:
        """How ``restore_mono`` cuts a wave of ``num_samples`` (at the encoder rate): the chunks it runs, in
        order. One chunk (no fades) when the wave fits in ``chunk_seconds`` or ``chunk_seconds`` is 0."""
        frames = max(math.ceil(num_samples / self.hop_in), 1)
        chunk = self.chunk_frames or frames
        fade, context = self.fade_frames, self.context_frames
        starts = list(range(0, frames, chunk))
        if len(starts) > 1 and frames - starts[-1] < fade:  # a last chunk under the fade joins the one before
            starts.pop()
        plan = []
        for a, b in zip(starts, starts[1:] + [frames]):
            lo, hi = max(a - context, 0), min(b + context, frames)  # what the chain sees
            keep_lo = a - fade // 2 if a > 0 else 0  # what this chunk contributes, ramps included
            keep_hi = b + fade - fade // 2 if b < frames else frames
            plan.append(
                Chunk(
                    start=lo * self.hop_in - self.context[0],
                    length=(hi - lo) * self.hop_in + sum(self.context),
                    frames=hi - lo,
                    keep=((keep_lo - lo) * self.hop_out, (keep_hi - lo) * self.hop_out),
                    offset=keep_lo * self.hop_out,
                    fade_in=fade * self.hop_out if a > 0 else 0,
                    fade_out=fade * self.hop_out if b < frames else 0,
                )
            )
        return plan

    def output_length(self, num_samples: int) -> int:
        """Samples at ``rate_out`` of the restoration of ``num_samples`` at ``rate_in`` (the same duration)."""
        return int(round(num_samples * self.rate_out / self.rate_in))

    def features(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The generator's input for (batch, samples) ``waves`` on the chain's device: adapted features, or the
        frozen encoder's with the adapters off; ``lengths``: valid samples per item of a zero-padded batch."""
        if self.adapters_on:
            if not self.has_adapters:
                raise ValueError(
                    "This chain has no adapters (a pretrain_vocoder checkpoint): it can only copy-synthesise "
                    "clean speech; restore with a finetune_vocoder run or its model"
                )
            return self.adapted(waves, lengths)
        return self.adapted.target_features(waves, lengths)

    @torch.no_grad()
    def _piece(self, x: torch.Tensor) -> torch.Tensor:
        """The chain's output samples for one chunk's input window ``x`` (mono, at the encoder rate)."""
        with self.precision.autocast():
            out = self.generator(self.features(x[None].to(self.device)))
        return out[0].float().cpu()

    def copy_synthesis(self, wave: torch.Tensor, rate: int) -> torch.Tensor:
        """The vocoder on the frozen encoder's features of ``wave`` (adapters off): for clean speech, the
        ceiling of the chain, what the vocoder alone loses."""
        self.adapters_on = False
        try:
            return self.restore(wave, rate)
        finally:
            self.adapters_on = True

    def restore_mono(self, wave: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """A mono waveform at the encoder rate -> the restored waveform at the vocoder rate (same duration);
        ``pipeline.inference.batched.restore_many`` restores many waves together, with the same result."""
        plan = self.plan_chunks(wave.numel())
        chunks = tqdm(plan, desc="chunks", unit="chunk", leave=False, disable=not progress or len(plan) == 1)
        pieces = (self._piece(window(wave, c.start, c.length)) for c in chunks)  # one chunk's output at a time
        return assemble(pieces, plan, self.output_length(wave.numel()))

    def restore(self, audio: torch.Tensor, rate: int, progress: bool = False) -> torch.Tensor:
        """(samples,) or (channels, samples) at ``rate`` -> the same shape's restoration at ``rate_out``;
        each channel is restored on its own."""
        channels = audio[None] if audio.dim() == 1 else audio
        restored = []
        for channel in channels:
            channel = resample(channel.float(), rate, self.rate_in)
            restored.append(self.restore_mono(channel, progress))
        out = torch.stack(restored)
        return out[0] if audio.dim() == 1 else out


def load_chain(source: ChainCheckpoints, precision: Precision | None = None, **options) -> RestorationChain:
    return RestorationChain.from_checkpoints(source.adapter_dir, source.vocoder_dir, precision, **options)


def resolve_chain(
    client: MlflowClient,
    run_id: str | None,
    model_uri: str | None,
    which: str | int,
    workdir: Path,
    vocoder_only: bool = False,
) -> ChainCheckpoints:
    """A chain from a finetune_vocoder run or from a model URI (exactly one of them), its checkpoints
    downloaded into ``workdir``. The caller owns ``workdir``: ``load_chain`` reads the checkpoints whole, so it
    can be removed once the chain is loaded."""
    if run_id:
        return chain_from_run(client, run_id, workdir, which, vocoder_only)
    return chain_from_model(model_uri, workdir)


def as_numpy(wave: torch.Tensor) -> np.ndarray:
    """(channels, samples) or (samples,) -> what soundfile writes: (samples,) or (samples, channels)."""
    return wave.numpy() if wave.dim() == 1 else wave.T.contiguous().numpy()


# --------------------------------------------------------------------------------------------
# The chain as an MLflow model (models from code: pipeline/inference/chain_pyfunc.py)
# --------------------------------------------------------------------------------------------

MODEL_NAME = "speech-restoration"  # the Model Registry name main registers chains under


class ChainModel(mlflow.pyfunc.PythonModel):
    """The ``model/`` of a finetune_vocoder run and the ``speech-restoration`` registered model.

    Input: a DataFrame with, per row, ``audio_base64`` (a WAV or FLAC file's bytes, base64-encoded; mono or
    stereo, mixed down) or ``audio`` (a list of float samples, one channel) with ``sample_rate`` (Hz). Output:
    a DataFrame with ``audio`` (the restored samples, one channel) and ``sample_rate`` (the vocoder's rate).
    ``path`` (an audio file on this machine) is read only where the model config says ``allow_paths``:
    ``mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})``; a served model refuses it.
    A bad request (not audio, empty, NaN, longer than ``max_seconds``, a sample rate that is not a whole
    number from 8 to 192 kHz) is answered with 400 and one short message; requests are restored one at a
    time. The weights are two verified checkpoints loaded with ``weights_only=True``; device ``cpu`` unless
    the model config says otherwise.
    """

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.max_seconds = float(config.get("max_seconds", MAX_SECONDS))
        self.allow_paths = config.get("allow_paths") is True  # only a real true: "false" is not
        self.lock = threading.Lock()  # one request's audio in the chain at a time: memory of one request
        precision = Precision.from_config(str(config.get("device", "cpu")), str(config.get("precision", "32")))
        self.chain = RestorationChain.from_checkpoints(
            Path(context.artifacts["adapter"]),
            Path(context.artifacts["vocoder"]),
            precision,
            ssl_weights=config.get("ssl_weights") or None,
            chunk_seconds=float(config.get("chunk_seconds", 10.0)),
        )

    def predict(self, context, model_input: pd.DataFrame, params=None):  # annotated: no MLflow type-hint warning

        with answering("restore"):
            requests = request_audio(model_input, self.max_seconds, self.allow_paths)
            with self.lock:
                restored = [
                    self.chain.restore(wave, rate).numpy().astype(np.float64).tolist() for wave, rate in requests
                ]
        return pd.DataFrame({"audio": restored, "sample_rate": [self.chain.rate_out] * len(restored)})


def save_chain_model(source: ChainCheckpoints, out_dir: Path, max_seconds: float = MAX_SECONDS) -> None:
    """Write ``ChainModel`` over a chain's two verified checkpoints as an MLflow model directory, with its
    signature, an input example and the chain's provenance in the model metadata."""
    from importlib import metadata

    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    verify(source.adapter_dir)
    verify(source.vocoder_dir)
    signature = ModelSignature(
        # any type: predict checks every field itself and answers with one short message, where MLflow's own
        # conversion would answer with the request in its message (and would truncate 16000.5 in a long column)
        inputs=Schema(
            [ColSpec(AnyType(), name, required=False) for name in ("audio_base64", "audio", "sample_rate", "path")]
        ),
        outputs=Schema([ColSpec(Array(DataType.double), "audio"), ColSpec(DataType.long, "sample_rate")]),
    )
    rate = int(verify(source.vocoder_dir)["model_args"]["ssl"]["sample_rate"])
    example = pd.DataFrame({"audio": [[0.0] * (rate // 10)], "sample_rate": [rate]})
    packages = ("torch", "torchaudio", "mlflow", "pandas", "numpy", "omegaconf", "soundfile", "scipy")
    mlflow.pyfunc.save_model(
        str(out_dir),
        python_model=str(Path(__file__).with_name("chain_pyfunc.py")),
        artifacts={"adapter": str(source.adapter_dir), "vocoder": str(source.vocoder_dir)},
        signature=signature,
        input_example=example,
        metadata=dict(source.metadata),
        model_config={
            "max_seconds": max_seconds,
            "device": "cpu",
            "precision": "32",
            "chunk_seconds": 10.0,
            "allow_paths": False,
        },
        pip_requirements=[f"{p}=={metadata.version(p)}" for p in packages],
    )
