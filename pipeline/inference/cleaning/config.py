"""The config of a cleaning job (``python -m pipeline.clean_corpus key=value ...``): its keys, their checks, and a
resumed job's config: the one it was started with, with the keys given now (docs/cleaning.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from mlflow import MlflowClient

from pipeline.config import ConfigError, parse_key_values
from pipeline.config.command_line import split_overrides
from pipeline.engine import tags as tag
from pipeline.engine.stage import PRECISIONS
from pipeline.inference.cleaning import sources
from pipeline.inference.cleaning.manifest import KeepConfig, check_keep

STAGE = EXPERIMENT = "clean_corpus"
FORMATS = {"wav": (".wav", ("PCM_16", "PCM_24", "FLOAT")), "flac": (".flac", ("PCM_16", "PCM_24"))}
# what a resumed job must keep: the rows it already has were made with these
SAME_ON_RESUME = (
    "run_id",
    "model_uri",
    "checkpoint",
    "input",
    "output",
    "format",
    "subtype",
    "precision",
    "chunk_seconds",
    "context_seconds",
    "fade_seconds",
    "scores",
)


@dataclass
class CleanCorpusConfig:
    run_id: str | None = None  # a finetune_vocoder run (its latest or best committed checkpoint)
    model_uri: str | None = None  # or: models:/speech-restoration/<v>, runs:/<id>/model, a model directory
    input: str | None = None  # directory, glob, .csv/.parquet manifest (path column) or shards; local or s3://
    output: str | None = None  # directory or s3:// prefix for the restored files and manifest.parquet
    resume_run: str | None = None  # this job's run, to finish a killed or stopped job
    checkpoint: str = "latest"  # with run_id: latest | best
    format: str = "wav"  # wav | flac
    subtype: str = "PCM_16"  # PCM_16 | PCM_24 | FLOAT (wav only)
    overwrite: bool = False  # replace output files that existed before the job started (its own it always replaces)
    device: str = "auto"  # auto (cuda when the worker has a GPU) | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, 32 on CPU) | 32 | bf16 | 16-mixed
    chunk_seconds: float = 10.0  # audio restored per window (+ context_seconds each side), as restore
    context_seconds: float = 1.0
    fade_seconds: float = 0.5
    batch_size: int = 0  # windows per forward pass (chunks of many files, length-bucketed); 0 = 8 on GPU, 2 on CPU
    files_per_batch: int = 16  # files a worker takes at a time
    workers: int = 0  # restore actors; 0 = one per GPU of the cluster, else 1
    threads: int = 0  # torch threads per CPU actor; 0 = the cluster's CPUs / workers
    score_workers: int = 1  # scoring actors (DNSMOS, speaker similarity; CPU)
    scores: bool = True  # compute the quality columns (off: restore only)
    keep: KeepConfig = field(default_factory=KeepConfig)  # thresholds of the keep column
    ray_address: str = ""  # "" = a local Ray started here | auto | ray://host:10001 | host:6379
    ray_object_store_mb: int = 0  # local Ray's object store; 0: 2048 MB, at most Ray's default (30 % of memory)
    commit_seconds: float = 10.0  # how often finished rows are committed to the run
    listen_random: int = 8  # items of the listening page chosen at random
    listen_lowest: int = 8  # and the lowest by restored DNSMOS OVRL
    ssl_weights: str | None = None  # where the encoder weights are on the workers, if not where training found them


def parse_args(argv: list[str]) -> CleanCorpusConfig:
    cfg = parse_key_values(CleanCorpusConfig, argv)
    if not cfg.resume_run:
        if bool(cfg.run_id) == bool(cfg.model_uri):
            raise ConfigError(
                "Give exactly one of run_id=<finetune_vocoder run> or model_uri=<models:/… | runs:/… | path>"
            )
        if not cfg.input or not cfg.output:
            raise ConfigError("Give input=<directory, glob, manifest or shards> and output=<directory or s3:// prefix>")
    return cfg


def check(cfg: CleanCorpusConfig) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}; choose one of {', '.join(FORMATS)}")
    if cfg.subtype not in FORMATS[cfg.format][1]:
        raise ConfigError(
            f"subtype={cfg.subtype!r} with format={cfg.format}; choose one of {', '.join(FORMATS[cfg.format][1])}"
        )
    if cfg.checkpoint not in ("latest", "best"):
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}; choose latest or best")
    if cfg.precision != "auto" and cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}; choose auto or one of {', '.join(PRECISIONS)}")
    if cfg.batch_size < 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must be 0 (automatic) or more")
    for name in ("files_per_batch", "score_workers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.workers < 0 or cfg.threads < 0 or cfg.commit_seconds <= 0:
        raise ConfigError("workers and threads must be 0 (automatic) or more, commit_seconds more than 0")
    if cfg.chunk_seconds < 0 or cfg.context_seconds < 0 or cfg.fade_seconds <= 0:
        raise ConfigError("chunk_seconds and context_seconds must be zero or more, fade_seconds more than zero")
    check_keep(cfg.keep)
    sources.check_output(cfg.input, cfg.output)


def flat_params(cfg: CleanCorpusConfig) -> dict[str, str]:
    out = {}
    for key, value in asdict(cfg).items():
        for k, v in value.items() if isinstance(value, dict) else [(None, value)]:
            if v is not None and key != "resume_run":
                out[f"{key}.{k}" if k else key] = str(v)
    return out


def resumed_config(client: MlflowClient, argv: list[str], cfg: CleanCorpusConfig) -> CleanCorpusConfig:
    """The stored config of ``resume_run`` with the keys given now; ConfigError for a key that must not change."""
    try:
        run = client.get_run(cfg.resume_run)
    except Exception:
        raise ConfigError(f"resume_run={cfg.resume_run}: no such run in {client.tracking_uri}") from None
    if run.data.tags.get(tag.STAGE) != STAGE:
        raise ConfigError(
            f"resume_run={cfg.resume_run} is a run of stage {run.data.tags.get(tag.STAGE)!r}, not a "
            f"{STAGE} job; give the run ID its own log printed"
        )
    if not run.data.params:
        raise ConfigError(
            f"resume_run={cfg.resume_run} was stopped before its settings were stored, so nothing of it can be "
            "resumed; start a new job with the same input and output"
        )
    stored = {k: v for k, v in run.data.params.items() if k.split(".")[0] in {f.name for f in dataclasses.fields(cfg)}}
    given = {w.partition("=")[0]: w.partition("=")[2] for w in split_overrides(argv) if "=" in w}
    fresh = parse_key_values(CleanCorpusConfig, [f"{k}={v}" for k, v in stored.items()])
    changed = [k for k in SAME_ON_RESUME if k in given and given[k] and str(getattr(cfg, k)) != str(getattr(fresh, k))]
    if changed:
        raise ConfigError(
            f"resume_run={cfg.resume_run} was started with "
            + ", ".join(f"{k}={getattr(fresh, k)}" for k in changed)
            + "; a resumed job keeps them (given: "
            + ", ".join(f"{k}={given[k]}" for k in changed)
            + "). Start a new job for other settings."
        )
    merged = parse_key_values(
        CleanCorpusConfig,
        [f"{k}={v}" for k, v in stored.items()]
        + [w for w in split_overrides(argv) if "=" in w and w.partition("=")[2]],
    )
    return dataclasses.replace(merged, resume_run=cfg.resume_run)
