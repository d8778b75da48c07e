"""train_adapter: make a frozen SSL encoder's features of degraded speech match its features of
the clean speech, by training parallel adapters only (Miipher-2, docs/architecture.md, Models).

    python -m pipeline.stages.train_adapter ssl=tiny trainer.max_steps=200
    mlflow run . -e train_adapter --env-manager local -P overrides="ssl=tiny"
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (
    AdapterConfig,
    DataConfig,
    DegradationConfig,
    EncoderConfig,
    FeatureLossConfig,
    TrainConfig,
    stage_config,
)
from pipeline.data.corpus import corpus_dataset, load_corpus_audio, read_corpus
from pipeline.data.datasets import VAL_STREAM, DegradedPairs, ShuffledBatches
from pipeline.data.degrade import OtherUtterances, degrade, sample_rng
from pipeline.data.shards import ShardPairs, StreamingPairs, read_manifest, shard_dataset
from pipeline.engine import tags as tag
from pipeline.engine.session import main
from pipeline.engine.stage import Stage
from pipeline.inference.listening import Example, safe_name, write_listening_page
from pipeline.models.adapters import build_adapted_encoder
from pipeline.models.losses import SC_MODES, feature_loss


@stage_config("train_adapter")
@dataclass
class TrainAdapterConfig(TrainConfig):
    """train_adapter's config (configs/train_adapter.yaml)."""

    stage: str = "train_adapter"
    ssl: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen encoder
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # the adapters that train
    loss: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)  # what the clean speech goes through


class TrainAdapter(Stage):
    name = "train_adapter"
    schema = TrainAdapterConfig
    architecture_keys = ("ssl.", "adapter.")
    architecture_exempt = ("ssl.weights",)
    val_metric_names = ("val/loss", "val/l1", "val/l2", "val/sc")
    parallel_modules = ("model",)  # under torchrun: the adapters in DDP; the frozen encoder is left out of it

    def tags(self) -> dict[str, str]:
        # training from shards: the dataset is the corpus they were made from
        return {tag.MODEL: self.cfg.ssl.name, tag.DATASET: getattr(self, "dataset_name", self.cfg.data.name)}

    def model_args(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        return {"ssl": OmegaConf.to_container(self.cfg.ssl), "adapter": OmegaConf.to_container(self.cfg.adapter)}

    def build(self) -> None:
        cfg = self.cfg
        if cfg.loss.sc not in SC_MODES:
            raise ValueError(f"loss.sc={cfg.loss.sc!r}; choose one of {', '.join(SC_MODES)}")
        self.model = build_adapted_encoder(cfg.ssl, cfg.adapter).to(self.device)
        self.model.eval()  # the frozen encoder never trains; adapters have no dropout
        self.modules = self.model.trainable_modules()  # adapters (+ trained layer norms): all a checkpoint holds
        optimizer = self.make_optimizer(self.model.trainable_parameters())
        self.optimizers = {"adapters": optimizer}
        self.schedulers = {"adapters": self.make_scheduler(optimizer)}

        segment = int(cfg.data.segment_seconds * cfg.ssl.sample_rate)
        if cfg.data.format == "shards":
            self._build_shard_data(segment)
        else:
            self._build_corpus_data(segment)

    def _build_corpus_data(self, segment: int) -> None:
        """On-the-fly degradation of a corpus held in memory."""
        cfg = self.cfg
        utterances, waves = load_corpus_audio(
            read_corpus(cfg.data.format, cfg.data.root, cfg.data.subsets),
            cfg.ssl.sample_rate,
            max_clipped_fraction=cfg.data.max_clipped_fraction,
        )
        self.training_data = corpus_dataset(cfg.data.name, cfg.data.root, utterances)
        if len(waves) <= cfg.data.val_size:
            raise ValueError(f"data.val_size={cfg.data.val_size} leaves no training utterances ({len(waves)} usable)")
        split = len(waves) - cfg.data.val_size
        common = dict(
            sample_rate=cfg.ssl.sample_rate, segment_samples=segment, degradation=cfg.degradation, seed=int(cfg.seed)
        )
        self.train_set = DegradedPairs(waves[:split], train=True, **common)
        self.train_source = ShuffledBatches(self.train_set, int(cfg.seed), pin_memory=self.device.type == "cuda")
        self.val_set = DegradedPairs(waves[split:], train=False, **common)
        val_waves = waves[split:]
        self.val_examples = []
        for index, utt in enumerate(utterances[split:][: cfg.validation.num_samples]):
            rng = sample_rng(int(cfg.seed), 0, index, VAL_STREAM)
            noisy, params = degrade(
                val_waves[index], cfg.ssl.sample_rate, cfg.degradation, rng, others=OtherUtterances(val_waves, index)
            )
            self.val_examples.append((utt.id, utt.text, val_waves[index], noisy, params))

    def _build_shard_data(self, segment: int) -> None:
        """Pairs written by prepare_data, streamed from a directory or S3."""
        cfg = self.cfg
        if not cfg.data.root:
            raise ValueError("data=shards needs data.root: the prepare_data output (directory or s3://bucket/prefix)")
        manifest = read_manifest(cfg.data.root)
        if manifest["sample_rate"] != cfg.ssl.sample_rate:
            raise ValueError(
                f"the shards at {cfg.data.root} are at {manifest['sample_rate']} Hz but the "
                f"{cfg.ssl.name} encoder takes {cfg.ssl.sample_rate} Hz; run prepare_data with "
                f"sample_rate={cfg.ssl.sample_rate}"
            )
        self.dataset_name = manifest["corpus"]["name"]
        self.training_data = shard_dataset(cfg.data.root, manifest)
        self.train_set = self.train_source = StreamingPairs(cfg.data.root, manifest, segment, int(cfg.seed))
        self.val_set = ShardPairs(cfg.data.root, manifest, "val", segment)
        self.val_examples = [
            (s["key"], s["meta"].get("text", ""), s["clean"], s["noisy"], s["meta"]["degradation"])
            for s in self.val_set.samples[: cfg.validation.num_samples]
        ]

    def compute_loss(self, batch, model=None):
        """The feature loss; ``model`` runs the adapted forward pass (training passes its DDP wrapper)."""
        target = self.model.target_features(batch["clean"])
        pred = (model or self.model)(batch["noisy"])
        return feature_loss(pred.float(), target.float(), sc=self.cfg.loss.sc)

    def training_step(self, batch):
        loss, parts = self.compute_loss(batch, self.ddp(self.model))
        grad_norm = self.optimize(loss, self.optimizers["adapters"], self.model.trainable_parameters())
        return {
            "train/loss": loss.detach(),
            **{f"train/{k}": v.detach() for k, v in parts.items()},
            "grad_norm": grad_norm,
        }

    def write_samples(self, out_dir: Path, step: int) -> None:
        """Clean and degraded audio of a few validation utterances, spectrograms and feature plots."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        examples = []
        for utt_id, text, clean, noisy, params in self.val_examples:
            x_clean, x_noisy = clean[None].to(self.device), noisy[None].to(self.device)
            panels = {
                "clean (target)": self.model.target_features(x_clean)[0],
                "degraded, frozen encoder": self.model.target_features(x_noisy)[0],
                "degraded, with adapters": self.model(x_noisy)[0],
            }
            fig, axes = plt.subplots(len(panels), 1, figsize=(8, 6), sharex=True)
            for ax, (title, feats) in zip(axes, panels.items()):
                ax.imshow(feats.float().cpu().T.numpy(), aspect="auto", origin="lower", interpolation="nearest")
                ax.set_title(title, fontsize=9)
            fig.suptitle(f"{utt_id} · step {step}")
            fig.tight_layout()
            image = f"{safe_name(utt_id)}_features.png"
            fig.savefig(out_dir / image, dpi=80)
            plt.close(fig)
            examples.append(Example(utt_id, text, {"clean": clean, "degraded": noisy}, json.dumps(params), [image]))
        write_listening_page(
            out_dir, f"{self.name} · validation samples at step {step}", examples, self.cfg.ssl.sample_rate
        )


if __name__ == "__main__":
    main(TrainAdapter)
