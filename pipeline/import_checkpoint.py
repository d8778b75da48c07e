"""import_checkpoint: MLflow runs from the open Miipher-2 reimplementation's checkpoints.

    python -m pipeline.import_checkpoint adapter=checkpoint_199k_fixed.pt vocoder='epoch=77-step=137108.ckpt' \\
        ssl.weights=/models/mHuBERT-147
    mlflow run . -e import_checkpoint --env-manager local -P adapter=... -P vocoder=... \\
        -P overrides="ssl.weights=/models/mHuBERT-147"

The reimplementation's (github.com/Atotti/miipher-2) adapter checkpoint and Lightning vocoder checkpoint are read
safely and their tensors mapped onto the pipeline's modules, bit for bit (pipeline/models/miipher2_checkpoints.py
says how). This command records one ``train_adapter`` run and one ``finetune_vocoder`` run whose committed
checkpoint (step 0) holds them, tagged ``imported_from``: they resume, chain and serve like runs trained here.
The frozen encoder comes from ``ssl.weights`` (the model the adapters were trained on), and the checkpoint's copy
of it is compared with that model first.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from pipeline.common.files import sha256_file
from pipeline.config import ConfigError, compose_config, parse_command_line, route_overrides
from pipeline.engine import tags as tag
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK, setup_logging
from pipeline.engine.job import record_imported_run
from pipeline.engine.stage import Precision
from pipeline.models.miipher2_checkpoints import (
    ImportRefused,
    adapter_overrides,
    check_same_encoder,
    load_adapters,
    load_vocoder,
    read_adapter_checkpoint,
    read_vocoder_checkpoint,
)

log = logging.getLogger(__name__)

LAUNCH_KEYS = ("adapter", "vocoder")  # paths of the reimplementation's files
STAGES = ("train_adapter", "finetune_vocoder")
VOCODER_PRESET = "conformer_v1_22k"  # configs/vocoder/: the reimplementation's Conformer SSL-vocoder


def parse_args(argv: list[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Launch arguments (adapter=, vocoder=) and each run's overrides: ``train_adapter.key=v`` and
    ``finetune_vocoder.key=v`` for one run, a plain ``key=v`` for every run whose config has the key."""
    line = parse_command_line(argv, LAUNCH_KEYS)
    if "adapter" not in line.launch:
        raise ConfigError(
            "import_checkpoint needs adapter=<the reimplementation's adapter checkpoint> "
            "(and vocoder=<its vocoder checkpoint> to import both)"
        )
    return line.launch, route_overrides(line.overrides, STAGES, "imported run")


def _build(stage_cls, cfg: DictConfig, inputs: dict[str, str] | None = None):
    stage = stage_cls(cfg, Precision.from_config("cpu", "32"), inputs)  # weights move as they are; no step runs here
    stage.build()
    return stage


def import_adapter(path: Path, overrides: list[str]) -> str:
    from pipeline.stages.train_adapter import TrainAdapter

    adapters, encoder, step = read_adapter_checkpoint(path)
    cfg = compose_config("train_adapter", ["recipe=atotti_miipher2", *adapter_overrides(adapters, path), *overrides])
    if not cfg.ssl.weights:
        raise ConfigError(
            "import_checkpoint needs ssl.weights=<the encoder the adapters were trained on>, e.g. "
            "a local mHuBERT-147 Hugging Face directory: the checkpoint keeps only the trained final "
            "norms of the adapted layers, and the originals make the clean-feature target"
        )
    stage = _build(TrainAdapter, cfg)
    load_adapters(stage, adapters, encoder, path)
    check_same_encoder(stage, encoder, path)
    run_id = record_imported_run(stage, cfg, _import_tags(path, step), str(path))
    log.info("Imported the adapters of %s as train_adapter run %s", path, run_id)
    return run_id


def import_vocoder(path: Path, adapter_run: str, overrides: list[str]) -> str:
    from mlflow import MlflowClient

    from pipeline.stages.finetune_vocoder import FinetuneVocoder, adopt_adapter_run

    parts, step = read_vocoder_checkpoint(path)
    # finetune_vocoder takes its vocoder preset from a vocoder run; here it is the reimplementation's
    preset_words = [w for w in overrides if w.startswith("vocoder.")]
    cfg = compose_config("finetune_vocoder", overrides)
    cfg.vocoder = compose_config("pretrain_vocoder", [f"vocoder={VOCODER_PRESET}", *preset_words]).vocoder
    adopt_adapter_run(cfg, adapter_run, MlflowClient())
    stage = _build(FinetuneVocoder, cfg, {"adapter_run": adapter_run})
    imported = load_vocoder(stage, parts, path)
    tags = {**_import_tags(path, step), tag.IMPORTED_MODULES: ",".join(imported)}
    run_id = record_imported_run(stage, cfg, tags, str(path))
    log.info("Imported the vocoder of %s as finetune_vocoder run %s", path, run_id)
    return run_id


def _import_tags(path: Path, step: int) -> dict[str, str]:
    return {
        tag.IMPORTED_FROM: str(path.resolve()),
        tag.IMPORTED_STEP: str(step),
        tag.IMPORTED_SHA256: sha256_file(path),
        tag.IMPORTED_FORMAT: "atotti/miipher-2",
    }


def run(argv: list[str]) -> int:
    setup_logging()
    try:
        launch, overrides = parse_args(argv)
        adapter_run = import_adapter(Path(launch["adapter"]).expanduser(), overrides["train_adapter"])
        # Under `mlflow run`, its run became the adapter run; the vocoder gets a run of its own.
        os.environ.pop("MLFLOW_RUN_ID", None)
        vocoder_run = None
        if "vocoder" in launch:
            vocoder_run = import_vocoder(
                Path(launch["vocoder"]).expanduser(), adapter_run, overrides["finetune_vocoder"]
            )
    except (ConfigError, ImportRefused, ValueError, OSError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    log.info(
        "Imported runs: train_adapter %s%s. Continue training with: python -m pipeline.stages.train_adapter "
        "resume_run=%s trainer.max_steps=<N>",
        adapter_run,
        f", finetune_vocoder {vocoder_run}" if vocoder_run else "",
        adapter_run,
    )
    return EXIT_OK


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
