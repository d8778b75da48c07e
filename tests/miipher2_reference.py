"""The open Miipher-2 reimplementation's files as its code writes them, made here with small widths and every
parameter random, and reference models that follow its published architecture (its src/), written for the
import_checkpoint tests (tests/unit/test_import_checkpoint.py, tests/e2e/test_import_checkpoint_e2e.py)."""

import random

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchaudio.models import Conformer

from pipeline.config import compose_config
from pipeline.engine.checkpoint_files import load_state
from pipeline.import_checkpoint import run as import_checkpoint
from pipeline.models.hifigan import build_vocoder

transformers = pytest.importorskip("transformers")
N_ADAPTERS, HIDDEN = 2, 12

SSL = [
    "ssl=mhubert_147",
    "ssl.embed_dim=32",
    "ssl.num_heads=4",
    "ssl.ff_interm_features=48",
    "ssl.pos_conv_kernel=8",
    "ssl.pos_conv_groups=4",
    "ssl.num_layers=4",
    "ssl.conv_layers=[[16,10,5],[16,3,2],[16,3,2],[16,3,2],[16,3,2],[16,2,2],[16,2,2]]",
]


VOCODER = [
    "vocoder.upsample_initial_channel=16",
    "vocoder.conformer_dim=16",
    "vocoder.conformer_heads=2",
    "vocoder.conformer_ffn_dim=24",
    "vocoder.conformer_kernel=3",
    "vocoder.mpd_channels=[4,8,8,8,8]",
    "vocoder.mpd_periods=[2,3]",
    "vocoder.msd_channels=[4,8,8,16,16,16,16]",
    "vocoder.msd_scales=2",
]


# Quick runs on the demo corpus (each key fits both imported runs)
QUICK = [
    "batch_size=2",
    "data.segment_seconds=0.25",
    "validation.interval=0",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "trainer.log_interval=1",
]


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.dim() <= 1 or name.endswith(("weight_g", "original0")):
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def old_norm_names(state: dict) -> dict:
    """Parametrization names -> the old torch.nn.utils.weight_norm names the reimplementation's files carry."""
    return {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }


def ssl_cfg():
    return compose_config("train_adapter", SSL).ssl


@pytest.fixture
def mhubert(tmp_path):
    """A small random 'mHuBERT-147' Hugging Face directory: the encoder the adapters were trained on."""
    from pipeline.models.encoder import huggingface_config

    model = transformers.HubertModel(huggingface_config(ssl_cfg())).eval()
    randomise(model, 0)
    model.save_pretrained(tmp_path / "mhubert")
    return model, tmp_path / "mhubert"


def adapter_checkpoint(mhubert_model, path, drop=None, unsafe=None):
    """``torch.save`` of the reimplementation's training checkpoint, as its checkpoint util writes it."""
    encoder = {k: v.clone() for k, v in mhubert_model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    for i in range(N_ADAPTERS):  # trained final norms of the adapted layers
        for param in ("weight", "bias"):
            encoder[f"encoder.layers.{i}.final_layer_norm.{param}"] += 0.1 * torch.randn(32, generator=g)
    state = {f"extractor.model.{k}": v for k, v in old_norm_names(encoder).items()}
    for i in range(N_ADAPTERS):
        for ff, shape in (("0", [(32,), (32,)]), ("1", [(HIDDEN, 32), (HIDDEN,)]), ("3", [(32, HIDDEN), (32,)])):
            for param, s in zip(("weight", "bias"), shape):
                state[f"adapters.{i}.ff.{ff}.{param}"] = 0.3 * torch.randn(s, generator=g)
    if drop:
        del state[drop]
    config = OmegaConf.create(
        {
            "model": {"hubert_layer": N_ADAPTERS, "adapter_hidden_dim": HIDDEN},
            "optim": {"lr": 2e-4, "betas": [0.9, 0.95]},
        }
    )
    checkpoint = {
        "step": 199000,
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]},
        "scheduler_state_dict": {"last_epoch": 199000, "base_lrs": [2e-4]},
        "config": dict(config),
        "random_states": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    if unsafe is not None:
        checkpoint["extra"] = unsafe
    torch.save(checkpoint, path)
    return checkpoint


class ResBlock1(nn.Module):
    def __init__(self, channels, kernel, dilations):
        super().__init__()
        wn = nn.utils.weight_norm
        self.convs1 = nn.ModuleList(
            wn(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=(kernel * d - d) // 2)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            wn(nn.Conv1d(channels, channels, kernel, 1, padding=(kernel - 1) // 2)) for _ in dilations
        )

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1)) + x
        return x


class ReferenceGenerator(nn.Module):
    """The reimplementation's SSL-vocoder generator: projections around two one-layer Conformers, then
    HiFi-GAN V1 with a flat list of residual blocks and old-style weight norm."""

    def __init__(self, h):
        super().__init__()
        wn = nn.utils.weight_norm
        self.input_projection = nn.Linear(32, h.conformer_dim)
        conformer = dict(
            input_dim=h.conformer_dim,
            num_heads=h.conformer_heads,
            ffn_dim=h.conformer_ffn_dim,
            num_layers=1,
            depthwise_conv_kernel_size=h.conformer_kernel,
            dropout=0.1,
        )
        self.conformer1, self.conformer2 = Conformer(**conformer), Conformer(**conformer)
        self.output_projection = nn.Linear(h.conformer_dim, h.upsample_initial_channel)
        c = h.upsample_initial_channel
        self.conv_pre = wn(nn.Conv1d(c, c, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            wn(nn.ConvTranspose1d(c >> i, c >> (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(h.upsample_rates, h.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            ResBlock1(c >> (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(h.resblock_kernel_sizes, h.resblock_dilation_sizes)
        )
        self.conv_post = wn(nn.Conv1d(c >> len(self.ups), 1, 7, 1, padding=3))
        self.kernels = len(h.resblock_kernel_sizes)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1])
        x = self.input_projection(x)
        x, _ = self.conformer1(x, lengths)
        x, _ = self.conformer2(x, lengths)
        x = self.conv_pre(self.output_projection(x).transpose(1, 2))
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * self.kernels + j](x) for j in range(self.kernels)) / self.kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x))).squeeze(1)


def vocoder_preset():
    return compose_config("pretrain_vocoder", ["vocoder=conformer_v1_22k", *SSL, *VOCODER]).vocoder


def vocoder_checkpoint(path, generator_changes=None):
    """A Lightning checkpoint of the reimplementation's vocoder module."""
    h = vocoder_preset()
    generator = ReferenceGenerator(h).eval()
    randomise(generator, 11)
    _, mpd, msd = build_vocoder(32, h)
    randomise(mpd, 12)
    randomise(msd, 13)
    state = {f"generator.{k}": v for k, v in generator.state_dict().items()}
    for prefix, module in (("multi_period_discriminator.", mpd), ("multi_scale_discriminator.", msd)):
        # (the discriminators' layout is HiFi-GAN V1's: only the names differ from the pipeline's)
        for k, v in module.state_dict().items():
            k = k.replace(".post.", ".conv_post.").replace("parametrizations.weight.original0", "weight_g")
            k = k.replace("parametrizations.weight.original1", "weight_v")
            k = k.replace("parametrizations.weight.original", "weight_orig").replace(
                "parametrizations.weight.0._u", "weight_u"
            )
            state[prefix + k.replace("parametrizations.weight.0._v", "weight_v")] = v
    state.update(generator_changes or {})
    torch.save(
        {
            "epoch": 77,
            "global_step": 137108,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": state,
            "hyper_parameters": {"cfg": OmegaConf.create({"model": {"upsample_rates": [7, 7, 3, 3]}})},
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "lr_schedulers": [{"gamma": 0.999998}],
        },
        path,
    )
    return generator, mpd, msd, state


def run_import(tmp_path, mhubert_dir, *extra, vocoder=True):
    args = [f"adapter={tmp_path / 'checkpoint_199k.pt'}", *SSL, f"ssl.weights={mhubert_dir}", *QUICK]
    args += [f"finetune_vocoder.{o}" for o in VOCODER]
    if vocoder:
        args.append(f"vocoder={tmp_path / 'epoch=77-step=137108.ckpt'}")
    return import_checkpoint([*args, *extra])


def runs_by_stage(client):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.data.tags.get("stage"): r for r in runs}


def committed_state(client, run):
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/step-00000000")
    from pathlib import Path

    return load_state(Path(local))
