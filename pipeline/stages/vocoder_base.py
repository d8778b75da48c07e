"""What pretrain_vocoder and finetune_vocoder share: HiFi-GAN on frozen encoder features (docs/architecture.md, Models).

A stage subclass says only where the features come from (the clean waveform through the frozen
encoder, or the degraded waveform through the encoder with trained adapters). Everything else is
here: the generator and both discriminators with their two optimizers and schedulers, the GAN
step, the validation mel loss, the data and the listening page.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from pipeline.config import DataConfig, DegradationConfig, EncoderConfig, TrainConfig, VocoderConfig, VocoderLossConfig
from pipeline.data.corpus import Utterance, corpus_dataset, load_corpus_audio, read_corpus
from pipeline.data.datasets import TRAIN_STREAM, VAL_STREAM, ShuffledBatches
from pipeline.data.degrade import degrade, sample_rng
from pipeline.engine import tags as tag
from pipeline.engine.stage import Stage
from pipeline.inference.listening import Example, safe_name, write_listening_page
from pipeline.models.encoder import encoder_geometry, window
from pipeline.models.hifigan import CenteredMelSpectrogram, build_vocoder, generator_hop, validate_preset
from pipeline.models.losses import discriminator_loss, generator_loss, log_mel, mel_l1

log = logging.getLogger(__name__)


@dataclass
class VocoderTrainConfig(TrainConfig):
    """Fields shared by pretrain_vocoder and finetune_vocoder."""

    ssl: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen encoder whose features are vocoded
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    loss: VocoderLossConfig = field(default_factory=VocoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)


class VocoderExamples(Dataset):
    """Aligned crops keyed by (epoch, index): ``frames`` feature frames of encoder input (with the
    front end's context on both sides, so the encoder yields exactly ``frames`` frames centred on
    the target) and the clean target waveform at the output rate. With a degradation, also a
    degraded copy of the encoder input, drawn from the same (seed, epoch, index) generator as the
    crop, so an example is the same after any resume and in any DataLoader worker.

    Training crops start at a seeded random frame; validation crops are the middle of the utterance.
    """

    def __init__(
        self,
        waves_in: list[torch.Tensor],
        waves_out: list[torch.Tensor],
        frames: int,
        hop_in: int,
        hop_out: int,
        context: tuple[int, int],
        sample_rate_in: int,
        seed: int,
        train: bool,
        degradation: DegradationConfig | None = None,
    ):
        self.waves_in, self.waves_out = waves_in, waves_out
        self.frames, self.hop_in, self.hop_out, self.context = frames, hop_in, hop_out, context
        self.sample_rate_in, self.seed, self.train, self.degradation = sample_rate_in, seed, train, degradation

    def __len__(self) -> int:
        return len(self.waves_in)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = sample_rng(self.seed, epoch if self.train else 0, index, TRAIN_STREAM if self.train else VAL_STREAM)
        available = min(self.waves_in[index].numel() // self.hop_in, self.waves_out[index].numel() // self.hop_out)
        spare = max(available - self.frames, 0)
        start = int(rng.integers(spare + 1)) if self.train else spare // 2
        left, right = self.context
        clean_in = window(self.waves_in[index], start * self.hop_in - left, self.frames * self.hop_in + left + right)
        item = {
            "clean_input": clean_in,
            "target": window(self.waves_out[index], start * self.hop_out, self.frames * self.hop_out),
            "index": torch.tensor(index),
        }
        if self.degradation is not None:
            item["noisy_input"], _ = degrade(clean_in, self.sample_rate_in, self.degradation, rng)
        return item


class VocoderStage(Stage):
    """HiFi-GAN training on features of a frozen encoder. Subclasses provide the features."""

    schema: type = object
    architecture_keys = ("ssl.", "vocoder.")
    architecture_exempt = ("ssl.weights",)
    val_metric_names = ("val/loss", "val/mel")
    parallel_modules = ("generator", "mpd", "msd")  # under torchrun, each in DDP
    uses_degradation = False  # finetune: the encoder input is degraded on the fly

    # --- to implement ---------------------------------------------------------------------------
    def build_feature_extractor(self) -> None:
        """Create the frozen feature extractor (never trained, never saved)."""
        raise NotImplementedError

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, frames, ssl.embed_dim) features the generator vocodes."""
        raise NotImplementedError

    def load_initial_weights(self) -> None:
        """Optional: start from trained weights (finetune)."""

    # --- description ----------------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        c = self.cfg
        return {
            tag.MODEL: c.vocoder.generator,  # hifigan | vocos
            tag.DATASET: c.data.name,
            tag.MODEL_PRESET: c.vocoder.name,
            tag.ENCODER: c.ssl.name,
            tag.ENCODER_LAYER: str(c.ssl.layer),
        }

    def model_args(self) -> dict[str, Any]:
        return {"ssl": OmegaConf.to_container(self.cfg.ssl), "vocoder": OmegaConf.to_container(self.cfg.vocoder)}

    # --- parts ----------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        self.hop_in, receptive = encoder_geometry(cfg.ssl)
        validate_preset(cfg.vocoder, cfg.ssl.sample_rate / self.hop_in)
        self.hop_out = generator_hop(cfg.vocoder)
        extra = receptive - self.hop_in
        self.context = (extra // 2, extra - extra // 2)
        self.build_feature_extractor()
        generator, mpd, msd = build_vocoder(cfg.ssl.embed_dim, cfg.vocoder)
        self.generator, self.mpd, self.msd = generator.to(self.device), mpd.to(self.device), msd.to(self.device)
        self.modules = {"generator": self.generator, "mpd": self.mpd, "msd": self.msd}
        self.optimizers = {
            "generator": self.make_optimizer(self.generator.parameters()),
            "discriminator": self.make_optimizer(
                self.discriminator_parameters(), cfg.loss.discriminator_lr or cfg.optim.lr
            ),
        }
        self.schedulers = {name: self.make_scheduler(opt) for name, opt in self.optimizers.items()}
        if cfg.loss.gan_start_step > 0:  # the discriminators' schedule follows the global step while they wait
            warnings.filterwarnings(
                "ignore", message=r"Detected call of `lr_scheduler.step\(\)` before", category=UserWarning
            )
        self.mel = self._mel_transform().to(self.device)
        self.load_initial_weights()
        self._build_data()
        log.info(
            "%s: generator %.2f M, discriminators %.2f M parameters; %d training and %d validation utterances",
            self.name,
            _millions(self.generator),
            _millions(self.mpd) + _millions(self.msd),
            len(self.train_set),
            len(self.val_set),
        )

    def discriminator_parameters(self):
        return chain(self.mpd.parameters(), self.msd.parameters())

    def _mel_transform(self) -> CenteredMelSpectrogram:
        loss = self.cfg.loss
        return CenteredMelSpectrogram(
            sample_rate=self.cfg.vocoder.sample_rate,
            n_fft=loss.n_fft,
            win_length=loss.win_length,
            hop_length=loss.hop_length,
            f_min=loss.f_min,
            f_max=loss.f_max,
            n_mels=loss.n_mels,
            power=1.0,
            norm="slaney",
            mel_scale="slaney",
        )

    def _build_data(self) -> None:
        cfg = self.cfg
        rate_in, rate_out = cfg.ssl.sample_rate, cfg.vocoder.sample_rate
        utterances, waves_in = load_corpus_audio(
            read_corpus(cfg.data.format, cfg.data.root, cfg.data.subsets),
            rate_in,
            max_clipped_fraction=cfg.data.max_clipped_fraction,
        )
        self.training_data = corpus_dataset(cfg.data.name, cfg.data.root, utterances)
        waves_out = waves_in if rate_out == rate_in else load_corpus_audio(utterances, rate_out)[1]
        if len(waves_in) <= cfg.data.val_size:
            raise ValueError(
                f"data.val_size={cfg.data.val_size} leaves no training utterances ({len(waves_in)} usable)"
            )
        frames = max(int(round(cfg.data.segment_seconds * rate_in / self.hop_in)), 1)
        split = len(waves_in) - cfg.data.val_size
        common = dict(
            frames=frames,
            hop_in=self.hop_in,
            hop_out=self.hop_out,
            context=self.context,
            sample_rate_in=rate_in,
            seed=int(cfg.seed),
            degradation=cfg.degradation if self.uses_degradation else None,
        )
        self.train_set = VocoderExamples(waves_in[:split], waves_out[:split], train=True, **common)
        self.train_source = ShuffledBatches(self.train_set, int(cfg.seed), pin_memory=self.device.type == "cuda")
        self.val_set = VocoderExamples(waves_in[split:], waves_out[split:], train=False, **common)
        self.val_utterances: list[tuple[Utterance, torch.Tensor, torch.Tensor]] = list(
            zip(utterances[split:], waves_in[split:], waves_out[split:])
        )

    # --- the step -------------------------------------------------------------------------------
    def _discriminate(self, wave: torch.Tensor, training: bool = False):
        """Scores and feature maps of both discriminators, concatenated (MPD first). ``training``: the
        discriminators' own step, whose gradients DDP averages over the ranks."""
        mpd, msd = (self.ddp(self.mpd), self.ddp(self.msd)) if training else (self.mpd, self.msd)
        scores_p, maps_p = mpd(wave)
        scores_s, maps_s = msd(wave)
        return scores_p + scores_s, maps_p + maps_s

    def compute_loss(self, batch):
        """Validation: the log-mel L1 of the generated waveform against the clean one."""
        fake = self.generator(self.features(batch))
        mel = mel_l1(fake, batch["target"], self.mel)
        return mel, {"mel": mel}

    def training_step(self, batch):
        target = batch["target"]
        fake = self.ddp(self.generator)(self.features(batch))
        if self.step < self.cfg.loss.gan_start_step:
            return self._warm_up_step(fake, target)
        real_scores, _ = self._discriminate(target, training=True)
        fake_scores, _ = self._discriminate(fake.detach(), training=True)
        d_loss, d_parts = discriminator_loss(real_scores, fake_scores)
        d_norm = self.optimize(
            d_loss, self.optimizers["discriminator"], self.discriminator_parameters(), update_scaler=False
        )

        # the generator's step: gradients flow through, not into, them (so not through their DDP wrappers)
        self.mpd.requires_grad_(False)
        self.msd.requires_grad_(False)
        try:
            with torch.no_grad():
                _, real_maps = self._discriminate(target)
            fake_scores, fake_maps = self._discriminate(fake)
            mel = mel_l1(fake, target, self.mel)
            loss = self.cfg.loss
            g_loss, g_parts = generator_loss(
                fake_scores,
                real_maps,
                fake_maps,
                mel,
                adv_weight=loss.adv_weight,
                fm_weight=loss.fm_weight,
                mel_weight=loss.mel_weight,
            )
            g_norm = self.optimize(g_loss, self.optimizers["generator"], self.generator.parameters())
        finally:
            self.mpd.requires_grad_(True)
            self.msd.requires_grad_(True)
        return {
            "train/loss": g_loss.detach(),
            **{f"train/{k}": v.detach() for k, v in g_parts.items()},
            "train/d_loss": d_loss.detach(),
            **{f"train/d_{k}": v.detach() for k, v in d_parts.items()},
            "grad_norm/generator": g_norm,
            "grad_norm/discriminator": d_norm,
        }

    def _warm_up_step(self, fake: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Before ``loss.gan_start_step``: the generator on the weighted mel loss alone (HiFi-GAN's mel term, so
        ``train/loss`` continues at the same scale); the discriminators do not run."""
        mel = mel_l1(fake, target, self.mel)
        loss = self.cfg.loss.mel_weight * mel
        g_norm = self.optimize(loss, self.optimizers["generator"], self.generator.parameters())
        return {"train/loss": loss.detach(), "train/mel": mel.detach(), "grad_norm/generator": g_norm}

    # --- samples --------------------------------------------------------------------------------
    def sample_inputs(
        self, index: int, clean_in: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """For the listening page: (batch for ``features``, extra audio at the encoder rate to show)."""
        return {"clean_input": clean_in[None]}, {}

    def write_samples(self, out_dir: Path, step: int) -> None:
        """Clean, generated (and degraded) audio of a few validation utterances, log-mel plots and an
        HTML page that plays them."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rate_in, rate_out = self.cfg.ssl.sample_rate, self.cfg.vocoder.sample_rate
        examples = []
        for index, (utt, wave_in, wave_out) in enumerate(self.val_utterances[: self.cfg.validation.num_samples]):
            frames = min(wave_in.numel() // self.hop_in, wave_out.numel() // self.hop_out)
            left, right = self.context
            clean_in = window(wave_in, -left, frames * self.hop_in + left + right)
            inputs, extra = self.sample_inputs(index, clean_in)
            fake = self.generator(self.features({k: v.to(self.device) for k, v in inputs.items()}))[0].float().cpu()
            clean = wave_out[: frames * self.hop_out]
            name = safe_name(Path(utt.id).name)
            panels = {
                label: log_mel(audio[None].to(self.device), self.mel)[0].cpu()
                for label, audio in (("clean", clean), ("generated", fake))
            }
            distance = float((panels["clean"] - panels["generated"]).abs().mean())
            fig, axes = plt.subplots(len(panels), 1, figsize=(8, 4), sharex=True)
            for ax, (title, spec) in zip(axes, panels.items()):
                ax.imshow(spec.numpy(), aspect="auto", origin="lower", interpolation="nearest")
                ax.set_title(f"{title} (log-mel)", fontsize=9)
            fig.suptitle(f"{name} · step {step} · mel L1 {distance:.3f}")
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}_mel.png", dpi=80)
            plt.close(fig)
            audio = {label: wave[left : wave.numel() - right] for label, wave in extra.items()}
            examples.append(
                Example(
                    name,
                    utt.text,
                    {**audio, "clean": clean, "generated": fake},
                    f"log-mel L1 of the generated waveform: {distance:.4f}",
                    [f"{name}_mel.png"],
                    rates={**{label: rate_in for label in audio}, "clean": rate_out, "generated": rate_out},
                )
            )
        write_listening_page(out_dir, f"{self.name} · validation samples at step {step}", examples, rate_out)


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
