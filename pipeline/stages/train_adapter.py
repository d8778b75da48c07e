"""train_adapter: make a frozen SSL encoder's features of degraded speech match its features of
the clean speech, by training parallel adapters only (Miipher-2, DESIGN §8).

    python -m pipeline.train_adapter ssl=tiny trainer.max_steps=200
    mlflow run . -e train_adapter --env-manager local -P overrides="ssl=tiny"
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from pipeline.config import TrainAdapterConfig
from pipeline.data.corpus import load_corpus_audio, read_corpus
from pipeline.data.datasets import VAL_STREAM, DegradedPairs
from pipeline.data.degrade import OtherUtterances, degrade, sample_rng
from pipeline.engine.session import main
from pipeline.engine.stage import Stage
from pipeline.losses import feature_loss
from pipeline.models.adapters import AdaptedEncoder
from pipeline.models.encoder import create_encoder


class TrainAdapter(Stage):
    name = "train_adapter"
    schema = TrainAdapterConfig
    architecture_keys = ("ssl.", "adapter.")
    architecture_exempt = ("ssl.weights",)
    val_metric_names = ("val/loss", "val/l1", "val/l2", "val/sc")

    def tags(self) -> dict[str, str]:
        return {"model": self.cfg.ssl.name, "dataset": self.cfg.data.name}

    def model_args(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        return {"ssl": OmegaConf.to_container(self.cfg.ssl), "adapter": OmegaConf.to_container(self.cfg.adapter)}

    def build(self) -> None:
        cfg = self.cfg
        num_adapter_layers = cfg.adapter.num_layers or cfg.ssl.layer
        self.model = AdaptedEncoder(
            create_encoder(cfg.ssl), cfg.ssl.layer, num_adapter_layers, cfg.adapter.bottleneck, cfg.adapter.init_std
        ).to(self.device)
        self.model.eval()  # the frozen encoder never trains; adapters have no dropout
        self.modules = {"adapters": self.model.adapters}
        optimizer = torch.optim.AdamW(
            self.model.adapters.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        self.optimizers = {"adapters": optimizer}
        self.schedulers = {"adapters": self.make_scheduler(optimizer)}

        utterances, waves = load_corpus_audio(read_corpus(cfg.data.format, cfg.data.root, cfg.data.subsets),
                                              cfg.ssl.sample_rate, max_clipped_fraction=cfg.data.max_clipped_fraction)
        if len(waves) <= cfg.data.val_size:
            raise ValueError(f"data.val_size={cfg.data.val_size} leaves no training utterances ({len(waves)} usable)")
        split = len(waves) - cfg.data.val_size
        segment = int(cfg.data.segment_seconds * cfg.ssl.sample_rate)
        common = dict(sample_rate=cfg.ssl.sample_rate, segment_samples=segment, degradation=cfg.degradation,
                      seed=int(cfg.seed))
        self.train_set = DegradedPairs(waves[:split], train=True, **common)
        self.val_set = DegradedPairs(waves[split:], train=False, **common)
        self.val_utterances = list(zip(utterances[split:], waves[split:]))

    def compute_loss(self, batch):
        target = self.model.target_features(batch["clean"])
        pred = self.model(batch["noisy"])
        return feature_loss(pred.float(), target.float())

    def training_step(self, batch):
        with self.precision.autocast():
            loss, parts = self.compute_loss(batch)
        grad_norm = self.optimize(loss, self.optimizers["adapters"], self.model.adapters.parameters())
        return {"train/loss": loss.detach(), **{f"train/{k}": v.detach() for k, v in parts.items()},
                "grad_norm": grad_norm}

    @torch.no_grad()
    def write_samples(self, out_dir: Path, step: int) -> None:
        """Clean and degraded audio of a few validation utterances with their feature plots."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rate = self.cfg.ssl.sample_rate
        rows, val_waves = [], [wave for _, wave in self.val_utterances]
        for index, (utt, clean) in enumerate(self.val_utterances[: self.cfg.validation.num_samples]):
            rng = sample_rng(int(self.cfg.seed), 0, index, VAL_STREAM)
            noisy, params = degrade(clean, rate, self.cfg.degradation, rng, others=OtherUtterances(val_waves, index))
            sf.write(out_dir / f"{utt.id}_clean.wav", clean.numpy(), rate)
            sf.write(out_dir / f"{utt.id}_degraded.wav", noisy.clamp(-1, 1).numpy(), rate)
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
            fig.suptitle(f"{utt.id} · step {step}")
            fig.tight_layout()
            fig.savefig(out_dir / f"{utt.id}_features.png", dpi=80)
            plt.close(fig)
            rows.append((utt, params))
        page = [f"<html><body><h2>{self.name} · validation samples at step {step}</h2>"]
        for utt, params in rows:
            page.append(
                f"<h3>{html.escape(utt.id)}: {html.escape(utt.text)}</h3>"
                f"<p>degradation: {html.escape(str(params))}</p>"
                f"<p>clean <audio controls src='{utt.id}_clean.wav'></audio> "
                f"degraded <audio controls src='{utt.id}_degraded.wav'></audio></p>"
                f"<img src='{utt.id}_features.png'>"
            )
        (out_dir / "index.html").write_text("\n".join(page) + "</body></html>", encoding="utf-8")


if __name__ == "__main__":
    main(TrainAdapter)
