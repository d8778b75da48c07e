"""The schema of the shared config groups: dataclasses that stages, models, data and inference read.

A training stage's own top-level config (``TrainAdapterConfig``, ...) extends ``TrainConfig`` and lives beside
its stage in ``pipeline/stages/<stage>.py``; the groups here (``ssl``, ``adapter``, ``data``, ``degradation``,
``vocoder``, ``asr``, ``optim``, ``trainer``, ...) are what several stages and the layers below them share.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncoderConfig:
    """The frozen front end: a torchaudio Wav2Vec2Model-family encoder (HuBERT, WavLM, wav2vec 2.0), or a
    parameter-free log-mel analysis (``family: logmel``, docs/architecture.md, Models)."""

    name: str = "tiny"  # preset name; also the run's `model` tag
    # hubert | wavlm | wav2vec2: which torchaudio builder is used | logmel: a log-mel spectrogram, nothing to load
    family: str = "hubert"
    extractor_mode: str = "group_norm"  # group_norm (base models) | layer_norm (large models)
    # convolutional feature extractor: [channels, kernel, stride] per layer (total stride 320 = 50 fps)
    conv_layers: list[list[int]] = field(default_factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2)
    conv_bias: bool = False
    embed_dim: int = 768  # transformer width; with family=logmel the number of mel bands
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    num_layers: int = 12  # layers of the full pretrained model (only the first `layer` are built)
    num_heads: int = 12
    ff_interm_features: int = 3072
    layer_norm_first: bool = False  # False for base models, True for large/xlarge/WavLM+
    num_buckets: int = 320  # WavLM relative position buckets
    max_distance: int = 800  # WavLM relative position max distance
    layer: int = 6  # 1-based index of the transformer layer whose output is the feature
    weights: str | None = None  # local path: torchaudio state dict file or HF checkpoint dir
    sample_rate: int = 16000  # the encoder's input rate
    n_fft: int = 1024  # family=logmel: analysis window in samples (Hann; frames are not centred)
    hop_length: int = 320  # family=logmel: samples per frame (320 at 16 kHz = 50 frames/s, as the SSL encoders)


@dataclass
class AdapterConfig:
    """Parallel adapters beside the feed-forward blocks of the first L layers.

    The defaults are this project's recipe; ``recipe=atotti_miipher2`` sets the open Miipher-2
    reimplementation's (README, "Adapter recipes").
    """

    num_layers: int | None = None  # L; null = every layer up to `ssl.layer`
    bottleneck: int = 256  # hidden width of LayerNorm -> Linear -> GELU -> Linear
    # normal: output projection ~ N(0, init_std), zero bias | xavier: both projections Xavier-uniform (gain
    # init_gain), zero biases
    init: str = "normal"
    init_std: float = 1.0e-3  # with init=normal: std of the output projection at start (near zero)
    init_gain: float = 0.01  # with init=xavier: gain of both projections
    # the adapter also returns its input, so an adapted layer sees 2h + FF(h) + A(h) (the reimplementation's form)
    residual: bool = False
    # also train each adapted layer's final_layer_norm (the frozen original still makes the clean target)
    train_layer_norms: bool = False
    # With ssl.family=logmel there is no encoder to adapt: a feature cleaner maps degraded log-mel frames to clean
    # ones (the input plus a correction that starts at zero): an input convolution, then ConvNeXt blocks.
    cleaner_blocks: int = 4  # ConvNeXt blocks
    cleaner_dim: int = 256  # their width
    cleaner_kernel: int = 7  # their depthwise convolution's kernel, in frames (odd): the temporal context per block


@dataclass
class FeatureLossConfig:
    """The feature-cleaning loss L1 + L2 + spectral convergence (train_adapter)."""

    # per_example: ||t - p||_F / ||t||_F per example, averaged | pooled_power: sum (p - t)^2 / sum t^2 over the batch
    sc: str = "per_example"


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
    noise_dir: str | None = None  # directory of noise recordings (recursive); null = synthetic only
    noise_dir_prob: float = 1.0  # with noise_dir: chance the noise is a recording rather than noise_types
    # reverberation
    reverb_prob: float = 0.5  # probability of a room impulse response
    rt60_s: list[float] = field(default_factory=lambda: [0.2, 0.8])  # [min, max] RT60 of synthetic RIRs
    rir_dir: str | None = None  # directory of recorded RIRs (cut to start at their peak); null = synthetic
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
    format: str = "ljspeech"  # corpus layout: ljspeech | libritts | libritts_r | jvs | fleurs_r | directory | voices
    root: str | None = None  # corpus directory; null = the embedded demo corpus
    subsets: list[str] = field(default_factory=list)  # LibriTTS subsets, JVS subsets or FLEURS splits; [] = all
    # train_adapter skips files with more than this fraction of samples at full scale (clipped
    # targets); null keeps them. 0.001 = 48 samples in 3 s at 16 kHz.
    max_clipped_fraction: float | None = 0.001
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
    # steps in a row with a non-finite loss or gradient (updates skipped) before the job stops
    max_nonfinite_steps: int = 20
    epochs: int | None = None  # epoch-based stages: train this many epochs (then max_steps is unused)
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
    # local staging area before upload; relative: to where the job (or `main`) was started
    staging_dir: str = ".checkpoints"


@dataclass
class ValidationConfig:
    interval: int = 200  # steps between validations (and one at the end)
    num_samples: int = 2  # audio examples logged per validation


@dataclass
class TrackingConfig:
    experiment: str | None = None  # MLflow experiment; null = the stage name
    run_name: str | None = None  # null = "<first 6 characters of the run ID>-<model>-<dataset>"
    flush_seconds: float = 5.0  # metrics are sent in batches at least this often
    # steps per point of the training metrics: each point is the mean of its steps' values (lr, epoch: the last),
    # logged at the interval's last step, so the chart is exact at its resolution; 1 = every step. A week-long
    # run of 10^6 steps: 100 keeps its store at 10^4 points per metric (docs/benchmarks.md, Cost growth)
    metric_interval: int = 1
    stop_poll_seconds: float = 3.0  # how often the `stop_requested` tag is checked
    lease_heartbeat_seconds: float = 10.0  # how often a job renews its lease on the run (one job per run)
    lease_timeout_seconds: float = 60.0  # a lease not renewed for this long (a dead job) is taken over
    # how long metrics and checkpoints are retried while the tracking or artifact store is unreachable;
    # then the job stops cleanly (exit code 4), its checkpoint staged locally (docs/reliability.md, Outages)
    outage_limit_seconds: float = 900.0
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU)
    log_model: bool = True  # when training finishes, log `model/` (an MLflow model) for stages that have one
    checkpoint_models: bool = True  # each committed checkpoint (and `model/`) is a logged model in the Models tab
    parent_run: str | None = None  # nest the run under this run (sweeps); never takes over MLFLOW_RUN_ID
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
class VocoderConfig:
    """The vocoder: a HiFi-GAN or Vocos-style generator and HiFi-GAN's discriminators (docs/architecture.md, Models).
    Every field is architecture: fixed on resume.

    The generator turns front-end features (50 frames/s for every preset here) into a waveform at ``sample_rate``, so
    its samples per frame (HiFi-GAN: the product of ``upsample_rates``; Vocos: ``vocos_hop``) must be sample_rate /
    the frame rate (320 for 16 kHz, 441 for 22.05 kHz at 50 frames/s).
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
    # generator: hifigan (upsampling convolutions, the fields above) | vocos (Siuzdenko et al. 2023: ConvNeXt blocks
    # at the frame rate predict an STFT's magnitude and phase, inverted by an ISTFT; the fields below). Both use the
    # discriminators above.
    generator: str = "hifigan"
    vocos_hop: int = 320  # vocos: output samples per feature frame (= sample_rate / frame rate)
    vocos_n_fft: int = 1280  # vocos: the ISTFT's window (4 x hop in the paper)
    vocos_dim: int = 256  # vocos: width of the ConvNeXt blocks
    vocos_intermediate: int = 768  # vocos: their inner (pointwise) width
    vocos_layers: int = 6  # vocos: how many blocks


@dataclass
class VocoderLossConfig:
    """GAN losses of HiFi-GAN: least-squares adversarial, feature matching and log-mel L1."""

    adv_weight: float = 1.0  # generator adversarial loss weight
    fm_weight: float = 2.0  # feature matching weight
    mel_weight: float = 45.0  # log-mel L1 weight
    discriminator_lr: float | None = None  # peak LR of the discriminators; null = optim.lr
    # steps before this one train the generator on the mel loss alone (a warm-up; the discriminators neither run
    # nor learn, so those steps cost far less: a tenth with vocoder=tiny)
    gan_start_step: int = 0
    n_fft: int = 1024  # mel loss STFT size
    win_length: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None  # null = half the output rate


@dataclass
class MainConfig:
    """main: the restoration chain, one MLflow run per step (configs/main.yaml)."""

    preset: str = "tiny"  # configs/main/<preset>.yaml: the steps' settings (tiny: minutes on a CPU; quality: ~30 min)
    reuse: bool = True  # reuse a FINISHED run of a step with the same entry point, parameters and code version
    resume: bool = True  # resume a stopped or crashed run of a step (same parameters and code) instead of restarting
    evaluate: list[str] = field(
        default_factory=lambda: ["test_size=4"]
    )  # arguments of the closing evaluate (pipeline/evaluate.py)
    restore_output: str = "restored"  # where the closing restore writes the demo file it restores ("" skips it)
    common: list[str] = field(default_factory=list)  # overrides for every step whose config has the key
    train_adapter: list[str] = field(default_factory=list)  # overrides for that step only
    pretrain_vocoder: list[str] = field(default_factory=list)
    finetune_vocoder: list[str] = field(default_factory=list)
