"""Structured configuration: dataclass schemas, Hydra composition and override handling.

Every stage's config is a dataclass registered with Hydra's ConfigStore, so a typo in a YAML file
or an override fails at start-up instead of being silently ignored. YAML presets under
``configs/`` fill the schema through defaults lists (``ssl=tiny``, ``data=demo``, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, InterpolationValidationError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Launch arguments (pipeline/engine/launch.py) that configs stored by earlier releases hold as keys;
# dropped when such a config is read back (a resume of an old checkpoint).
LEGACY_LAUNCH_KEYS = ("resume_run", "resume_step", "adapter_run", "vocoder_run", "checkpoint.resume_from")
# Config groups whose options set keys all over the config (`# @package _global_`), for a fresh start.
GLOBAL_GROUPS = ("recipe",)


class ConfigError(ValueError):
    """A configuration or override the user has to fix; the message says what and how."""


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    """A torchaudio Wav2Vec2Model-family encoder (HuBERT, WavLM, wav2vec 2.0)."""

    name: str = "tiny"  # preset name; also the run's `model` tag
    family: str = "hubert"  # hubert | wavlm | wav2vec2: which torchaudio builder is used
    extractor_mode: str = "group_norm"  # group_norm (base models) | layer_norm (large models)
    # convolutional feature extractor: [channels, kernel, stride] per layer (total stride 320 = 50 fps)
    conv_layers: list[list[int]] = field(
        default_factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    )
    conv_bias: bool = False
    embed_dim: int = 768  # transformer width
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    num_layers: int = 12  # layers of the full pretrained model (only the first `layer` are built)
    num_heads: int = 12
    ff_interm_features: int = 3072
    layer_norm_first: bool = False  # False for base models, True for large/xlarge/WavLM+
    num_buckets: int = 320  # WavLM relative position buckets
    max_distance: int = 800  # WavLM relative position max distance
    layer: int = 6  # 1-based index of the transformer layer whose output is the feature
    weights: Optional[str] = None  # local path: torchaudio state dict file or HF checkpoint dir
    sample_rate: int = 16000  # the encoder's input rate


@dataclass
class AdapterConfig:
    """Parallel adapters beside the feed-forward blocks of the first L layers.

    The defaults are this project's recipe; ``recipe=atotti_miipher2`` sets the open Miipher-2
    reimplementation's (README, "Adapter recipes").
    """

    num_layers: Optional[int] = None  # L; null = every layer up to `ssl.layer`
    bottleneck: int = 256  # hidden width of LayerNorm -> Linear -> GELU -> Linear
    init: str = "normal"  # normal: output projection ~ N(0, init_std), zero bias | xavier: both projections Xavier-uniform (gain init_gain), zero biases
    init_std: float = 1.0e-3  # with init=normal: std of the output projection at start (near zero)
    init_gain: float = 0.01  # with init=xavier: gain of both projections
    residual: bool = False  # the adapter also returns its input, so an adapted layer sees 2h + FF(h) + A(h) (the reimplementation's form)
    train_layer_norms: bool = False  # also train each adapted layer's final_layer_norm (the frozen original still makes the clean target)


@dataclass
class FeatureLossConfig:
    """The feature-cleaning loss L1 + L2 + spectral convergence (train_adapter)."""

    sc: str = "per_example"  # per_example: ||t - p||_F / ||t||_F per example, averaged | pooled_power: sum (p - t)^2 / sum t^2 over the batch


@dataclass
class DegradationConfig:
    """On-the-fly degradation (docs/architecture.md, Data); every draw is seeded by (seed, epoch, index).

    Effects run in this order, each with its own probability: reverberation, additive noise, band
    limiting, low sample rate, gain, clipping, mu-law, bit depth, packet loss. ``[min, max]`` pairs
    are sampled uniformly (integers inclusive). The effects added after the first release are off
    here (probability 0), so configs stored in older checkpoints resume unchanged; the presets in
    configs/degradation/ (default, none, strong) turn them on.
    """

    # additive noise at a sampled SNR
    noise_prob: float = 0.9  # probability of additive noise
    noise_types: list[str] = field(default_factory=lambda: ["white", "pink", "brown"])  # + babble | hum
    snr_db: list[float] = field(default_factory=lambda: [5.0, 30.0])  # [min, max] SNR
    babble_speakers: list[int] = field(default_factory=lambda: [3, 6])  # [min, max] other utterances in babble
    hum_hz: list[float] = field(default_factory=lambda: [50.0, 60.0])  # mains frequencies to choose from
    hum_harmonics: list[int] = field(default_factory=lambda: [3, 8])  # [min, max] harmonics (1 = pure tone)
    noise_dir: Optional[str] = None  # directory of noise recordings (recursive); null = synthetic only
    noise_dir_prob: float = 1.0  # with noise_dir: chance the noise is a recording rather than noise_types
    # reverberation
    reverb_prob: float = 0.5  # probability of a room impulse response
    rt60_s: list[float] = field(default_factory=lambda: [0.2, 0.8])  # [min, max] RT60 of synthetic RIRs
    rir_dir: Optional[str] = None  # directory of recorded RIRs (cut to start at their peak); null = synthetic
    rir_dir_prob: float = 1.0  # with rir_dir: chance the RIR is a recording rather than synthetic
    # band limiting / low sample rate
    bandlimit_prob: float = 0.3  # probability of FFT low-pass band limiting
    cutoff_hz: list[float] = field(default_factory=lambda: [2000.0, 6000.0])  # [min, max] cut-off
    lowrate_prob: float = 0.0  # probability of resampling down to a low rate and back up
    low_rates_hz: list[int] = field(default_factory=lambda: [8000, 11025, 12000])  # low rates to choose from
    # level
    gain_prob: float = 0.0  # probability of a gain change
    gain_db: list[float] = field(default_factory=lambda: [-15.0, 6.0])  # [min, max] gain in dB
    clip_prob: float = 0.2  # probability of hard clipping
    clip_ratio: list[float] = field(default_factory=lambda: [0.1, 0.6])  # clip level / peak
    # codec-like quantisation (input beyond [-1, 1] saturates)
    mulaw_prob: float = 0.0  # probability of mu-law companding
    mulaw_bits: list[int] = field(default_factory=lambda: [4, 8])  # [min, max] bits (mu = 2^bits - 1)
    bitdepth_prob: float = 0.0  # probability of uniform bit-depth reduction
    bit_depth: list[int] = field(default_factory=lambda: [4, 12])  # [min, max] bits
    # packet loss
    packet_loss_prob: float = 0.0  # probability of packet loss
    packet_loss_rate: list[float] = field(default_factory=lambda: [0.02, 0.15])  # [min, max] fraction of packets zeroed
    packet_ms: float = 20.0  # packet length in milliseconds


@dataclass
class DataConfig:
    """Where utterances come from and how they are cut into training examples."""

    name: str = "demo"  # dataset name; also the run's `dataset` tag
    format: str = "ljspeech"  # corpus layout: ljspeech | libritts | libritts_r | jvs | fleurs_r | directory
    root: Optional[str] = None  # corpus directory; null = the embedded demo corpus
    subsets: list[str] = field(default_factory=list)  # LibriTTS subsets, JVS subsets or FLEURS splits; [] = all
    # train_adapter skips files with more than this fraction of samples at full scale (clipped
    # targets); null keeps them. 0.001 = 48 samples in 3 s at 16 kHz.
    max_clipped_fraction: Optional[float] = 0.001
    segment_seconds: float = 1.0  # training crop length
    val_size: int = 4  # utterances held out for validation (the last ones of the corpus)
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class OptimConfig:
    lr: float = 1.0e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 to `lr`
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of `lr`
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # total optimizer steps of the job (across all attempts)
    max_nonfinite_steps: int = 20  # steps in a row with a non-finite loss or gradient (updates skipped) before the job stops
    epochs: Optional[int] = None  # epoch-based stages: train this many epochs (then max_steps is unused)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16 | 16-mixed
    deterministic: bool = True  # deterministic kernels, needed for bit-identical resume
    log_interval: int = 10  # steps between console progress lines


@dataclass
class CheckpointConfig:
    save_interval: int = 500  # steps between checkpoints (one is always saved at the end)
    keep_last_n: int = 3  # newest checkpoints kept
    keep_best_k: int = 1  # best checkpoints by `monitor` kept in addition
    monitor: str = "val/loss"  # metric that ranks checkpoints
    mode: str = "min"  # min | max
    staging_dir: str = ".checkpoints"  # local staging area before upload


@dataclass
class ValidationConfig:
    interval: int = 200  # steps between validations (and one at the end)
    num_samples: int = 2  # audio examples logged per validation


@dataclass
class TrackingConfig:
    experiment: Optional[str] = None  # MLflow experiment; null = the stage name
    run_name: Optional[str] = None  # null = "<first 6 characters of the run ID>-<model>-<dataset>"
    flush_seconds: float = 5.0  # metrics are sent in batches at least this often
    stop_poll_seconds: float = 3.0  # how often the `stop_requested` tag is checked
    lease_heartbeat_seconds: float = 10.0  # how often a job renews its lease on the run (one job per run)
    lease_timeout_seconds: float = 60.0  # a lease not renewed for this long (a dead job) is taken over
    # how long metrics and checkpoints are retried while the tracking or artifact store is unreachable;
    # then the job stops cleanly (exit code 4), its checkpoint staged locally (docs/reliability.md, Outages)
    outage_limit_seconds: float = 900.0
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU)
    log_model: bool = True  # when training finishes, log `model/` (an MLflow model) for stages that have one
    checkpoint_models: bool = True  # each committed checkpoint (and `model/`) is a logged model in the Models tab
    parent_run: Optional[str] = None  # nest the run under this run (sweeps); never takes over MLFLOW_RUN_ID
    tags: dict[str, str] = field(default_factory=dict)  # extra tags on a new run


@dataclass
class TrainConfig:
    """Fields shared by every training stage."""

    stage: str = "train"
    seed: int = 1234
    batch_size: int = 8
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class TrainAdapterConfig(TrainConfig):
    stage: str = "train_adapter"
    ssl: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


@dataclass
class PrepareDataConfig:
    """prepare_data: degrade a corpus into WebDataset-style tar shards (local or S3)."""

    stage: str = "prepare_data"
    seed: int = 1234  # seeds every degradation draw: same seed, byte-identical shards
    output: str = "data/shards"  # a directory or s3://bucket/prefix
    variants: int = 2  # degraded versions of each training utterance
    shard_size: int = 256  # samples per shard
    sample_rate: int = 16000  # everything is resampled to this rate, mono
    max_seconds: float = 30.0  # longer utterances are skipped (counted)
    examples: int = 4  # examples on the listening page
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class ConformerConfig:
    """Conformer CTC model: log-mel front end, convolutional subsampling, torchaudio Conformer and a
    linear CTC head over characters (docs/architecture.md, Models). Every field is architecture: fixed on resume."""

    name: str = "small"  # preset name; also the run's `model.preset` tag
    sample_rate: int = 16000  # model input rate; audio is resampled to it
    n_mels: int = 80  # log-mel bins
    n_fft: int = 400  # STFT window (25 ms at 16 kHz)
    hop_length: int = 160  # STFT hop (10 ms at 16 kHz: 100 frames/s before subsampling)
    subsampling_layers: int = 2  # stride-2 conv layers: 2 = 4x fewer frames
    subsampling_channels: int = 144  # channels of the subsampling convolutions
    dim: int = 144  # Conformer width
    num_layers: int = 16  # Conformer blocks
    num_heads: int = 4  # attention heads
    ffn_dim: int = 576  # feed-forward hidden width
    conv_kernel: int = 31  # depthwise convolution kernel (odd)
    dropout: float = 0.1
    vocabulary: str = " 'abcdefghijklmnopqrstuvwxyz"  # output characters; the CTC blank is added as index 0


@dataclass
class TrainAsrConfig(TrainConfig):
    stage: str = "train_asr"
    asr: ConformerConfig = field(default_factory=ConformerConfig)
    data: DataConfig = field(default_factory=DataConfig)  # data.segment_seconds is not used: whole utterances
    light: bool = False  # quick mode: the tiny preset and utterances up to light_max_seconds
    light_max_seconds: float = 2.5  # longest utterance kept in light mode
    max_samples: Optional[int] = None  # train on at most this many utterances; null = all
    max_seconds: Optional[float] = None  # skip utterances longer than this; null = keep all


@dataclass
class VocoderConfig:
    """HiFi-GAN generator and discriminators (docs/architecture.md, Models). Every field is architecture: fixed on resume.

    The generator turns encoder features (50 frames/s) into a waveform at ``sample_rate``, so the
    product of ``upsample_rates`` must be sample_rate / 50 (320 for 16 kHz, 441 for 22.05 kHz).
    """

    name: str = "v1"  # preset name; also the run's `model.preset` tag
    sample_rate: int = 16000  # output rate: 16000, or 22050 with upsample_rates multiplying to 441
    upsample_initial_channel: int = 512  # generator width before the first upsampling (halved at each)
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 4, 2])  # product = sample_rate / 50
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 11, 8, 4])  # one per rate, >= rate
    resblock: str = "1"  # multi-receptive-field block type: "1" (V1/V2) | "2" (V3, lighter)
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    mpd_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])  # multi-period discriminator
    mpd_channels: list[int] = field(default_factory=lambda: [32, 128, 512, 1024, 1024])  # per conv layer
    msd_scales: int = 3  # multi-scale discriminator: raw, /2, /4 average-pooled
    msd_channels: list[int] = field(default_factory=lambda: [128, 128, 256, 512, 1024, 1024, 1024])  # 7 conv layers
    # Optional Conformer blocks between the features and the HiFi-GAN (the open Miipher-2
    # reimplementation's vocoder has 2): Linear(in, conformer_dim) -> Conformer blocks -> Linear(conformer_dim,
    # upsample_initial_channel). 0 = plain HiFi-GAN.
    conformer_layers: int = 0
    conformer_dim: int = 768
    conformer_heads: int = 8
    conformer_ffn_dim: int = 1024
    conformer_kernel: int = 31  # depthwise convolution kernel (odd)
    conformer_dropout: float = 0.1


@dataclass
class VocoderLossConfig:
    """GAN losses of HiFi-GAN: least-squares adversarial, feature matching and log-mel L1."""

    adv_weight: float = 1.0  # generator adversarial loss weight
    fm_weight: float = 2.0  # feature matching weight
    mel_weight: float = 45.0  # log-mel L1 weight
    discriminator_lr: Optional[float] = None  # peak LR of the discriminators; null = optim.lr
    n_fft: int = 1024  # mel loss STFT size
    win_length: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    f_min: float = 0.0
    f_max: Optional[float] = None  # null = half the output rate


@dataclass
class VocoderTrainConfig(TrainConfig):
    """Fields shared by pretrain_vocoder and finetune_vocoder."""

    ssl: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen encoder whose features are vocoded
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    loss: VocoderLossConfig = field(default_factory=VocoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class PretrainVocoderConfig(VocoderTrainConfig):
    stage: str = "pretrain_vocoder"


@dataclass
class FinetuneVocoderConfig(VocoderTrainConfig):
    """ssl and adapter come from the `adapter_run=` run's checkpoint, vocoder from the `vocoder_run=` run's
    (launch arguments, pipeline/engine/launch.py)."""

    stage: str = "finetune_vocoder"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # filled from the adapter run
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


@dataclass
class MainConfig:
    """main: the restoration chain, one MLflow run per step (configs/main.yaml)."""

    reuse: bool = True  # reuse a FINISHED run of a step with the same entry point, parameters and code version
    resume: bool = True  # resume a stopped or crashed run of a step (same parameters and code) instead of restarting
    evaluate: list[str] = field(default_factory=lambda: ["test_size=4"])  # arguments of the closing evaluate (pipeline/evaluate.py)
    restore_output: str = "restored"  # where the closing restore writes the demo file it restores ("" skips it)
    common: list[str] = field(default_factory=list)  # overrides for every step whose config has the key
    train_adapter: list[str] = field(default_factory=list)  # overrides for that step only
    pretrain_vocoder: list[str] = field(default_factory=list)
    finetune_vocoder: list[str] = field(default_factory=list)


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_adapter_schema", node=TrainAdapterConfig)
    cs.store(name="prepare_data_schema", node=PrepareDataConfig)
    cs.store(name="train_asr_schema", node=TrainAsrConfig)
    cs.store(name="pretrain_vocoder_schema", node=PretrainVocoderConfig)
    cs.store(name="finetune_vocoder_schema", node=FinetuneVocoderConfig)
    cs.store(group="vocoder", name="schema", node=VocoderConfig)
    cs.store(group="asr", name="schema", node=ConformerConfig)
    cs.store(group="ssl", name="schema", node=EncoderConfig)
    cs.store(group="data", name="schema", node=DataConfig)


_register()

# --------------------------------------------------------------------------------------------
# Composition and overrides
# --------------------------------------------------------------------------------------------


def split_overrides(args: list[str] | tuple[str, ...]) -> list[str]:
    """Split command-line words into single overrides.

    ``mlflow run`` passes the ``overrides`` parameter as one quoted word ("a=1 b=2"), so every
    word is split again with shell rules.
    """
    out: list[str] = []
    for arg in args:
        try:
            words = shlex.split(arg)
        except ValueError as err:
            raise ConfigError(f"Malformed override {arg!r}: {err}") from err
        out.extend(words)
    return out


def _parse(overrides: list[str]):
    hint = "Use key=value, e.g. trainer.max_steps=100"
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra raises OverrideParseException with a useful text
        word = getattr(err, "override", None)
        raise ConfigError(f"Malformed override {word!r}: {err}. {hint}" if word else
                          f"Malformed override in {' '.join(map(repr, overrides))}: {err}. {hint}") from err
    for override in parsed:
        if not override.key_or_group:
            raise ConfigError(f"Malformed override {override.input_line!r}: no key. {hint}")
    return parsed


def compose_config(stage: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<stage>.yaml`` with Hydra overrides; errors become ConfigError. Adding keys
    (``+key=v``, ``++key=v``) works only under free-form dict fields (``+tracking.tags.team=asr``):
    the schema's own sections keep exactly their fields, and no key is ever deleted (``~key``)."""
    parsed = _parse(overrides)  # clear message for syntax errors before Hydra's own
    for override in parsed:
        if override.is_delete():
            raise ConfigError(f"Override {override.input_line!r}: deleting keys is not supported; set the key's "
                              "value instead")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=stage, overrides=overrides)
    except Exception as err:
        cause = str(err.__cause__).splitlines()[0] if err.__cause__ is not None else ""  # e.g. not an Integer
        raise ConfigError(f"Invalid configuration override: {err}" + (f" ({cause})" if cause else "")) from err
    finally:
        GlobalHydra.instance().clear()
    for override in parsed:
        if override.is_add() or override.is_force_add():
            parent_key = override.key_or_group.rpartition(".")[0]
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if isinstance(parent, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(parent)):
                raise ConfigError(f"Override {override.input_line!r}: {parent_key or 'the config'} has a fixed set of "
                                  "keys; set an existing key (without '+'), or add under a dict field such as "
                                  "+tracking.tags.<name>=<value>")
    OmegaConf.set_struct(cfg, True)
    return cfg


def accepts(stage: str, word: str) -> bool:
    """Whether ``stage``'s config takes the override ``word``."""
    try:
        compose_config(stage, [word])
    except ConfigError:
        return False
    return True


def route_overrides(words: list[str], stages: tuple[str, ...], what: str) -> dict[str, list[str]]:
    """Overrides for jobs of several stages at once (``main``, ``import_checkpoint``): ``<stage>.key=v``
    goes to that stage only, a plain ``key=v`` to every stage whose config has the key; a word that
    fits none is refused (``what`` names the jobs in the message)."""
    out: dict[str, list[str]] = {stage: [] for stage in stages}
    for word in words:
        stage, _, rest = word.partition(".")
        if stage in stages and rest:
            out[stage].append(rest)
            continue
        targets = [s for s in stages if accepts(s, word)]
        if not targets:
            for stage in stages:  # a key some stage has, with a value it refuses: say what is wrong with it
                if _has_key(stage, word):
                    compose_config(stage, [word])  # raises the schema's message, naming the key and value
            raise ConfigError(f"Override {word!r} fits no {what} ({', '.join(stages)}); "
                              "check the key, or give it to one of them as <stage>.key=value")
        for target in targets:
            out[target].append(word)
    return out


def _has_key(stage: str, word: str) -> bool:
    """Whether ``stage``'s default config has the key (or group) that the override ``word`` sets."""
    key = _parse([word])[0].key_or_group
    return key in group_names() or OmegaConf.select(compose_config(stage, []), key, default=None) is not None


def group_names() -> set[str]:
    """Config groups (sub-directories of configs/) that can be chosen with group=option."""
    return {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}


def apply_overrides(stage: str, base: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply Hydra overrides on top of an existing config (the checkpoint's, on resume).

    ``key=value`` sets a value (type-checked by the schema); ``group=option`` replaces that whole
    node with the option's preset, composed exactly as a fresh start would.
    """
    cfg = base.copy()
    OmegaConf.set_struct(cfg, True)
    groups = group_names()
    for override in _parse(overrides):
        key = override.key_or_group
        if override.is_delete() or override.is_add() or override.is_force_add():
            raise ConfigError(f"Override {override.input_line!r}: adding or deleting keys is not "
                              "supported on resume; set the key's value instead")
        if key in GLOBAL_GROUPS:
            raise ConfigError(f"Override {override.input_line!r}: a {key} sets many keys at once and is chosen on a "
                              "fresh start; on resume the checkpoint's values are the base, so set the keys you "
                              "want to change one by one (e.g. optim.lr=2e-4)")
        if key in groups:
            fresh = compose_config(stage, [override.input_line])
            cfg[key] = fresh[key]
            continue
        try:
            OmegaConf.update(cfg, key, override.value(), merge=True)
        except Exception as err:
            raise ConfigError(f"Invalid override {override.input_line!r}: {err}") from err
    return cfg


def parse_key_values(schema: type, argv: list[str]):
    """``key=value`` words of a non-training entry point (transcribe, restore, evaluate) into an instance of
    the dataclass ``schema``: an empty value means "not given", an unknown key or a wrong type fails with
    ConfigError. Words are taken as given (not split again), so paths with spaces work through ``mlflow run``."""
    words = [w for w in argv if not w.endswith("=")]
    if any("=" not in w for w in words):
        raise ConfigError(f"Expected key=value arguments, got: {' '.join(words)}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(words))
    except Exception as err:
        raise ConfigError(f"Invalid argument: {str(err).splitlines()[0]}") from err
    return schema(**OmegaConf.to_container(cfg))


# meta.json key: true when the checkpoint's config is stored as written (``to_container``); earlier releases stored
# it resolved, so a checkpoint without the key is read back with ``from_container(..., as_written=False)``.
STORED_AS_WRITTEN = "config_as_written"


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as it is logged (params, ``config/config.yaml``), stored (every checkpoint's meta.json),
    hashed and compared on resume: every value as written, so an interpolation (``${oc.env:VAR}``,
    ``${oc.decode:...}``, any resolver, ``${other.key}``) is kept unresolved, since what it resolves to may be
    a secret (the job itself uses the resolved value; a resume resolves it again), and secrets masked
    (``redact``). ``from_container`` reads it back."""
    return redact(OmegaConf.to_container(cfg, resolve=False))


def from_container(stage_schema: type, data: dict[str, Any], as_written: bool = True) -> DictConfig:
    """Rebuild a typed config from a plain dict (e.g. a checkpoint's stored config): by default one stored as
    written (``to_container``); ``as_written=False`` for a config an earlier release stored resolved, in which a
    ``${`` is literal text. Launch arguments that earlier releases stored as keys are dropped
    (``legacy_launch_values`` reads them)."""
    data = {key: value for key, value in data.items() if key not in LEGACY_LAUNCH_KEYS}
    if isinstance(data.get("checkpoint"), dict):
        data["checkpoint"] = {k: v for k, v in data["checkpoint"].items() if k != "resume_from"}
    cfg = OmegaConf.merge(OmegaConf.structured(stage_schema), data if as_written else _literal_strings(data))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _literal_strings(data: Any) -> Any:
    """A config stored resolved (by an earlier release) as OmegaConf input: a ``${`` in a string is literal
    text there, so it is escaped (with the backslashes before it doubled) instead of read as an interpolation."""
    if isinstance(data, dict):
        return {key: _literal_strings(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_literal_strings(value) for value in data]
    if isinstance(data, str) and "${" in data:
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", data)
    return data


def legacy_launch_values(data: dict[str, Any]) -> dict[str, Any]:
    """The launch arguments a config stored by an earlier release holds (e.g. finetune_vocoder's
    ``adapter_run``), by name; values that were not set are left out."""
    flat = flatten(data)
    return {key: flat[key] for key in LEGACY_LAUNCH_KEYS if flat.get(key) not in (None, "")}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(old: DictConfig, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Changed keys -> (old value, new value)."""
    a, b = flatten(to_container(old)), flatten(to_container(new))
    return {
        key: (a.get(key), b.get(key))
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    }


def config_hash(cfg: DictConfig) -> str:
    data = flatten(to_container(cfg))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Values checked at start-up (session.check_settings, on a fresh start and on resume)
# --------------------------------------------------------------------------------------------

# Numbers whose wrong value fails only later (a crop of no samples, a poll loop that never waits, a lease taken
# over while its job lives) or acts silently. A key the stage's config lacks is skipped; so is an unset value.
POSITIVE_KEYS = ("batch_size", "checkpoint.save_interval", "trainer.log_interval", "trainer.max_steps",
                 "trainer.epochs", "trainer.max_nonfinite_steps", "data.segment_seconds", "degradation.packet_ms",
                 "light_max_seconds", "max_seconds", "tracking.outage_limit_seconds",
                 "tracking.stop_poll_seconds", "tracking.lease_heartbeat_seconds", "tracking.lease_timeout_seconds")
AT_LEAST_ZERO_KEYS = ("checkpoint.keep_last_n", "checkpoint.keep_best_k", "validation.interval",
                      "validation.num_samples", "optim.warmup_steps", "optim.grad_clip", "optim.lr",
                      "optim.weight_decay", "optim.min_lr_ratio", "loss.discriminator_lr", "data.val_size",
                      "data.num_workers", "data.max_clipped_fraction", "tracking.flush_seconds")


def check_values(schema: type, cfg: DictConfig) -> None:
    """Refuse, naming the key and what to do, a setting whose interpolation does not resolve and a number out
    of its range (``POSITIVE_KEYS``, ``AT_LEAST_ZERO_KEYS``); ``schema`` gives the defaults the message cites."""
    _check_resolves(cfg)
    defaults = OmegaConf.structured(schema)
    for key in POSITIVE_KEYS + AT_LEAST_ZERO_KEYS:
        value = OmegaConf.select(cfg, key)
        positive = key in POSITIVE_KEYS
        if value is not None and (value <= 0 if positive else value < 0):
            default = OmegaConf.select(defaults, key)
            raise ConfigError(f"{key}={value} must be {'positive' if positive else 'zero or more'}; pass "
                              f"{key}=<a value {'above 0' if positive else 'of 0 or more'}>"
                              + (f" (the default is {default})" if default is not None else " or leave it unset"))
    heartbeat = OmegaConf.select(cfg, "tracking.lease_heartbeat_seconds")
    timeout = OmegaConf.select(cfg, "tracking.lease_timeout_seconds")
    if heartbeat is not None and timeout is not None and timeout <= heartbeat:
        raise ConfigError(f"tracking.lease_timeout_seconds={timeout} must be longer than "
                          f"tracking.lease_heartbeat_seconds={heartbeat}: a lease not renewed within the timeout is "
                          "taken over, so another job could take the run from this live one between two heartbeats; "
                          "raise the timeout or lower the heartbeat")


def _check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves now, not when the job first reads the setting (maybe hours in, or never
    for a setting that is only logged). The message never shows what a setting resolves to: it may be a secret."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        key = err.full_key or "a setting"
        written = flatten(to_container(cfg)).get(key)
        setting = key if written is None else f"{key}={written}"
        reason = ("what it resolves to does not fit the setting's type (not shown: it may be a secret)"
                  if isinstance(err, InterpolationValidationError) else redact(str(err).splitlines()[0]))
        raise ConfigError(f"{setting} cannot be resolved: {reason}. Set what it refers to (e.g. the environment "
                          "variable), or give the value itself") from err


SECRET_WORDS = ("password", "secret", "token", "access_key", "api_key", "credential")
# Environment variables whose value is masked wherever it appears: names with a secret word, "passwd", or ending
# in "key" (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, WANDB_API_KEY, ...), except those that name
# a file or socket holding one (AWS_SHARED_CREDENTIALS_FILE, SSH_AUTH_SOCK): their value is a path.
ENV_SECRET_WORDS = (*SECRET_WORDS, "passwd")
ENV_PATH_SUFFIXES = ("_file", "_path", "_dir", "_sock")
# Shorter values are not looked for: a variable such as HF_HUB_DISABLE_TOKEN=1 would mask every "1".
MIN_SECRET_LENGTH = 8


_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/\s@]+)@")  # scheme, user:password
_SECRET_ASSIGNMENT = re.compile(r"([^\s=]*(?:" + "|".join(SECRET_WORDS) + r")[^\s=]*=)\S+", re.IGNORECASE)


def secret_env_name(name: str) -> bool:
    """Whether the environment variable ``name`` holds a secret (``ENV_SECRET_WORDS``)."""
    lower = name.lower()
    return ((any(word in lower for word in ENV_SECRET_WORDS) or lower.endswith("key"))
            and not lower.endswith(ENV_PATH_SUFFIXES))


def environment_secrets() -> list[str]:
    """The secrets this process's environment holds, longest first: the values of variables named like a secret
    and the passwords of URLs (``scheme://user:password@host``; a token given as the user), each at least
    ``MIN_SECRET_LENGTH`` characters long."""
    found = set()
    for name, value in os.environ.items():
        if secret_env_name(name):
            found.add(value)
        for match in _URL_CREDENTIALS.finditer(value):
            found.add(match.group(2).partition(":")[2] or match.group(2))
    return sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(value: Any) -> Any:
    """``value`` (a config, a list of overrides, a string) as it may be logged: the user:password of a
    URL, the value of a key that names a secret, ``key=value`` words of such keys and any text equal to a
    secret of the environment (``environment_secrets``) become ``***``."""
    return _redact(value, environment_secrets())


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {key: "***" if isinstance(key, str) and any(w in key.lower() for w in SECRET_WORDS)
                and value[key] not in (None, "") else _redact(value[key], secrets) for key in value}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(item, secrets) for item in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return _SECRET_ASSIGNMENT.sub(r"\1***", _URL_CREDENTIALS.sub(r"\1***@", value))
    return value


def mask_secrets(params: dict[str, Any]) -> dict[str, Any]:
    """Params as they may be logged (``redact``)."""
    return redact(dict(params))


class RedactingFilter(logging.Filter):
    """A log handler's filter: every record's text, traceback included, as it may be logged (``redact``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the handler reports it as logging does
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
