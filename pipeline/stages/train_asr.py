"""train_asr: a Conformer CTC recogniser over characters, trained by epochs (docs/architecture.md, Models).

python -m pipeline.stages.train_asr asr=tiny trainer.epochs=20 batch_size=4
python -m pipeline.stages.train_asr resume_run=<run id> trainer.epochs=40 batch_size=8   # more epochs, bigger batch
mlflow run . -e train_asr --env-manager local -P overrides="light=true trainer.epochs=5"
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONFIG_DIR, ConformerConfig, DataConfig, TrainConfig, stage_config
from pipeline.data.audio import AudioError, check_audio, load_audio
from pipeline.data.corpus import Utterance, corpus_dataset, read_corpus
from pipeline.data.datasets import ShuffledBatches, TranscribedSpeech, collate_padded
from pipeline.engine import tags as tag
from pipeline.engine.session import main
from pipeline.engine.stage import Stage
from pipeline.inference.listening import MediaEmbedder
from pipeline.models.asr import CharVocabulary, ConformerCTC, ctc_loss, error_counts, greedy_decode

log = logging.getLogger(__name__)

MODEL_TAG = "conformer"


@stage_config("train_asr")
@dataclass
class TrainAsrConfig(TrainConfig):
    """train_asr's config (configs/train_asr.yaml)."""

    stage: str = "train_asr"
    asr: ConformerConfig = field(default_factory=ConformerConfig)
    data: DataConfig = field(default_factory=DataConfig)  # data.segment_seconds is not used: whole utterances
    light: bool = False  # quick mode: the tiny preset and utterances up to light_max_seconds
    light_max_seconds: float = 2.5  # longest utterance kept in light mode
    max_samples: int | None = None  # train on at most this many utterances; null = all
    max_seconds: float | None = None  # skip utterances longer than this; null = keep all


def preset(name: str) -> DictConfig:
    """An ``asr`` preset from configs/asr/, typed by its schema."""
    return OmegaConf.merge(OmegaConf.structured(ConformerConfig), OmegaConf.load(CONFIG_DIR / "asr" / f"{name}.yaml"))


def select_utterances(
    utterances: list[Utterance], vocab: CharVocabulary, model: ConformerCTC, sample_rate: int, max_seconds: float | None
) -> list[Utterance]:
    """Utterances that can train a CTC model: readable, non-empty, not silent, finite, transcribed, not longer than
    ``max_seconds``, and with enough output frames for their characters. The rest are counted."""
    kept, skipped = [], Counter()
    for utt in utterances:
        try:  # read once: a silent or NaN file must not fail later, mid-epoch
            frames, rate = check_audio(utt.path)
        except AudioError as err:
            skipped[err.reason] += 1
            continue
        seconds = frames / rate
        chars = len(vocab.normalize(utt.text))
        if chars == 0:
            skipped["no transcript"] += 1
        elif max_seconds is not None and seconds > max_seconds:
            skipped[f"longer than {max_seconds:g} s"] += 1
        elif model.output_frames(int(seconds * sample_rate)) < chars:
            skipped["transcript too long for the output frame rate"] += 1
        else:
            kept.append(utt)
    if skipped:
        log.warning("skipped %d of %d utterances: %s", sum(skipped.values()), len(utterances), dict(skipped))
    return kept


class TrainAsr(Stage):
    name = "train_asr"
    schema = TrainAsrConfig
    architecture_keys = ("asr.",)
    val_metric_names = ("val/loss", "val/cer", "val/wer")

    @classmethod
    def resolve_config(cls, cfg: DictConfig) -> DictConfig:
        """``light=true`` means the tiny preset (and short utterances, see ``max_seconds_limit``)."""
        if cfg.light and cfg.asr.name != "tiny":
            log.warning("light=true: using the tiny preset instead of asr=%s", cfg.asr.name)
        if cfg.light:
            cfg.asr = preset("tiny")
        return cfg

    def tags(self) -> dict[str, str]:
        return {tag.MODEL: MODEL_TAG, tag.DATASET: self.cfg.data.name, tag.MODEL_PRESET: self.cfg.asr.name}

    def model_args(self) -> dict[str, Any]:
        return {"asr": OmegaConf.to_container(self.cfg.asr)}

    def export_model(self, checkpoint_dir: Path, out_dir: Path) -> bool:
        from pipeline.inference.asr import save_transcriber

        save_transcriber(checkpoint_dir, out_dir)
        return True

    def max_seconds_limit(self) -> float | None:
        limits = [x for x in (self.cfg.max_seconds, self.cfg.light_max_seconds if self.cfg.light else None) if x]
        return min(limits) if limits else None

    def build(self) -> None:
        cfg = self.cfg
        self.vocab = CharVocabulary(cfg.asr.vocabulary)
        self.model = ConformerCTC(cfg.asr).to(self.device)
        self.modules = {"model": self.model}
        optimizer = self.make_optimizer(self.model.parameters())
        self.optimizers = {"model": optimizer}
        self.schedulers = {"model": self.make_scheduler(optimizer)}

        rate = cfg.asr.sample_rate
        corpus = read_corpus(cfg.data.format, cfg.data.root, cfg.data.subsets)
        usable = select_utterances(corpus, self.vocab, self.model, rate, self.max_seconds_limit())
        if len(usable) <= cfg.data.val_size:
            raise ValueError(f"data.val_size={cfg.data.val_size} leaves no training utterances ({len(usable)} usable)")
        if cfg.max_samples is not None and cfg.max_samples < 1:
            raise ValueError(f"max_samples={cfg.max_samples} must be at least 1 (or null for all)")
        split = len(usable) - cfg.data.val_size
        train = usable[:split][: cfg.max_samples]
        self.val_utterances = usable[split:]
        self.training_data = corpus_dataset(cfg.data.name, cfg.data.root, train + self.val_utterances)
        self.train_set = self._dataset(train)
        self.train_source = ShuffledBatches(self.train_set, int(cfg.seed), pin_memory=self.device.type == "cuda")
        self.val_set = self._dataset(self.val_utterances)
        log.info(
            "train_asr: %d training and %d validation utterances, %d parameters",
            len(train),
            len(self.val_utterances),
            sum(p.numel() for p in self.model.parameters()),
        )

    def _dataset(self, utterances: list[Utterance]) -> TranscribedSpeech:
        return TranscribedSpeech(
            [u.path for u in utterances], [self.vocab.encode(u.text) for u in utterances], self.cfg.asr.sample_rate
        )

    def collate(self, items):
        return collate_padded(items)

    # --- the step, shared by training and validation ------------------------------------------
    def _forward_and_loss(self, batch, model=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CTC loss, log-probabilities and frame counts; ``model`` runs the forward pass (training passes its
        DDP wrapper)."""
        log_probs, frames = (model or self.model)(batch["audio"], batch["audio_lengths"])
        return ctc_loss(log_probs, frames, batch["targets"], batch["target_lengths"]), log_probs, frames

    def _error_counts(self, batch, log_probs, frames) -> dict[str, tuple[int, int]]:
        references = [self.vocab.decode(t[:n].tolist()) for t, n in zip(batch["targets"], batch["target_lengths"])]
        return error_counts(greedy_decode(log_probs.detach(), frames, self.vocab), references)

    def compute_loss(self, batch):
        loss, _, _ = self._forward_and_loss(batch)
        return loss, {}

    def validation_step(self, batch):
        loss, log_probs, frames = self._forward_and_loss(batch)
        return loss, {}, self._error_counts(batch, log_probs, frames)

    def training_step(self, batch):
        loss, log_probs, frames = self._forward_and_loss(batch, self.ddp(self.model))
        grad_norm = self.optimize(loss, self.optimizers["model"], self.model.parameters())
        edits, chars = self._error_counts(batch, log_probs, frames)["cer"]
        return {"train/loss": loss.detach(), "train/cer": edits / max(chars, 1), "grad_norm": grad_norm}

    # --- samples ------------------------------------------------------------------------------
    def write_samples(self, out_dir: Path, step: int) -> None:
        """A few validation utterances: audio, reference and the current greedy transcript."""
        rate = self.cfg.asr.sample_rate
        rows = []
        for utt in self.val_utterances[: self.cfg.validation.num_samples]:
            wave = load_audio(utt.path, rate)
            log_probs, frames = self.model(wave[None].to(self.device), torch.tensor([wave.numel()], device=self.device))
            hypothesis = greedy_decode(log_probs, frames, self.vocab)[0]
            name = Path(utt.id).name
            sf.write(out_dir / f"{name}.wav", wave.numpy(), rate)
            rows.append((name, self.vocab.normalize(utt.text), hypothesis))
        media = MediaEmbedder(out_dir)
        title = f"{self.name} · validation transcripts at step {step}"
        page = [
            f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
            f"<h2>{html.escape(title)}</h2><table border=1>",
            "<tr><th>audio</th><th>reference</th><th>greedy CTC transcript</th></tr>",
        ]
        for name, reference, hypothesis in rows:
            shown = html.escape(hypothesis) if hypothesis else "<i>(empty transcript)</i>"
            page.append(
                f"<tr><td><audio controls preload='metadata' src='{media.src(name + '.wav')}'></audio></td>"
                f"<td>{html.escape(reference)}</td><td>{shown}</td></tr>"
            )
        page.append("</table>" + media.note() + "</body></html>")
        (out_dir / "index.html").write_text("\n".join(page), encoding="utf-8")


if __name__ == "__main__":
    main(TrainAsr)
