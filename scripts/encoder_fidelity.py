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
from pipeline.models.encoder import create_encoder, encoder_features, huggingface_config


def hf_model_for(ssl) -> torch.nn.Module:
    config = huggingface_config(ssl)
    return (transformers.WavLMModel if ssl.family == "wavlm" else transformers.HubertModel)(config).eval()


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
            for fmt, weights in (
                ("huggingface_dir", Path(tmp) / "hf"),
                ("torchaudio_state_dict", Path(tmp) / "encoder.pt"),
            ):
                for layer in sorted({max(ssl.layer - 2, 1), ssl.layer}):
                    ssl.weights, ssl.layer = str(weights), layer
                    with torch.no_grad():
                        got = encoder_features(create_encoder(ssl).eval(), x, layer)
                    diff = (got - reference[layer]).abs()
                    print(
                        json.dumps(
                            {
                                "preset": preset,
                                "format": fmt,
                                "layer": layer,
                                "max_abs_diff": float(diff.max()),
                                "feature_abs_mean": float(reference[layer].abs().mean()),
                            }
                        ),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
