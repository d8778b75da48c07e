"""Transcribe audio with a trained train_asr checkpoint (greedy CTC decoding).

    python -m pipeline.transcribe run_id=<run id> input=path/to/file_or_dir [checkpoint=latest|best] [output=out.csv]
    python -m pipeline.transcribe model_uri=models:/asr/1 input=clip.wav
    mlflow run . -e transcribe --env-manager local -P run_id=<id> -P input=clips/

Transcripts go to stdout as ``<file>\\t<text>`` lines, to ``output`` (CSV) when given, and to the
training run as a table artifact ``transcriptions/<time>.json`` when the checkpoint belongs to a run in
this tracking store. Bad input (unknown run, no checkpoint, not audio) gives one error and exit code
2 before anything is written.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from pipeline.config import ConfigError, parse_key_values
from pipeline.data.audio import AudioError, audio_files, load_audio
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, setup_logging
from pipeline.engine.resume import ResumeError
from pipeline.engine.stage import Precision
from pipeline.inference.asr import checkpoint_from_run, checkpoint_from_uri, load_model, transcribe

log = logging.getLogger(__name__)


@dataclass
class TranscribeConfig:
    run_id: str | None = None  # a train_asr run; its latest or best checkpoint is used
    model_uri: str | None = None  # or: models:/<name>/<version>, runs:/<id>/checkpoints/step-N, a local directory
    input: str | None = None  # an audio file or a directory of audio files (searched recursively)
    output: str | None = None  # optional CSV file for the transcripts
    checkpoint: str = "latest"  # with run_id: latest | best (by the run's checkpoint.monitor)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


def parse_args(argv: list[str]) -> TranscribeConfig:
    """``key=value`` words (``config.parse_key_values``), checked."""
    out = parse_key_values(TranscribeConfig, argv)
    if bool(out.run_id) == bool(out.model_uri):
        raise ConfigError("Give exactly one of run_id=<train_asr run> or model_uri=<models:/… | runs:/… | path>")
    if not out.input:
        raise ConfigError("Give input=<audio file or directory>")
    if out.checkpoint not in ("latest", "best"):
        raise ConfigError(f"checkpoint={out.checkpoint!r}; choose latest or best")
    return out


def _log_to_run(client: MlflowClient, run_id: str | None, table: pd.DataFrame) -> None:
    if not run_id:
        return
    try:
        client.get_run(run_id)
    except Exception:
        return  # the checkpoint came from another tracking store
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    client.log_table(run_id, data=table, artifact_file=f"transcriptions/{stamp}.json")
    log.info("Logged %d transcripts to run %s as transcriptions/%s.json", len(table), run_id, stamp)


def run(argv: list[str]) -> int:
    setup_logging()
    client = MlflowClient()
    try:
        cfg = parse_args(argv)
        files = audio_files(cfg.input)
        device = Precision.from_config(cfg.device, "32").device
        with tempfile.TemporaryDirectory(prefix="transcribe-") as tmp:  # load_model reads the checkpoint whole
            workdir = Path(tmp)
            if cfg.run_id:
                ckpt = checkpoint_from_run(client, cfg.run_id, cfg.checkpoint, workdir)
            else:
                ckpt = checkpoint_from_uri(cfg.model_uri, workdir)
            model, vocab, meta = load_model(ckpt, device)
        rate = int(meta["model_args"]["asr"]["sample_rate"])
        waves = [load_audio(f, rate) for f in files]  # every file is read before anything is written
    except (ConfigError, ResumeError, CheckpointError, AudioError, ValueError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    texts = transcribe(model, vocab, waves, device)
    table = pd.DataFrame({"file": [str(f) for f in files], "transcript": texts})
    for f, text in zip(files, texts):
        sys.stdout.write(f"{f}\t{text}\n")
    sys.stdout.flush()
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(cfg.output, index=False)
        log.info("Wrote %s", cfg.output)
    _log_to_run(client, cfg.run_id or meta.get("run_id"), table)
    return EXIT_OK


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
