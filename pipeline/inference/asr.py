"""Speech recognition with a trained train_asr checkpoint: load it, transcribe waveforms (greedy CTC
decoding), and the MLflow model that serves it (``Transcriber``; loaded by ``pipeline/inference/asr_pyfunc.py``).
"""

from __future__ import annotations

import logging
import threading
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.config import ConformerConfig
from pipeline.engine.checkpoint_files import CheckpointError, verify
from pipeline.engine.checkpoint_migrate import read_state
from pipeline.engine.resume import RunCheckpoints, fetch_model
from pipeline.inference.requests import MAX_SECONDS, RequestError, answering, request_audio, resample
from pipeline.models.asr import CharVocabulary, ConformerCTC, greedy_decode

log = logging.getLogger(__name__)

STAGE = "train_asr"
LONG_FILES = "transcribe long files with pipeline.transcribe"  # what a too-long request is told
MIN_SECONDS = 0.1  # shortest audio a request may carry (the log-mel front end needs more than n_fft / 2 samples)


def checkpoint_from_run(client: MlflowClient, run_id: str, which: str, workdir: Path) -> Path:
    checkpoints = RunCheckpoints(client, run_id, (STAGE,))
    step = checkpoints.require_committed("transcribe with")
    if which == "best":
        best = checkpoints.best_step()
        if best is None:
            log.warning("Run %s has no checkpoint scored by its monitor metric; using the latest", run_id)
        step = best if best is not None else step
    log.info("Using checkpoint step %d of run %s (%s)", step, run_id, which)
    return checkpoints.download(step, workdir)


def checkpoint_from_uri(uri: str, workdir: Path) -> Path:
    """A checkpoint directory, or the one inside an MLflow model directory (a run's ``model/``)."""
    path = fetch_model(uri, workdir)
    path = path.parent if path.is_file() else path
    inside = sorted(p.parent for p in path.glob("artifacts/*/meta.json")) if (path / "MLmodel").exists() else []
    return inside[0] if inside else path


def load_model(ckpt_dir: Path, device: torch.device) -> tuple[ConformerCTC, CharVocabulary, dict]:
    """Rebuild the model from the checkpoint's own model arguments and load its weights."""
    meta = verify(ckpt_dir)
    if meta.get("stage") != STAGE:
        raise CheckpointError(f"Checkpoint {ckpt_dir} was written by stage {meta.get('stage')!r}, not {STAGE!r}")
    asr = OmegaConf.merge(OmegaConf.structured(ConformerConfig), meta["model_args"]["asr"])
    model = ConformerCTC(asr)
    model.load_state_dict(read_state(ckpt_dir, meta)["modules"]["model"])
    return model.to(device).eval(), CharVocabulary(asr.vocabulary), meta


@torch.no_grad()
def transcribe(
    model: ConformerCTC, vocab: CharVocabulary, waves: list[torch.Tensor], device: torch.device
) -> list[str]:
    texts = []
    for wave in waves:
        log_probs, frames = model(wave[None].to(device), torch.tensor([wave.numel()], device=device))
        texts.extend(greedy_decode(log_probs, frames, vocab))
    return texts


class Transcriber(mlflow.pyfunc.PythonModel):
    """The ``model/`` of a finished train_asr run: audio in, transcripts out.

    ``mlflow.pyfunc.load_model("runs:/<id>/model").predict(...)``, ``python -m pipeline.serve -m
    runs:/<id>/model`` or ``mlflow models serve -m runs:/<id>/model --env-manager local`` (from this
    project's environment: the model imports ``pipeline``). Input: a DataFrame with, per row,
    ``audio_base64`` (a WAV or FLAC file's bytes, base64-encoded; mono or stereo, mixed down) or ``audio``
    (float samples, one channel) with ``sample_rate`` (Hz; without a ``sample_rate`` column, the model's
    own rate). Output: a DataFrame with ``transcript``. The request checks, limits and error answers are
    the ``speech-restoration`` model's (``pipeline.inference.requests.request_audio``): ``path`` (a file on this
    machine, or a list of paths) is read only where the model config says ``allow_paths``
    (``mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})``); a served model refuses it.
    A bad request gets 400 and one short message; requests are transcribed one at a time. The weights are
    a verified checkpoint, loaded with ``weights_only=True``.
    """

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        self.max_seconds = float(config.get("max_seconds", MAX_SECONDS))
        self.allow_paths = config.get("allow_paths") is True  # only a real true: "false" is not
        self.lock = threading.Lock()  # one request's audio in the model at a time
        self.device = torch.device("cpu")
        self.model, self.vocab, meta = load_model(Path(context.artifacts["checkpoint"]), self.device)
        self.rate = int(meta["model_args"]["asr"]["sample_rate"])

    def _as_frame(self, model_input):
        """A list of paths (or one) as a ``path`` column; ``audio`` without ``sample_rate`` at the model's rate."""
        if isinstance(model_input, (str, Path)):
            model_input = [model_input]
        if isinstance(model_input, (list, tuple)) and all(isinstance(p, (str, Path)) for p in model_input):
            return pd.DataFrame({"path": [str(p) for p in model_input]})
        if isinstance(model_input, pd.DataFrame) and "audio" in model_input and "sample_rate" not in model_input:
            return model_input.assign(sample_rate=self.rate)
        return model_input

    def _resampled(self, row: int, wave: torch.Tensor, rate: int) -> torch.Tensor:
        wave = resample(wave, rate, self.rate)
        if wave.numel() < MIN_SECONDS * self.rate:
            raise RequestError(
                f"row {row}: audio shorter than {MIN_SECONDS:g} s cannot be transcribed; send at least "
                f"{MIN_SECONDS:g} s"
            )
        return wave

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        with answering("transcribe"):
            requests = request_audio(self._as_frame(model_input), self.max_seconds, self.allow_paths, LONG_FILES)
            with self.lock:
                waves = [self._resampled(i, wave, rate) for i, (wave, rate) in enumerate(requests)]
                texts = transcribe(self.model, self.vocab, waves, self.device)
        return pd.DataFrame({"transcript": texts})


def save_transcriber(checkpoint_dir: Path, out_dir: Path, max_seconds: float = MAX_SECONDS) -> None:
    """Write ``Transcriber`` over a verified train_asr checkpoint as an MLflow model directory."""
    verify(checkpoint_dir)
    packages = ("torch", "torchaudio", "mlflow", "pandas", "numpy", "omegaconf", "soundfile", "scipy")
    mlflow.pyfunc.save_model(
        str(out_dir),
        python_model=str(Path(__file__).with_name("asr_pyfunc.py")),
        artifacts={"checkpoint": str(checkpoint_dir)},
        model_config={"max_seconds": max_seconds, "allow_paths": False},
        pip_requirements=[f"{p}=={metadata.version(p)}" for p in packages],
    )
