"""Print how exactly full-size encoder presets import: every parameter randomised, saved as a Hugging
Face directory and as a torchaudio state dict, loaded through the pipeline, compared with
transformers' hidden states. One JSON line per (preset, format, layer).

    .venv/bin/python scripts/encoder_fidelity.py [--presets mhubert_147 hubert_large wavlm_base_plus]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
import transformers
from torchaudio.models.wav2vec2.utils import import_huggingface_model

from pipeline.config import compose_config
from pipeline.models.encoder import create_encoder, encoder_features


def hf_model_for(ssl) -> torch.nn.Module:
    common = dict(
        hidden_size=ssl.embed_dim, num_hidden_layers=ssl.num_layers, num_attention_heads=ssl.num_heads,
        intermediate_size=ssl.ff_interm_features, conv_dim=[c[0] for c in ssl.conv_layers],
        conv_kernel=[c[1] for c in ssl.conv_layers], conv_stride=[c[2] for c in ssl.conv_layers],
        conv_bias=ssl.conv_bias, num_conv_pos_embeddings=ssl.pos_conv_kernel,
        num_conv_pos_embedding_groups=ssl.pos_conv_groups, feat_extract_norm=ssl.extractor_mode.split("_")[0],
        do_stable_layer_norm=ssl.layer_norm_first,
    )
    if ssl.family == "wavlm":
        config = transformers.WavLMConfig(num_buckets=ssl.num_buckets, max_bucket_distance=ssl.max_distance, **common)
        return transformers.WavLMModel(config).eval()
    return transformers.HubertModel(transformers.HubertConfig(**common)).eval()


def perturb(model: torch.nn.Module) -> None:
    """Every parameter moved off its initial value, as training moves it (norms off 1/0 included)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * p.abs().mean().clamp_min(0.05) * torch.randn(p.shape, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["mhubert_147", "hubert_large", "wavlm_base_plus"])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    x = 0.3 * torch.randn(1, int(16000 * args.seconds), generator=torch.Generator().manual_seed(1))
    for preset in args.presets:
        ssl = compose_config("train_adapter", [f"ssl={preset}"]).ssl
        hf = hf_model_for(ssl)
        perturb(hf)
        with torch.no_grad():
            reference = hf(x, output_hidden_states=True).hidden_states
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(Path(tmp) / "hf")
            torch.save(import_huggingface_model(hf).state_dict(), Path(tmp) / "encoder.pt")
            for fmt, weights in (("huggingface_dir", Path(tmp) / "hf"), ("torchaudio_state_dict", Path(tmp) / "encoder.pt")):
                for layer in sorted({max(ssl.layer - 2, 1), ssl.layer}):
                    ssl.weights, ssl.layer = str(weights), layer
                    with torch.no_grad():
                        got = encoder_features(create_encoder(ssl).eval(), x, layer)
                    diff = (got - reference[layer]).abs()
                    print(json.dumps({"preset": preset, "format": fmt, "layer": layer,
                                      "max_abs_diff": float(diff.max()), "feature_abs_mean": float(reference[layer].abs().mean())}),
                          flush=True)


if __name__ == "__main__":
    main()
