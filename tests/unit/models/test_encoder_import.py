"""Pretrained encoders load exactly: every parameter randomised, every preset family, every format.

A conversion test with a library's default initialisation (LayerNorm weight 1, bias 0) cannot see a
norm that is dropped or misplaced, so every parameter here is drawn at random first. The reference is
the implementation the weights come from: transformers' ``output_hidden_states`` for a Hugging Face
directory, torchaudio's full model for a torchaudio state dict.
"""

import pytest
import torch
from torchaudio.models.wav2vec2.utils import import_huggingface_model

from pipeline.config import compose_config
from pipeline.models.encoder import WeightsError, build_encoder, create_encoder, encoder_features, huggingface_config

transformers = pytest.importorskip("transformers")

# One small model per preset family, with the preset's shape rules (extractor norm, conv bias, pre- or
# post-norm layers, relative position buckets) and small widths.
FAMILIES = ["hubert_base", "hubert_large", "wavlm_base_plus"]
LAYERS = (1, 3)  # two depths compared, of 4 layers
TOLERANCE = 1e-5


def small_preset(preset: str, **extra):
    overrides = [
        "ssl.embed_dim=32",
        "ssl.num_heads=4",
        "ssl.ff_interm_features=48",
        "ssl.pos_conv_kernel=8",
        "ssl.pos_conv_groups=4",
        "ssl.num_layers=4",
        "ssl.layer=4",
        "ssl.conv_layers=[[16,10,5],[16,3,2],[16,3,2],[16,3,2],[16,3,2],[16,2,2],[16,2,2]]",
    ]
    overrides += [f"ssl.{k}={v}" for k, v in extra.items()]
    return compose_config("train_adapter", [f"ssl={preset}", *overrides]).ssl


def hf_config_for(ssl, **changes):
    """The transformers config of the preset's architecture, with ``changes`` on top."""
    config = huggingface_config(ssl)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter at random: norms around 1 (not 1), biases and gains around 0 (not 0),
    weights scaled by their fan-in so activations stay of order one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.dim() <= 1 or name.endswith("original0") or name.endswith("weight_g"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))


def random_hf_model(ssl, seed=0):
    config = hf_config_for(ssl)
    model = (transformers.WavLMModel if ssl.family == "wavlm" else transformers.HubertModel)(config).eval()
    randomise(model, seed)
    return model


def speech_like(seconds=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(2, int(16000 * seconds), generator=g)


def ours_at(ssl, weights, layer, x):
    ssl.weights, ssl.layer = str(weights), layer
    with torch.no_grad():
        return encoder_features(create_encoder(ssl).eval(), x, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_hugging_face_directory_matches_transformers_at_two_layers(tmp_path, family):
    ssl = small_preset(family)
    hf = random_hf_model(ssl)
    hf.save_pretrained(tmp_path / "hf")
    x = speech_like()
    with torch.no_grad():
        reference = hf(x, output_hidden_states=True).hidden_states
    for layer in LAYERS:
        got = ours_at(ssl, tmp_path / "hf", layer, x)
        assert got.shape == reference[layer].shape
        diff = (got - reference[layer]).abs().max().item()
        assert diff <= TOLERANCE, f"{family} layer {layer}: max abs difference {diff:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_torchaudio_state_dict_matches_transformers_and_torchaudio_at_two_layers(tmp_path, family):
    ssl = small_preset(family)
    hf = random_hf_model(ssl, seed=2)
    full = import_huggingface_model(hf).eval()  # torchaudio's own model with every layer
    torch.save(full.state_dict(), tmp_path / "encoder.pt")
    x = speech_like(seed=3)
    with torch.no_grad():
        reference_hf = hf(x, output_hidden_states=True).hidden_states
        reference_ta, _ = full.extract_features(x)
    for layer in LAYERS:
        got = ours_at(ssl, tmp_path / "encoder.pt", layer, x)
        assert (got - reference_ta[layer - 1]).abs().max().item() <= TOLERANCE
        diff = (got - reference_hf[layer]).abs().max().item()
        assert diff <= TOLERANCE, f"{family} layer {layer}: max abs difference {diff:.3g}"


@pytest.mark.parametrize("family", ["hubert_base", "wavlm_base_plus"])
def test_the_pre_layer_norm_of_post_norm_models_matters(tmp_path, family):
    """The defect this file guards against: for post-norm models (layer_norm_first: false) the encoder's
    layer_norm runs before the first layer; leaving it at 1/0 moves the features far past the tolerance."""
    ssl = small_preset(family)
    full = import_huggingface_model(random_hf_model(ssl, seed=4)).eval()
    torch.save(full.state_dict(), tmp_path / "encoder.pt")
    x = speech_like(seed=5)
    right = ours_at(ssl, tmp_path / "encoder.pt", 2, x)
    with torch.no_grad():
        full.encoder.transformer.layer_norm.reset_parameters()
        dropped, _ = full.extract_features(x, num_layers=2)
    assert (right - dropped[-1]).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize(
    "change, field",
    [
        ({"do_stable_layer_norm": True}, "do_stable_layer_norm"),
        ({"feat_extract_norm": "layer"}, "feat_extract_norm"),
        ({"conv_bias": True}, "conv_bias"),
        ({"num_conv_pos_embeddings": 16}, "num_conv_pos_embeddings"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"num_attention_heads": 2}, "num_attention_heads"),
    ],
)
def test_a_hugging_face_config_that_differs_from_the_preset_is_refused(tmp_path, change, field):
    ssl = small_preset("hubert_base")
    config = hf_config_for(ssl, **change)
    transformers.HubertModel(config).save_pretrained(tmp_path / "hf")
    ssl.weights = str(tmp_path / "hf")
    with pytest.raises(WeightsError, match=f"does not match the ssl preset 'hubert_base'.*{field}="):
        create_encoder(ssl)


def test_a_checkpoint_that_needs_unpickling_is_refused(tmp_path):
    import argparse

    torch.save({"args": argparse.Namespace(arch="hubert"), "model": {}}, tmp_path / "fairseq.pt")
    ssl = small_preset("hubert_base", weights=str(tmp_path / "fairseq.pt"))
    with pytest.raises(WeightsError, match="refusing to load .*could run code"):
        create_encoder(ssl)


def test_fairseq_key_names_are_refused_with_what_to_do(tmp_path):
    torch.save({"model": {"encoder.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2)}}, tmp_path / "fs.pt")
    ssl = small_preset("hubert_base", weights=str(tmp_path / "fs.pt"))
    with pytest.raises(WeightsError, match="fairseq key names .*conversion script"):
        create_encoder(ssl)


def test_layers_past_the_feature_layer_are_not_built_or_needed():
    ssl = small_preset("hubert_base", layer=2)
    assert len(build_encoder(ssl).encoder.transformer.layers) == 2
