"""finetune_vocoder: continue a pretrained HiFi-GAN on adapter-cleaned features of degraded audio,
against the clean waveform (Miipher-2, docs/architecture.md, Models).

    python -m pipeline.stages.finetune_vocoder adapter_run=<train_adapter run> vocoder_run=<pretrain_vocoder run>
    mlflow run . -e finetune_vocoder --env-manager local -P adapter_run=<id> -P vocoder_run=<id>

The encoder and the adapters are rebuilt from the adapter run's latest committed checkpoint (its
``model_args``; downloaded, sha256-verified, loaded with ``weights_only=True``) and stay frozen; the
generator and discriminators start from the vocoder run's latest checkpoint. The architecture comes
from those runs: ``ssl`` and ``adapter`` from the adapter run, ``vocoder`` from the vocoder run. A
vocoder trained on another encoder preset or layer than the adapter's is refused before training.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pipeline.config import AdapterConfig, ConfigError, DegradationConfig, EncoderConfig, VocoderConfig, stage_config
from pipeline.data.datasets import VAL_STREAM
from pipeline.data.degrade import degrade, sample_rng
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import CheckpointError, verify
from pipeline.engine.resume import ResumeError, ResumePoint, RunCheckpoints
from pipeline.engine.session import main
from pipeline.models.adapters import build_adapted_encoder
from pipeline.stages.vocoder_base import VocoderStage, VocoderTrainConfig

log = logging.getLogger(__name__)


@stage_config("finetune_vocoder")
@dataclass
class FinetuneVocoderConfig(VocoderTrainConfig):
    """finetune_vocoder's config (configs/finetune_vocoder.yaml). ssl and adapter come from the `adapter_run=`
    run's checkpoint, vocoder from the `vocoder_run=` run's (launch arguments, pipeline/engine/launch.py)."""

    stage: str = "finetune_vocoder"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # filled from the adapter run
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


ADAPTER_STAGES = ("train_adapter",)
VOCODER_STAGES = ("pretrain_vocoder", "finetune_vocoder")


# --------------------------------------------------------------------------------------------
# The runs this stage builds on
# --------------------------------------------------------------------------------------------


def linked_run(client: MlflowClient, role: str, run_id: str, stages: tuple[str, ...]) -> RunCheckpoints:
    """The checkpoints of the run ``role=<run_id>`` names, if it exists, is not deleted, is of one of
    ``stages`` and has a committed checkpoint; otherwise a ConfigError saying which and why."""
    try:
        checkpoints = RunCheckpoints(client, run_id, stages, role)
        checkpoints.require_committed("build on")
    except ResumeError as err:
        raise ConfigError(str(err)) from err
    return checkpoints


def latest_meta(client: MlflowClient, role: str, run_id: str, stages: tuple[str, ...]) -> dict[str, Any]:
    """meta.json of the run's latest committed checkpoint (config and model_args, no weights)."""
    checkpoints = linked_run(client, role, run_id, stages)
    try:
        return checkpoints.meta(checkpoints.latest_step)
    except ResumeError as err:
        raise ConfigError(str(err)) from err


def load_checkpoint(
    client: MlflowClient, role: str, run_id: str, stages: tuple[str, ...], step: int | None = None
) -> ResumePoint:
    """The run's checkpoint at ``step`` (None: its latest committed one): downloaded, sha256-verified,
    weights_only-loaded."""
    checkpoints = linked_run(client, role, run_id, stages)
    try:
        with tempfile.TemporaryDirectory(prefix=f"{role}-") as workdir:  # the state is loaded whole into memory
            return checkpoints.load(step, Path(workdir))
    except (ResumeError, CheckpointError) as err:
        raise ConfigError(f"{role}={run_id}: {err}") from err


def adopt_adapter_run(cfg: DictConfig, adapter_run: str, client: MlflowClient) -> None:
    """Set ``cfg.ssl`` and ``cfg.adapter`` to those of ``adapter_run`` (its latest checkpoint's
    meta.json); an explicit ``ssl.weights`` (the encoder moved) wins over the run's path."""
    adapter = latest_meta(client, "adapter_run", adapter_run, ADAPTER_STAGES)["model_args"]
    weights = cfg.ssl.weights
    cfg.ssl = OmegaConf.merge(OmegaConf.structured(EncoderConfig), adapter["ssl"])
    if weights:
        cfg.ssl.weights = weights
    cfg.adapter = OmegaConf.merge(OmegaConf.structured(AdapterConfig), adapter["adapter"])


def _encoder_name(ssl: dict[str, Any]) -> str:
    return f"encoder preset {ssl['name']!r} layer {ssl['layer']}"


def check_same_encoder(
    adapter_run: str, adapter_ssl: dict[str, Any], vocoder_run: str, vocoder_ssl: dict[str, Any]
) -> None:
    if (adapter_ssl["name"], adapter_ssl["layer"]) != (vocoder_ssl["name"], vocoder_ssl["layer"]):
        raise ConfigError(
            f"Refusing to fine-tune: adapter run {adapter_run} uses {_encoder_name(adapter_ssl)}, but vocoder run "
            f"{vocoder_run} was trained on {_encoder_name(vocoder_ssl)}. Pretrain a vocoder with "
            f"ssl={adapter_ssl['name']} ssl.layer={adapter_ssl['layer']} (or pick a matching adapter run)."
        )
    # the same preset with another framing or width (e.g. ssl.hop_length of a log-mel front end) is another front end
    # (keys one side's older checkpoint lacks are not compared)
    differ = sorted(
        key for key in set(adapter_ssl) & set(vocoder_ssl) if key != "weights" and adapter_ssl[key] != vocoder_ssl[key]
    )
    if differ:
        raise ConfigError(
            f"Refusing to fine-tune: adapter run {adapter_run} and vocoder run {vocoder_run} use "
            f"{_encoder_name(adapter_ssl)} with other settings: "
            + ", ".join(f"ssl.{k}={adapter_ssl[k]!r} vs {vocoder_ssl[k]!r}" for k in differ)
            + ". Pretrain a vocoder with the adapter run's ssl settings."
        )


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class FinetuneVocoder(VocoderStage):
    name = "finetune_vocoder"
    schema = FinetuneVocoderConfig
    architecture_keys = ("ssl.", "vocoder.", "adapter.")
    run_inputs = ("adapter_run", "vocoder_run")  # (+ adapter_step, pinned when the adapters are loaded)
    uses_degradation = True

    @classmethod
    def adopt_inputs(cls, cfg: DictConfig, inputs: dict[str, str]) -> DictConfig:
        """Take ``ssl`` and ``adapter`` from the adapter run and ``vocoder`` from the vocoder run
        (reading only their checkpoints' meta.json), after checking that both use the same encoder."""
        adapter_run, vocoder_run = inputs.get("adapter_run"), inputs.get("vocoder_run")
        if not adapter_run or not vocoder_run:
            raise ConfigError(
                "finetune_vocoder needs adapter_run=<train_adapter run id> and vocoder_run=<pretrain_vocoder run id>"
            )
        client = MlflowClient()
        adopt_adapter_run(cfg, adapter_run, client)
        vocoder = latest_meta(client, "vocoder_run", vocoder_run, VOCODER_STAGES)["model_args"]
        check_same_encoder(adapter_run, OmegaConf.to_container(cfg.ssl), vocoder_run, vocoder["ssl"])
        cfg.vocoder = OmegaConf.merge(OmegaConf.structured(VocoderConfig), vocoder["vocoder"])
        return cfg

    @property
    def adapter_run(self) -> str:
        return self.inputs["adapter_run"]

    def tags(self) -> dict[str, str]:
        links = {
            tag.CHAIN_ADAPTER_RUN: self.inputs.get("adapter_run"),
            tag.CHAIN_VOCODER_RUN: self.inputs.get("vocoder_run"),
        }
        return {**super().tags(), **{key: str(run) for key, run in links.items() if run}}  # (imported: no vocoder run)

    def model_args(self) -> dict[str, Any]:
        return {
            **super().model_args(),
            "adapter": OmegaConf.to_container(self.cfg.adapter),
            "adapter_run": self.adapter_run,
        }

    def export_model(self, checkpoint_dir: Path, out_dir: Path) -> bool:
        """The restoration chain (pipeline/inference/chain.py): this checkpoint's generator with the pinned
        adapter checkpoint, as one MLflow model."""
        from pipeline.inference.chain import save_chain_model
        from pipeline.inference.chain_checkpoints import ADAPTER_STAGE, ChainCheckpoints, chain_metadata

        meta = verify(checkpoint_dir)
        step = int(self.inputs["adapter_step"])
        adapter = RunCheckpoints(MlflowClient(), self.adapter_run, (ADAPTER_STAGE,), "adapter_run")
        adapter_dir = adapter.download(step, out_dir.parent / "adapter")
        save_chain_model(
            ChainCheckpoints(
                adapter_dir,
                checkpoint_dir,
                chain_metadata(meta, meta["run_id"], int(meta["step"]), self.adapter_run, step),
            ),
            out_dir,
        )
        return True

    def build_feature_extractor(self) -> None:
        """The adapter run's encoder with its trained adapters, frozen. The adapter checkpoint is pinned:
        its step is kept in ``inputs`` (so in every checkpoint), and a resume or the chain model loads
        that one even after the adapter run has trained on."""
        pinned = self.inputs.get("adapter_step")
        point = load_checkpoint(
            MlflowClient(), "adapter_run", self.adapter_run, ADAPTER_STAGES, int(pinned) if pinned else None
        )
        self.inputs["adapter_step"] = str(point.step)
        saved_ssl = point.meta["model_args"]["ssl"]
        check_same_encoder(self.adapter_run, saved_ssl, "(this run)", OmegaConf.to_container(self.cfg.ssl))
        self.adapted = build_adapted_encoder(self.cfg.ssl, self.cfg.adapter)
        for key, module in self.adapted.trainable_modules().items():
            module.load_state_dict(point.state["modules"][key])
        self.adapted.to(self.device).eval().requires_grad_(False)
        log.info("Adapters rebuilt from %s", point.source)

    def load_initial_weights(self) -> None:
        """Generator and discriminators from the vocoder run (fresh start only: a resume restores them;
        import_checkpoint builds the stage without a vocoder run and loads the imported weights itself)."""
        if self.resuming or not self.inputs.get("vocoder_run"):
            return
        point = load_checkpoint(MlflowClient(), "vocoder_run", self.inputs["vocoder_run"], VOCODER_STAGES)
        for key, module in self.modules.items():
            module.load_state_dict(point.state["modules"][key])
        log.info("Generator and discriminators initialised from %s", point.source)

    @torch.no_grad()
    def features(self, batch):
        return self.adapted(batch["noisy_input"])

    def sample_inputs(self, index, clean_in):
        noisy, _ = degrade(
            clean_in,
            self.cfg.ssl.sample_rate,
            self.cfg.degradation,
            sample_rng(int(self.cfg.seed), 0, index, VAL_STREAM),
        )
        return {"noisy_input": noisy[None]}, {"degraded": noisy}


if __name__ == "__main__":
    main(FinetuneVocoder)
