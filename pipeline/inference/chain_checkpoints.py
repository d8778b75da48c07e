"""Where a restoration chain's weights are: two verified checkpoints, found in a finetune_vocoder run (the
checkpoint ``which`` names and the adapter checkpoint it pins) or inside a ``speech-restoration`` model.

``pipeline/inference/chain.py`` resolves a chain from a run or a model URI with these (``resolve_chain``) and
loads it (``load_chain``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipeline.engine.checkpoint_files import CheckpointError, verify
from pipeline.engine.checkpointing import list_checkpoints
from pipeline.engine.resume import ResumeError, RunCheckpoints, fetch_model, stored_inputs

log = logging.getLogger(__name__)

CHAIN_STAGE = "finetune_vocoder"
VOCODER_STAGE = "pretrain_vocoder"  # its checkpoints make a vocoder-only chain (copy synthesis)
ADAPTER_STAGE = "train_adapter"


@dataclass
class ChainCheckpoints:
    """Where a chain's weights are: two verified checkpoint directories and what they came from."""

    adapter_dir: Path | None  # None: a pretrain_vocoder checkpoint, a vocoder-only chain
    vocoder_dir: Path
    metadata: dict[str, str]  # run IDs, steps, encoder preset and weights reference


def chain_from_run(
    client: MlflowClient, run_id: str, workdir: Path, which: str | int = "latest", vocoder_only: bool = False
) -> ChainCheckpoints:
    """The chain of a finetune_vocoder run: its latest or best committed checkpoint, or the one at step ``which``
    (an int), and the adapter checkpoint it was fine-tuned on. With ``vocoder_only`` a pretrain_vocoder run is
    taken too, as a vocoder-only chain (no adapters: copy synthesis only); without it, refused as a run of the
    wrong stage. ResumeError/CheckpointError say what is wrong."""
    vocoder = RunCheckpoints(client, run_id, (CHAIN_STAGE, VOCODER_STAGE) if vocoder_only else (CHAIN_STAGE,))
    step = checkpoint_step(vocoder, which)
    vocoder_dir = vocoder.download(step, workdir / "vocoder")
    meta = verify(vocoder_dir)
    if meta.get("stage") == VOCODER_STAGE:
        return ChainCheckpoints(None, vocoder_dir, chain_metadata(meta, run_id, step, "", None))
    inputs = stored_inputs(meta)
    adapter_run = inputs.get("adapter_run") or meta["model_args"].get("adapter_run")
    if not adapter_run:
        raise ResumeError(f"Run {run_id} checkpoint step {step} does not name the adapter run it was fine-tuned on")
    adapter = RunCheckpoints(client, adapter_run, (ADAPTER_STAGE,), "adapter_run")
    adapter_step = (
        int(inputs["adapter_step"]) if "adapter_step" in inputs else adapter.require_committed("restore with")
    )
    if "adapter_step" not in inputs:  # written before adapter checkpoints were pinned
        log.warning(
            "Run %s does not pin its adapter checkpoint; using adapter run %s's latest (step %d)",
            run_id,
            adapter_run,
            adapter_step,
        )
    adapter_dir = adapter.download(adapter_step, workdir / "adapter")
    verify(adapter_dir)
    return ChainCheckpoints(adapter_dir, vocoder_dir, chain_metadata(meta, run_id, step, adapter_run, adapter_step))


def checkpoint_step(run: RunCheckpoints, which: str | int) -> int:
    """The step ``which`` names in ``run``: ``latest``, ``best`` (the latest when nothing is scored) or a
    step number that must still be stored (the refusal lists the stored ones)."""
    latest = run.require_committed("restore with")
    if which == "latest":
        return latest
    if which == "best":
        best = run.best_step()
        return best if best is not None else latest
    return stored_steps(run, [int(which)])[0]


def stored_steps(run: RunCheckpoints, wanted: list[int]) -> list[int]:
    """``wanted``, each of which ``run`` must still store; the refusal names the missing and the stored steps."""
    stored = list_checkpoints(run.client, run.run_id)
    missing = [step for step in wanted if step not in stored]
    if missing:
        raise ResumeError(
            f"Run {run.run_id} has no stored checkpoint at step {', '.join(map(str, missing))}; stored "
            f"steps: {', '.join(map(str, stored))} (retention keeps checkpoint.keep_last_n and "
            "keep_best_k: raise them in training to keep a learning curve's checkpoints)"
        )
    return wanted


def chain_metadata(
    meta: dict[str, Any], run_id: str, step: int, adapter_run: str, adapter_step: int | None
) -> dict[str, str]:
    ssl = meta["model_args"]["ssl"]
    return {
        "vocoder_run": run_id,
        "vocoder_step": str(step),
        "adapter_run": adapter_run,
        "adapter_step": "" if adapter_step is None else str(adapter_step),
        "encoder": ssl["name"],
        "encoder_layer": str(ssl["layer"]),
        "encoder_weights": str(ssl.get("weights") or "(seeded random initialisation)"),
        "vocoder": meta["model_args"]["vocoder"]["name"],
    }


def verify_stage(directory: Path, stage: str) -> dict[str, Any]:
    """The verified checkpoint ``directory``'s meta; CheckpointError when another stage wrote it."""
    meta = verify(directory)
    if meta.get("stage") != stage:
        raise CheckpointError(f"Checkpoint {directory} was written by stage {meta.get('stage')!r}, not {stage!r}")
    return meta


def chain_from_model(uri: str, workdir: Path) -> ChainCheckpoints:
    """The checkpoints inside a ``speech-restoration`` model (``models:/<name>/<v>``, ``runs:/<id>/model``
    or a local model directory)."""
    from mlflow.models import Model

    path = fetch_model(uri, workdir)

    try:
        model = Model.load(str(path / "MLmodel"))
        artifacts = model.flavors["python_function"]["artifacts"]
        adapter, vocoder = path / artifacts["adapter"]["path"], path / artifacts["vocoder"]["path"]
    except Exception:  # no MLmodel, another kind of model
        raise ResumeError(
            f"{uri} is not a speech-restoration model (an MLmodel with adapter and vocoder "
            "checkpoints, as finetune_vocoder logs it)"
        ) from None
    return ChainCheckpoints(adapter, vocoder, dict(model.metadata or {}))
