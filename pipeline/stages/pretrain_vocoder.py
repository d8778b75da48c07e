"""pretrain_vocoder: HiFi-GAN on clean features of the frozen encoder (docs/architecture.md, Models).

Use the same encoder preset and layer as the adapter the vocoder will serve (finetune_vocoder
checks it).

    python -m pipeline.stages.pretrain_vocoder ssl=tiny vocoder=tiny trainer.max_steps=200
    mlflow run . -e pretrain_vocoder --env-manager local -P overrides="ssl=tiny vocoder=tiny"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import stage_config
from pipeline.engine.session import main
from pipeline.models.encoder import create_encoder, encoder_features
from pipeline.stages.vocoder_base import VocoderStage, VocoderTrainConfig


@stage_config("pretrain_vocoder")
@dataclass
class PretrainVocoderConfig(VocoderTrainConfig):
    """pretrain_vocoder's config (configs/pretrain_vocoder.yaml)."""

    stage: str = "pretrain_vocoder"


class PretrainVocoder(VocoderStage):
    name = "pretrain_vocoder"
    schema = PretrainVocoderConfig

    def build_feature_extractor(self) -> None:
        self.encoder = create_encoder(self.cfg.ssl).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def features(self, batch):
        return encoder_features(self.encoder, batch["clean_input"], self.cfg.ssl.layer)


if __name__ == "__main__":
    main(PretrainVocoder)
