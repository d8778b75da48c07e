"""Self-supervised speech encoders (torchaudio's Wav2Vec2Model family) built from presets.

Only the first ``layer`` transformer layers are ever built and run. Pretrained weights come from
local paths only: a torchaudio state dict file (``torch.save(model.state_dict())``) or a Hugging
Face checkpoint directory (``config.json`` + weights), which is converted with torchaudio's own
importer and needs the optional ``transformers`` package. A Hugging Face ``config.json`` is checked
against the preset field by field before anything loads (docs/encoders.md).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchaudio.models import Wav2Vec2Model, wav2vec2_model, wavlm_model
from torchaudio.models.wav2vec2.wavlm_attention import WavLMSelfAttention

from pipeline.config import EncoderConfig
from pipeline.models.frontend import LogMelFrontEnd, build_log_mel

log = logging.getLogger(__name__)


LOGMEL = "logmel"  # ssl.family of the parameter-free log-mel front end (pipeline/models/frontend.py)


class WeightsError(ValueError):
    """Pretrained weights that cannot be loaded into the chosen preset."""


def build_encoder(cfg: EncoderConfig) -> Wav2Vec2Model:
    """A randomly initialised encoder with the first ``cfg.layer`` layers, dropout off."""
    if not 1 <= cfg.layer <= cfg.num_layers:
        raise ValueError(f"ssl.layer={cfg.layer} must be between 1 and ssl.num_layers={cfg.num_layers}")
    common = dict(
        extractor_mode=cfg.extractor_mode,
        extractor_conv_layer_config=[tuple(c) for c in cfg.conv_layers],
        extractor_conv_bias=cfg.conv_bias,
        encoder_embed_dim=cfg.embed_dim,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=cfg.pos_conv_kernel,
        encoder_pos_conv_groups=cfg.pos_conv_groups,
        encoder_num_layers=cfg.layer,
        encoder_num_heads=cfg.num_heads,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=cfg.ff_interm_features,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=cfg.layer_norm_first,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )
    if cfg.family == "wavlm":
        return wavlm_model(encoder_num_buckets=cfg.num_buckets, encoder_max_distance=cfg.max_distance, **common)
    if cfg.family in ("hubert", "wav2vec2"):
        return wav2vec2_model(**common)
    raise ValueError(f"unknown encoder family {cfg.family!r}; known: hubert, wavlm, wav2vec2, logmel")


def _read_state_dict(path: Path, cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path} is a directory without config.json: not a Hugging Face checkpoint")
        return _import_huggingface(path, cfg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers, so "
            "loading it could run code (a fairseq or other training checkpoint?). Use a torchaudio state dict "
            "(torch.save(model.state_dict())) or a Hugging Face checkpoint directory; a fairseq checkpoint "
            "converts to one with transformers' HuBERT/wav2vec 2.0 conversion scripts, in an environment where "
            f"you trust the file. ({str(err).splitlines()[-1][:200]})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise WeightsError(f"cannot read encoder weights {path}: {err}") from err
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if any(k.startswith(FAIRSEQ_PREFIXES) for k in state):
        raise WeightsError(
            f"{path} has fairseq key names (e.g. {next(k for k in state if k.startswith(FAIRSEQ_PREFIXES))!r}); "
            "fairseq checkpoints are not read directly. Convert it to a Hugging Face directory with "
            "transformers' conversion script and set ssl.weights to that directory."
        )
    return state


# Key prefixes of fairseq's wav2vec 2.0 / HuBERT state dicts (torchaudio's start with "encoder." or
# "feature_extractor.")
FAIRSEQ_PREFIXES = ("w2v_model.", "encoder.layers.", "post_extract_proj.", "label_embs_concat", "final_proj.")

# Hugging Face config.json field -> (EncoderConfig field, how the HF value reads in our terms).
# Shapes alone cannot tell these apart: a pre-norm checkpoint loads into a post-norm preset (or
# GELU into another activation) without a single shape error and gives wrong features.
HF_ARCHITECTURE_FIELDS = {
    "do_stable_layer_norm": ("layer_norm_first", bool),
    "feat_extract_norm": ("extractor_mode", lambda v: f"{v}_norm"),
    "conv_bias": ("conv_bias", bool),
    "num_conv_pos_embeddings": ("pos_conv_kernel", int),
    "num_conv_pos_embedding_groups": ("pos_conv_groups", int),
    "hidden_size": ("embed_dim", int),
    "num_attention_heads": ("num_heads", int),
    "intermediate_size": ("ff_interm_features", int),
    "num_hidden_layers": ("num_layers", int),
}
HF_WAVLM_FIELDS = {"num_buckets": ("num_buckets", int), "max_bucket_distance": ("max_distance", int)}
HF_FAMILIES = {"hubert": "hubert", "wavlm": "wavlm", "wav2vec2": "wav2vec2"}  # config.json model_type -> family


def check_huggingface_config(hf_config: Any, cfg: EncoderConfig, path: Path) -> None:
    """Refuse a Hugging Face model whose architecture differs from the ssl preset, naming every field."""
    problems = []
    family = HF_FAMILIES.get(getattr(hf_config, "model_type", None))
    if family != cfg.family:
        problems.append(f"model_type={getattr(hf_config, 'model_type', None)!r} vs ssl.family={cfg.family!r}")
    fields = dict(HF_ARCHITECTURE_FIELDS, **(HF_WAVLM_FIELDS if cfg.family == "wavlm" else {}))
    for hf_key, (key, convert) in fields.items():
        theirs, ours = convert(getattr(hf_config, hf_key)), getattr(cfg, key)
        if theirs != ours:
            problems.append(f"{hf_key}={getattr(hf_config, hf_key)!r} vs ssl.{key}={ours!r}")
    conv = [list(c) for c in zip(hf_config.conv_dim, hf_config.conv_kernel, hf_config.conv_stride)]
    if conv != [list(c) for c in cfg.conv_layers]:
        problems.append(
            f"conv_dim/conv_kernel/conv_stride={conv} vs ssl.conv_layers={list(map(list, cfg.conv_layers))}"
        )
    # What torchaudio's Wav2Vec2Model always does; a model that differs cannot be represented at all.
    for hf_key, wanted in (
        ("hidden_act", "gelu"),
        ("feat_extract_activation", "gelu"),
        ("conv_pos_batch_norm", False),
        ("feat_proj_layer_norm", True),
    ):
        value = getattr(hf_config, hf_key, wanted)
        if value != wanted:
            problems.append(f"{hf_key}={value!r} (the encoder supports only {wanted!r})")
    if problems:
        raise WeightsError(
            f"the Hugging Face model in {path} does not match the ssl preset {cfg.name!r}: "
            + "; ".join(problems)
            + ". Choose the preset of this model (or override the ssl.* fields named) before loading it."
        )


def huggingface_config(cfg: EncoderConfig) -> Any:
    """The transformers config (HubertConfig, WavLMConfig, Wav2Vec2Config) of the preset's architecture."""
    import transformers

    common = dict(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ff_interm_features,
        conv_dim=[c[0] for c in cfg.conv_layers],
        conv_kernel=[c[1] for c in cfg.conv_layers],
        conv_stride=[c[2] for c in cfg.conv_layers],
        conv_bias=cfg.conv_bias,
        num_conv_pos_embeddings=cfg.pos_conv_kernel,
        num_conv_pos_embedding_groups=cfg.pos_conv_groups,
        feat_extract_norm=cfg.extractor_mode.split("_")[0],
        do_stable_layer_norm=cfg.layer_norm_first,
    )
    if cfg.family == "wavlm":
        return transformers.WavLMConfig(num_buckets=cfg.num_buckets, max_bucket_distance=cfg.max_distance, **common)
    if cfg.family == "wav2vec2":
        return transformers.Wav2Vec2Config(**common)
    return transformers.HubertConfig(**common)


def _import_huggingface(path: Path, cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as err:
        raise WeightsError(
            f"{path} is a Hugging Face checkpoint; importing it needs the optional package "
            "'transformers' (pip install transformers)"
        ) from err
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"cannot read the Hugging Face config in {path}: {err}") from err
    check_huggingface_config(hf_config, cfg, path)
    hf_model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    # (torchaudio warns that a bare encoder has no CTC head to import: nothing is missing for us)
    logging.getLogger("torchaudio.models.wav2vec2.utils.import_huggingface").setLevel(logging.ERROR)
    return import_huggingface_model(hf_model.eval()).state_dict()


def load_pretrained(model: Wav2Vec2Model, cfg: EncoderConfig) -> None:
    """Load ``cfg.weights`` into ``model``, skipping layers past ``cfg.layer`` and any head.

    ``encoder.transformer.layer_norm`` is always loaded: with ``layer_norm_first: false`` (HuBERT
    base, mHuBERT-147, WavLM base) torchaudio applies it *before* the first layer, so every
    intermediate feature depends on it; with ``layer_norm_first: true`` it is the final norm, which
    intermediate features never pass through.
    """
    path = Path(cfg.weights).expanduser()
    if not path.exists():
        raise WeightsError(f"encoder weights not found: {path} (set ssl.weights to a local file or directory)")
    state = _read_state_dict(path, cfg)
    layer_key = re.compile(r"^encoder\.transformer\.layers\.(\d+)\.")
    wanted = {}
    for key, value in state.items():
        match = layer_key.match(key)
        if (match and int(match.group(1)) >= cfg.layer) or key.startswith("aux."):
            continue
        wanted[key] = value
    own = model.state_dict()
    missing = sorted(set(own) - set(wanted))
    mismatched = [k for k in wanted if k in own and own[k].shape != wanted[k].shape]
    unexpected = sorted(set(wanted) - set(own))
    if missing or mismatched or unexpected:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected))
            if keys
        )
        raise WeightsError(f"weights in {path} do not fit the ssl preset {cfg.name!r} ({detail})")
    model.load_state_dict(wanted, strict=True)
    log.info("Loaded encoder weights from %s (%d tensors, layers 1..%d)", path, len(wanted), cfg.layer)


RANDOM_INIT_SEED = 0  # every stage that rebuilds a preset without weights gets the same random encoder


def create_encoder(cfg: EncoderConfig) -> Wav2Vec2Model | LogMelFrontEnd:
    """Build the preset and load its pretrained weights when ``ssl.weights`` is set (a log-mel front end has
    none).

    The random initialisation comes from a fixed seed, not from the run's: an encoder without
    pretrained weights (``ssl=tiny``) is then the same in the adapter run and in the vocoder runs
    rebuilt from its preset and layer, whatever seed each run uses.
    """
    if cfg.family == LOGMEL:
        return build_log_mel(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build_encoder(cfg)
    if cfg.weights:
        load_pretrained(model, cfg)
    elif cfg.name != "tiny":
        log.warning("ssl.weights is not set: the %s encoder is randomly initialised", cfg.name)
    return model


def encoder_features(
    model: Wav2Vec2Model | LogMelFrontEnd, wave: torch.Tensor, layer: int, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Output of transformer layer ``layer`` (1-based) for a (batch, samples) waveform (a log-mel front end: its
    frames, ``layer`` unused).

    ``lengths`` (valid samples per item of a zero-padded batch, on ``wave``'s device): each item's valid frames
    are those of its own unpadded run (the frames past them are padding). torchaudio masks the padding in the
    transformer (zeroed before the positional convolution, masked in attention) and a ``layer_norm`` front
    end never mixes frames; what would see the padding runs on equal-length items only, unpadded: a
    ``group_norm`` front end (its GroupNorm normalises over time) and WavLM's layers (torchaudio's WavLM
    attention takes no attention mask).
    """
    if isinstance(model, LogMelFrontEnd):  # frames never mix: the padding reaches only frames past each item's
        return model(wave)
    if lengths is None:
        features, _ = model.extract_features(wave, num_layers=layer)
        return features[-1]
    if any(isinstance(block.attention, WavLMSelfAttention) for block in model.encoder.transformer.layers):
        return by_length(lambda x: encoder_features(model, x, layer), wave, lengths)[0]
    if any(isinstance(block.layer_norm, nn.GroupNorm) for block in model.feature_extractor.conv_layers):
        x, frames = by_length(lambda w: model.feature_extractor(w, None)[0], wave, lengths)
    else:
        x, frames = model.feature_extractor(wave, lengths)
    return model.encoder.extract_features(x, frames, layer)[-1]


def by_length(
    fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` on the items of a zero-padded ``batch`` (time on dimension 1) that have the same ``lengths``,
    together and unpadded; its outputs (time on dimension 1) zero-padded back into one batch in ``batch``'s
    order, with their lengths. For modules whose outputs would depend on the padding."""
    outputs: list[torch.Tensor | None] = [None] * batch.shape[0]
    for length in lengths.unique().tolist():
        items = (lengths == length).nonzero().flatten()
        for item, out in zip(items.tolist(), fn(batch[items, :length])):
            outputs[item] = out
    return pad_sequence(outputs, batch_first=True), torch.tensor([o.shape[0] for o in outputs], device=lengths.device)


def encoder_geometry(ssl: EncoderConfig) -> tuple[int, int]:
    """(hop, receptive field) in input samples of the encoder's convolutional front end (or log-mel analysis)."""
    if ssl.family == LOGMEL:
        return int(ssl.hop_length), int(ssl.n_fft)
    hop, receptive = 1, 1
    for _, kernel, stride in ssl.conv_layers:
        receptive += (kernel - 1) * hop
        hop *= stride
    return hop, receptive


def window(wave: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """``wave[start : start + length]`` with zeros where it reaches outside the waveform."""
    out = wave.new_zeros(length)
    lo, hi = max(start, 0), min(start + length, wave.numel())
    if hi > lo:
        out[lo - start : hi - start] = wave[lo:hi]
    return out
