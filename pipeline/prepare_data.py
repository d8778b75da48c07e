"""prepare_data: read a corpus, degrade it, and write (clean, noisy) pairs as tar shards.

    python -m pipeline.prepare_data output=s3://bucket/demo-shards data=demo variants=4
    mlflow run . -e prepare_data --env-manager local -P output=data/shards -P overrides="variants=4"

Every utterance is resampled to ``sample_rate`` mono; the last ``data.val_size`` utterances form the
``val`` split (one degraded version each), the others the ``train`` split with ``variants`` degraded
versions each. Variant k of utterance i is degraded with the generator seeded by (seed, k, i), so the
same seed gives byte-identical shards. The job is an MLflow run (experiment ``prepare_data``) that
logs counts, hours and skipped files, a listening page of a few examples, the manifest, and the
shard set as an MLflow dataset; training runs that read the shards log the same dataset as input.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from omegaconf import DictConfig
from tqdm import tqdm

from pipeline.common.provenance import code_version, utc_now
from pipeline.config import ConfigError, compose_config, config_hash, flatten, parse_command_line, to_container
from pipeline.data.audio import AudioError, load_audio
from pipeline.data.corpus import read_corpus
from pipeline.data.degrade import OtherUtterances, degrade, sample_rng
from pipeline.data.shards import (
    FORMAT,
    MANIFEST,
    ShardError,
    ShardStore,
    ShardWriter,
    shard_dataset,
    wav_bytes,
)
from pipeline.engine import tags as tag
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, setup_logging
from pipeline.engine.tracking import default_run_name, log_dataset_inputs, start_or_adopt_run
from pipeline.inference.listening import Example, safe_name, write_listening_page

log = logging.getLogger(__name__)

PREPARE_STREAM = 4  # seeds the degradations of prepare_data, apart from on-the-fly training draws
BABBLE_POOL = 64  # recent utterances that babble noise is drawn from


def _key(utt_id: str, variant: int) -> str:
    """A WebDataset key: no dots (they separate the key from the member kind) and no slashes."""
    return f"{safe_name(utt_id)}__v{variant}"


def _open_run(client: MlflowClient, cfg: DictConfig) -> str:
    written = to_container(cfg)  # as written: what an interpolation resolves to may be a secret
    return start_or_adopt_run(
        client,
        experiment=cfg.tracking.experiment or "prepare_data",
        run_name=written["tracking"]["run_name"] or (lambda run_id: default_run_name(run_id, cfg.data.name, "shards")),
        tags={tag.STAGE: "prepare_data", tag.DATASET: cfg.data.name, "output": written["output"]},
        params=flatten(written),
        launcher=os.environ.get("MLFLOW_RUN_ID"),
    )


@dataclass
class Written:
    """What writing the shards gave: the shards of each split, the files skipped by reason, the examples for
    the listening page, and the seconds of audio in every sample written."""

    shards: dict[str, list] = field(default_factory=dict)  # split -> ShardInfo of each shard
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[Example] = field(default_factory=list)
    audio_seconds: float = 0.0


def prepare(cfg: DictConfig, client: MlflowClient, run_id: str) -> dict[str, Any]:
    """Write the shards and the manifest; returns the manifest."""
    store = ShardStore(cfg.output)
    utterances = read_corpus(cfg.data.format, cfg.data.root, cfg.data.subsets)
    if len(utterances) <= cfg.data.val_size:
        raise ConfigError(f"data.val_size={cfg.data.val_size} leaves no training utterances ({len(utterances)} found)")
    started = time.perf_counter()
    written = write_shards(cfg, store, utterances)
    if not written.shards["train"]:
        raise AudioError(f"no usable training audio in the corpus ({dict(written.skipped)} skipped)")
    elapsed = time.perf_counter() - started
    manifest = build_manifest(cfg, len(utterances), written)
    store_manifest(cfg, client, run_id, store, manifest, written.examples)
    metrics = log_metrics(client, run_id, manifest, written, len(utterances), elapsed)
    log_dataset_inputs(client, run_id, [shard_dataset(cfg.output, manifest)], "output")
    log.info(
        "%d samples (%.3f h) in %d shards at %s; skipped %s; %.1fx real time",
        manifest["samples"],
        manifest["hours"],
        metrics["shards"],
        cfg.output,
        dict(written.skipped) or "none",
        metrics["realtime_factor"],
    )
    return manifest


def write_shards(cfg: DictConfig, store: ShardStore, utterances: list) -> Written:
    """Every usable utterance, degraded ``variants`` times (train) or once (the last ``data.val_size``: val), as
    (clean, noisy) pairs in tar shards written locally and uploaded to ``store`` one by one."""
    split_at = len(utterances) - cfg.data.val_size
    written = Written()
    # Babble comes from the utterances read just before (bounded memory, same order every run).
    babble_pool: deque = deque(maxlen=BABBLE_POOL)
    with tempfile.TemporaryDirectory(prefix="shards-") as tmp:

        def upload(path: Path, info) -> None:
            store.put(path, info.name)
            path.unlink()
            log.info("wrote %s/%s (%d samples, %.1f MB)", cfg.output, info.name, info.samples, info.bytes / 1e6)

        writers = {split: ShardWriter(Path(tmp), split, cfg.shard_size, upload) for split in ("train", "val")}
        for index, utt in enumerate(tqdm(utterances, desc="prepare_data", unit="utt", disable=not sys.stderr.isatty())):
            clean = _usable_audio(cfg, utt, written.skipped)
            if clean is None:
                continue
            split = "train" if index < split_at else "val"
            _write_variants(cfg, writers[split], split, index, utt, clean, babble_pool, written)
            babble_pool.append(clean)
        written.shards = {split: writer.close() for split, writer in writers.items()}
    return written


def _usable_audio(cfg: DictConfig, utt, skipped: Counter[str]):
    """The utterance's audio at ``sample_rate``, or None (counted in ``skipped``) when it is unusable or too long."""
    try:
        clean = load_audio(utt.path, cfg.sample_rate, max_clipped_fraction=cfg.data.max_clipped_fraction)
    except AudioError as err:
        skipped[err.reason] += 1
        log.debug("skipping %s", err)
        return None
    if clean.numel() / cfg.sample_rate > cfg.max_seconds:
        skipped["too long"] += 1
        return None
    return clean


def _write_variants(
    cfg: DictConfig, writer: ShardWriter, split: str, index: int, utt, clean, babble_pool: deque, written: Written
) -> None:
    """The degraded versions of utterance ``index`` into ``writer``; variant k's degradation is seeded by
    (seed, k, index), its babble drawn from ``babble_pool``."""
    seconds = clean.numel() / cfg.sample_rate
    clean_bytes = wav_bytes(clean, cfg.sample_rate)
    others = OtherUtterances(list(babble_pool)) if babble_pool else None
    for variant in range(cfg.variants if split == "train" else 1):
        rng = sample_rng(int(cfg.seed), variant, index, PREPARE_STREAM)
        noisy, params = degrade(clean, cfg.sample_rate, cfg.degradation, rng, others=others)
        meta = {
            "utterance": utt.id,
            "text": utt.text,
            "variant": variant,
            "split": split,
            "sample_rate": cfg.sample_rate,
            "seconds": round(seconds, 4),
            "degradation": params,
        }
        writer.add(_key(utt.id, variant), clean_bytes, wav_bytes(noisy, cfg.sample_rate), meta, seconds)
        written.audio_seconds += seconds
        if len(written.examples) < cfg.examples and split == "train":
            written.examples.append(
                Example(f"{utt.id} v{variant}", utt.text, {"clean": clean, "degraded": noisy}, json.dumps(params))
            )


def build_manifest(cfg: DictConfig, utterances: int, written: Written) -> dict[str, Any]:
    """The shard set's manifest: what made it (seed, corpus, degradation, code) and what it holds per split."""
    splits = {
        split: {
            "shards": [vars(s) for s in infos],
            "samples": sum(s.samples for s in infos),
            "seconds": round(sum(s.seconds for s in infos), 3),
        }
        for split, infos in written.shards.items()
    }
    return {
        "format": FORMAT,
        "created": utc_now(),
        "code_version": code_version(),
        "seed": int(cfg.seed),
        "sample_rate": int(cfg.sample_rate),
        "variants": int(cfg.variants),
        "corpus": {"name": cfg.data.name, "format": cfg.data.format, "root": cfg.data.root, "utterances": utterances},
        "degradation": to_container(cfg.degradation),
        "config_hash": config_hash(cfg),
        "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "hours": round(sum(s["seconds"] for s in splits.values()) / 3600, 4),
        "skipped": dict(written.skipped),
    }


def store_manifest(
    cfg: DictConfig,
    client: MlflowClient,
    run_id: str,
    store: ShardStore,
    manifest: dict[str, Any],
    examples: list[Example],
) -> None:
    """The manifest next to the shards (last: a shard set without one is never read) and in the run, with the
    listening page of the examples."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        store.put(path, MANIFEST)
        client.log_artifact(run_id, str(path))
        page = Path(tmp) / "samples"
        write_listening_page(page, f"prepare_data · {cfg.data.name}", examples, cfg.sample_rate)
        client.log_artifacts(run_id, str(page), "samples")


def log_metrics(
    client: MlflowClient, run_id: str, manifest: dict[str, Any], written: Written, utterances: int, elapsed: float
) -> dict[str, float]:
    """Counts, hours, size and speed of the shard set as the run's metrics (step 0); returns them."""
    splits = manifest["splits"]
    metrics = {
        "utterances": utterances,
        "skipped": sum(written.skipped.values()),
        "samples/train": splits["train"]["samples"],
        "samples/val": splits["val"]["samples"],
        "hours": manifest["hours"],
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "megabytes": sum(i["bytes"] for s in splits.values() for i in s["shards"]) / 1e6,
        "realtime_factor": written.audio_seconds / max(elapsed, 1e-9),
    }
    for key, value in {**metrics, **{f"skipped/{k.replace(' ', '_')}": v for k, v in written.skipped.items()}}.items():
        client.log_metric(run_id, key, float(value), step=0)
    return metrics


def parse_args(argv: list[str]):
    """The words, every one a config override, composed into the config. ``output=`` (an MLproject parameter of
    its own) is taken whole, spaces included, and handed to Hydra quoted."""
    line = parse_command_line(argv, ("output",))
    overrides = list(line.overrides)
    if "output" in line.launch:
        value = line.launch["output"]  # Hydra's quoted string: a backslash escapes only a quote or the closing one
        trailing = len(value) - len(value.rstrip("\\"))
        quoted = value.replace("\\'", "\\\\'").replace("'", "\\'") + "\\" * trailing
        overrides.append(f"output='{quoted}'")
    return compose_config("prepare_data", overrides)


def run_prepare(argv: list[str]) -> int:
    setup_logging()
    try:
        cfg = parse_args(argv)
        ShardStore(cfg.output)  # an unsupported location fails now
    except (ConfigError, ShardError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    client = MlflowClient()
    try:
        read_corpus(cfg.data.format, cfg.data.root, cfg.data.subsets)  # a missing corpus fails before a run exists
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    run_id = _open_run(client, cfg)
    try:
        prepare(cfg, client, run_id)
    except (ConfigError, AudioError, ShardError) as err:
        log.error("%s", err)
        client.set_terminated(run_id, "FAILED")
        return EXIT_BAD_INPUT
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("Train on it: python -m pipeline.stages.train_adapter data=shards data.root=%s", cfg.output)
    return EXIT_OK


def main() -> None:
    sys.exit(run_prepare(sys.argv[1:]))


if __name__ == "__main__":
    main()
