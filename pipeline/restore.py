"""Restore your own audio with a trained chain (finetune_vocoder run or speech-restoration model).

    python -m pipeline.restore run_id=<finetune_vocoder run> input=<file or directory> output=<directory>
    python -m pipeline.restore model_uri=models:/speech-restoration/3 input=noisy/ output=restored/
    mlflow run . -e restore --env-manager local -P run_id=<id> -P input=noisy/ -P output=restored/

Every audio file soundfile reads (any rate, mono or multichannel; each channel is restored on its own)
becomes a WAV file at the vocoder's rate under the same relative path in ``output``. Long files are
restored in chunks (``chunk_seconds``, cross-faded; see pipeline/inference/chain.py). Unreadable, empty,
silent or NaN files are skipped and listed with the reason, existing outputs are kept unless
``overwrite=true``, and input files are never written. ``output/restore-summary.csv`` lists every file;
when no input is usable the command exits with code 2 and one message counting the reasons.
Bad arguments (unknown run, a run of another stage or without a checkpoint, a missing input, an output
inside the input) give one message and exit code 2 before anything is written.
"""

from __future__ import annotations

import csv
import logging
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from mlflow import MlflowClient
from tqdm import tqdm

from pipeline.config import ConfigError, parse_key_values
from pipeline.data.audio import AudioError, audio_files, read_channels
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, setup_logging
from pipeline.engine.resume import ResumeError
from pipeline.engine.stage import PRECISIONS, Precision
from pipeline.inference.chain import as_numpy, load_chain, resolve_chain

log = logging.getLogger(__name__)

SUMMARY = "restore-summary.csv"
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")


@dataclass
class RestoreConfig:
    run_id: str | None = None  # a finetune_vocoder run (its latest or best committed checkpoint)
    model_uri: str | None = None  # or: models:/speech-restoration/<v>, runs:/<id>/model, a model directory
    input: str | None = None  # an audio file or a directory (searched recursively)
    output: str | None = None  # directory for the restored WAV files (created)
    checkpoint: str = "latest"  # with run_id: latest | best (by the run's checkpoint.monitor)
    overwrite: bool = False  # replace outputs that exist
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16 | 16-mixed (autocast of the chain's forward pass)
    chunk_seconds: float = 10.0  # audio restored per step (+ context_seconds each side); 0 = whole files
    context_seconds: float = 1.0  # audio the chain sees on each side of a chunk
    fade_seconds: float = 0.5  # cross-fade between neighbouring chunks
    subtype: str = "PCM_16"  # WAV sample format: PCM_16 | PCM_24 | FLOAT
    ssl_weights: str | None = None  # where the encoder weights are on this machine, if not where training found them


def parse_args(argv: list[str]) -> RestoreConfig:
    cfg = parse_key_values(RestoreConfig, argv)
    if bool(cfg.run_id) == bool(cfg.model_uri):
        raise ConfigError("Give exactly one of run_id=<finetune_vocoder run> or model_uri=<models:/… | runs:/… | path>")
    if not cfg.input or not cfg.output:
        raise ConfigError("Give input=<audio file or directory> and output=<directory for the restored files>")
    choices = {"checkpoint": ("latest", "best"), "precision": tuple(PRECISIONS), "subtype": SUBTYPES}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}; choose one of {', '.join(allowed)}")
    if cfg.chunk_seconds < 0 or cfg.context_seconds < 0 or cfg.fade_seconds <= 0:
        raise ConfigError("chunk_seconds and context_seconds must be zero or more, fade_seconds more than zero")
    return cfg


def plan_outputs(input_path: Path, output: Path, files: list[Path]) -> dict[Path, Path]:
    """Input file -> output WAV under the same relative path; two inputs that would share a name (a.wav,
    a.flac) keep their suffix in it (a.flac.wav)."""
    root = input_path if input_path.is_dir() else input_path.parent
    planned: dict[Path, Path] = {}
    taken: set[Path] = set()
    for f in files:
        target = output / f.relative_to(root).with_suffix(".wav")
        if target in taken:
            target = output / f.relative_to(root).with_name(f.name + ".wav")
        if target.resolve() == f.resolve():
            raise ConfigError(f"Restoring {f} would overwrite it; choose another output directory")
        taken.add(target)
        planned[f] = target
    return planned


def check_paths(input_path: Path, output: Path) -> None:
    if not input_path.exists():
        raise ConfigError(f"input not found: {input_path}")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={output} is a file; give a directory")
    inside = input_path if input_path.is_dir() else input_path.parent
    if input_path.is_dir() and (output == inside or inside in output.parents):
        raise ConfigError(
            f"output={output} is inside input={input_path}; restored files would be mixed with the "
            "inputs (and read as inputs next time). Choose a directory outside it."
        )


def run(argv: list[str]) -> int:
    setup_logging()
    try:
        cfg = parse_args(argv)
        input_path, output = Path(cfg.input).expanduser().resolve(), Path(cfg.output).expanduser().resolve()
        check_paths(input_path, output)
        files = audio_files(input_path)
        planned = plan_outputs(input_path, output, files)
        precision = Precision.from_config(cfg.device, cfg.precision)
        with tempfile.TemporaryDirectory(prefix="restore-") as workdir:  # load_chain reads the checkpoints whole
            source = resolve_chain(MlflowClient(), cfg.run_id, cfg.model_uri, cfg.checkpoint, Path(workdir))
            chain = load_chain(
                source,
                precision,
                chunk_seconds=cfg.chunk_seconds,
                context_seconds=cfg.context_seconds,
                fade_seconds=cfg.fade_seconds,
                ssl_weights=cfg.ssl_weights,
            )
    except (ConfigError, ResumeError, CheckpointError, AudioError, ValueError, OSError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    log.info(
        "Chain: adapter run %s step %s, vocoder run %s step %s (%s layer %s -> %s at %d Hz); device %s",
        *(
            source.metadata.get(k, "?")
            for k in (
                "adapter_run",
                "adapter_step",
                "vocoder_run",
                "vocoder_step",
                "encoder",
                "encoder_layer",
                "vocoder",
            )
        ),
        chain.rate_out,
        chain.device,
    )
    if len(files) == 1 and input_path.is_file():
        try:  # a single file that is not usable audio is bad input: say so and write nothing
            read_channels(files[0])
        except AudioError as err:
            log.error("%s", err)
            return EXIT_BAD_INPUT
    rows = restore_files(chain, planned, cfg)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / SUMMARY, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["input", "output", "status", "reason", "seconds", "channels"])
        writer.writeheader()
        writer.writerows(rows)
    return report(rows, output)


def restore_files(chain, planned: dict, cfg: RestoreConfig) -> list[dict]:
    rows = []
    for source, target in tqdm(planned.items(), desc="restore", unit="file", disable=not sys.stderr.isatty()):
        row = {
            "input": str(source),
            "output": str(target),
            "status": "skipped",
            "reason": "",
            "seconds": "",
            "channels": "",
        }
        rows.append(row)
        if target.exists() and not cfg.overwrite:
            row["reason"] = "output exists (overwrite=true replaces it)"
            continue
        try:
            audio, rate = read_channels(source)
        except AudioError as err:
            row["reason"] = f"{err.reason}: {err}"
            continue
        start = time.perf_counter()
        restored = chain.restore(audio, rate, progress=sys.stderr.isatty())
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        sf.write(str(partial), as_numpy(restored), chain.rate_out, subtype=cfg.subtype, format="WAV")
        partial.replace(target)  # an interrupted run leaves no half-written output under the real name
        seconds = audio.shape[-1] / rate
        row.update(status="restored", seconds=f"{seconds:.3f}", channels=str(audio.shape[0]))
        log.info(
            "%s -> %s (%.1f s of audio; real-time factor %.2f: processing time / audio length, below 1 is "
            "faster than real time)",
            source,
            target,
            seconds,
            (time.perf_counter() - start) / max(seconds, 1e-9),
        )
    return rows


def report(rows: list[dict], output: Path) -> int:
    """Log what was restored and skipped; EXIT_BAD_INPUT, with one message, when no input was usable."""
    restored = [r for r in rows if r["status"] == "restored"]
    skipped = [r for r in rows if r["status"] != "restored"]
    unusable = [r for r in skipped if not r["reason"].startswith("output exists")]
    if rows and len(unusable) == len(rows):
        reasons = Counter(r["reason"].split(":")[0] for r in unusable)
        log.error(
            "Nothing restored: none of the %d audio files is usable (%s; e.g. %s). The reason for each file is "
            "in %s. Give audio files that soundfile reads (WAV, FLAC, OGG, MP3), not empty, silent or NaN.",
            len(rows),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items())),
            unusable[0]["reason"].split(": ", 1)[-1],
            output / SUMMARY,
        )
        return EXIT_BAD_INPUT
    log.info("Restored %d of %d files into %s (list: %s)", len(restored), len(rows), output, output / SUMMARY)
    for r in skipped:
        log.warning("Skipped %s: %s", r["input"], r["reason"])
    return EXIT_OK


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
