"""Self-supervised speech encoders (torchaudio's Wav2Vec2Model family) built from presets.

Only the first ``layer`` transformer layers are ever built and run. Pretrained weights come from
local paths only: a torchaudio state dict file (``torch.save(model.state_dict())``) or a Hugging
Face checkpoint directory (``config.json`` + weights), which is converted with torchaudio's own
importer and needs the optional ``transformers`` package.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torchaudio.models import Wav2Vec2Model, wav2vec2_model, wavlm_model

from pipeline.config import EncoderConfig

log = logging.getLogger(__name__)


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
    raise ValueError(f"unknown encoder family {cfg.family!r}; known: hubert, wavlm, wav2vec2")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path} is a directory without config.json: not a Hugging Face checkpoint")
        return _import_huggingface(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def _import_huggingface(path: Path) -> dict[str, torch.Tensor]:
    try:
        from transformers import AutoModel
    except ImportError as err:
        raise WeightsError(
            f"{path} is a Hugging Face checkpoint; importing it needs the optional package "
            "'transformers' (pip install transformers)"
        ) from err
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    hf_model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return import_huggingface_model(hf_model).state_dict()


def load_pretrained(model: Wav2Vec2Model, cfg: EncoderConfig) -> None:
    """Load ``cfg.weights`` into ``model``, skipping layers past ``cfg.layer`` and any head."""
    path = Path(cfg.weights).expanduser()
    if not path.exists():
        raise WeightsError(f"encoder weights not found: {path} (set ssl.weights to a local file or directory)")
    state = _read_state_dict(path)
    layer_key = re.compile(r"^encoder\.transformer\.layers\.(\d+)\.")
    wanted = {}
    for key, value in state.items():
        match = layer_key.match(key)
        if (match and int(match.group(1)) >= cfg.layer) or key.startswith("aux."):
            continue
        if key == "encoder.transformer.layer_norm.weight" or key == "encoder.transformer.layer_norm.bias":
            continue  # final norm after the last layer: not used for intermediate features
        wanted[key] = value
    own = model.state_dict()
    missing = sorted(set(own) - set(wanted) - {"encoder.transformer.layer_norm.weight", "encoder.transformer.layer_norm.bias"})
    mismatched = [k for k in wanted if k in own and own[k].shape != wanted[k].shape]
    unexpected = sorted(set(wanted) - set(own))
    if missing or mismatched or unexpected:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected))
            if keys
        )
        raise WeightsError(f"weights in {path} do not fit the ssl preset {cfg.name!r} ({detail})")
    model.load_state_dict(wanted, strict=False)
    log.info("Loaded encoder weights from %s (%d tensors, layers 1..%d)", path, len(wanted), cfg.layer)


RANDOM_INIT_SEED = 0  # every stage that rebuilds a preset without weights gets the same random encoder


def create_encoder(cfg: EncoderConfig) -> Wav2Vec2Model:
    """Build the preset and load its pretrained weights when ``ssl.weights`` is set.

    The random initialisation comes from a fixed seed, not from the run's: an encoder without
    pretrained weights (``ssl=tiny``) is then the same in the adapter run and in the vocoder runs
    rebuilt from its preset and layer, whatever seed each run uses.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build_encoder(cfg)
    if cfg.weights:
        load_pretrained(model, cfg)
    elif cfg.name != "tiny":
        log.warning("ssl.weights is not set: the %s encoder is randomly initialised", cfg.name)
    return model


def encoder_features(model: Wav2Vec2Model, wave: torch.Tensor, layer: int) -> torch.Tensor:
    """Output of transformer layer ``layer`` (1-based) for a (batch, samples) waveform."""
    features, _ = model.extract_features(wave, num_layers=layer)
    return features[-1]
