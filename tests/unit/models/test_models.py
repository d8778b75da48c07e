"""Encoder presets, pretrained-weight loading and parallel adapters."""

import pytest
import torch

from pipeline.config import compose_config
from pipeline.models.adapters import AdaptedEncoder, FeedForwardWithAdapter
from pipeline.models.encoder import WeightsError, build_encoder, create_encoder, encoder_features


def tiny_cfg(**overrides):
    cfg = compose_config("train_adapter", ["ssl=tiny"] + [f"ssl.{k}={v}" for k, v in overrides.items()])
    return cfg.ssl


@pytest.mark.parametrize("preset", ["hubert_base", "mhubert_147", "wavlm_base_plus", "hubert_large"])
def test_full_size_presets_build_only_the_first_layers(preset):
    cfg = compose_config("train_adapter", [f"ssl={preset}", "ssl.layer=1"]).ssl
    model = build_encoder(cfg)
    assert len(model.encoder.transformer.layers) == 1
    assert model.encoder.feature_projection.projection.out_features == cfg.embed_dim


def test_tiny_encoder_runs_at_50_frames_per_second():
    model = build_encoder(tiny_cfg()).eval()
    feats = encoder_features(model, torch.randn(2, 16000), 2)
    assert feats.shape[0] == 2 and 48 <= feats.shape[1] <= 50 and feats.shape[2] == 64


def test_torchaudio_state_dict_file_loads(tmp_path):
    cfg = tiny_cfg(num_layers=4, layer=4)
    source = build_encoder(cfg).eval()
    torch.save(source.state_dict(), tmp_path / "enc.pt")
    loaded = create_encoder(tiny_cfg(num_layers=4, layer=2, weights=str(tmp_path / "enc.pt"))).eval()
    x = torch.randn(1, 8000)
    with torch.no_grad():
        assert torch.allclose(encoder_features(loaded, x, 2), encoder_features(source, x, 2), atol=1e-6)


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(build_encoder(tiny_cfg(embed_dim=32, ff_interm_features=64)).state_dict(), tmp_path / "enc.pt")
    with pytest.raises(WeightsError, match="do not fit the ssl preset 'tiny'"):
        create_encoder(tiny_cfg(weights=str(tmp_path / "enc.pt")))
    with pytest.raises(WeightsError, match="not found"):
        create_encoder(tiny_cfg(weights=str(tmp_path / "missing.pt")))


def test_hugging_face_checkpoint_directory_is_converted(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.HubertConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
    )
    hf_model = transformers.HubertModel(hf_cfg).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    ours = create_encoder(tiny_cfg(weights=str(tmp_path / "hf"), layer=3)).eval()
    x = torch.randn(1, 16000)
    with torch.no_grad():
        expected = hf_model(x, output_hidden_states=True).hidden_states[3]
        got = encoder_features(ours, x, 3)
    assert torch.allclose(got, expected, atol=1e-5)


def test_adapters_wrap_feed_forward_blocks_and_only_they_train():
    cfg = tiny_cfg(num_layers=4, layer=3)
    model = AdaptedEncoder(build_encoder(cfg), layer=3, num_adapter_layers=2, bottleneck=8, init_std=1e-3).eval()
    wrapped = [m for m in model.modules() if isinstance(m, FeedForwardWithAdapter)]
    assert len(wrapped) == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") or ".adapter." in n for n in trainable)
    assert set(model.adapters.state_dict()) == {
        f"{i}.{k}"
        for i in range(2)
        for k in ("norm.weight", "norm.bias", "down.weight", "down.bias", "up.weight", "up.bias")
    }
    x = torch.randn(2, 8000)
    adapted, target = model(x), model.target_features(x)
    assert adapted.shape == target.shape
    assert (adapted - target).abs().max() < 0.1  # near-zero initialisation
    with torch.no_grad():
        model.adapters[0].up.weight.normal_(std=0.5)  # (a constant would vanish in the LayerNorm)
    assert (model(x) - model.target_features(x)).abs().max() > 0.1  # adapters really act
