"""import_checkpoint: the open Miipher-2 reimplementation's adapter and vocoder checkpoints become runs.

No downloads: the files are written here in the reimplementation's layout (key names and nesting as its
code saves them: a dict with ``model_state_dict`` holding ``extractor.model.*`` + ``adapters.<i>.ff.*``,
an OmegaConf config and NumPy RNG states; a Lightning checkpoint with ``generator.*`` and the two
discriminators under old-style weight-norm names), with small widths and every parameter random. The
reference models below follow the reimplementation's published architecture (its src/), written for
these tests.
"""

import random

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from omegaconf import OmegaConf
from torch import nn
from torchaudio.models import Conformer

from pipeline.config import compose_config
from pipeline.engine.checkpoint_files import load_state
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.import_checkpoint import run as import_checkpoint
from pipeline.models.adapters import build_adapted_encoder
from pipeline.models.hifigan import build_vocoder

transformers = pytest.importorskip("transformers")

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
N_ADAPTERS, HIDDEN = 2, 12


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


# --------------------------------------------------------------------------------------------
# The reimplementation's files, built here
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_imported_pair_holds_every_tensor_bit_for_bit_and_computes_what_the_reimplementation_does(store, mhubert):
    model, mhubert_dir = mhubert
    source = adapter_checkpoint(model, store / "checkpoint_199k.pt")["model_state_dict"]
    reference_generator, mpd, msd, vocoder_state = vocoder_checkpoint(store / "epoch=77-step=137108.ckpt")
    assert run_import(store, mhubert_dir) == EXIT_OK

    client = MlflowClient()
    runs = runs_by_stage(client)
    adapter_run, vocoder_run = runs["train_adapter"], runs["finetune_vocoder"]
    for run in (adapter_run, vocoder_run):
        assert run.info.status == "FINISHED"
        assert run.data.tags["imported_from"].endswith((".pt", ".ckpt"))
        assert run.data.tags["checkpoint.latest_step"] == "0"
    assert adapter_run.data.tags["imported.step"] == "199000" and vocoder_run.data.tags["imported.step"] == "137108"
    assert vocoder_run.data.tags["chain.adapter_run"] == adapter_run.info.run_id
    assert "chain.vocoder_run" not in vocoder_run.data.tags  # imported: it starts from no vocoder run

    # Adapters and trained norms: each tensor equals its source, bit for bit.
    state = committed_state(client, adapter_run)["modules"]
    parts = {"norm": "ff.0", "down": "ff.1", "up": "ff.3"}
    for key, value in state["adapters"].items():
        index, part, param = key.split(".")
        assert torch.equal(value, source[f"adapters.{index}.{parts[part]}.{param}"]), key
    for key, value in state["layer_norms"].items():
        index, param = key.split(".")
        assert torch.equal(value, source[f"extractor.model.encoder.layers.{index}.final_layer_norm.{param}"]), key
    assert len(state["adapters"]) == 6 * N_ADAPTERS and len(state["layer_norms"]) == 2 * N_ADAPTERS

    # Vocoder: every source tensor is in the checkpoint unchanged (same count, same bytes).
    vstate = committed_state(client, vocoder_run)["modules"]
    ours = [t for name in ("generator", "mpd", "msd") for t in vstate[name].values()]
    assert len(ours) == len(vocoder_state)
    fingerprints = {(tuple(t.shape), t.numpy().tobytes()) for t in ours}
    assert all((tuple(t.shape), t.numpy().tobytes()) in fingerprints for t in vocoder_state.values())

    # The imported chain computes what the reimplementation computes.
    generator, _, _ = build_vocoder(32, vocoder_preset())
    generator.load_state_dict(vstate["generator"])
    features = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert (generator.eval()(features) - reference_generator(features)).abs().max() <= 1e-5

    adapter_cfg = compose_config(
        "train_adapter",
        [
            "recipe=atotti_miipher2",
            *SSL,
            f"ssl.weights={mhubert_dir}",
            f"ssl.layer={N_ADAPTERS}",
            f"adapter.bottleneck={HIDDEN}",
        ],
    )
    adapted = build_adapted_encoder(adapter_cfg.ssl, adapter_cfg.adapter).eval()
    for key, module in adapted.trainable_modules().items():
        module.load_state_dict(state[key])
    wave = 0.3 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_adapted_features(source, wave)
        assert (adapted(wave) - expected).abs().max() <= 1e-5
        # the clean target still comes from the untouched encoder
        assert (
            adapted.target_features(wave) - model(wave, output_hidden_states=True).hidden_states[N_ADAPTERS]
        ).abs().max() <= 1e-5


class ReferenceAdapterFeedForward(nn.Module):
    """The reimplementation's feed-forward with its adapter: FF(h) + (h + ff(h))."""

    def __init__(self, feed_forward, adapter):
        super().__init__()
        self.feed_forward, self.adapter = feed_forward, adapter

    def forward(self, h):
        return self.feed_forward(h) + h + self.adapter(h)


def reference_adapted_features(source, wave):
    """hidden_states[n] of transformers' HubertModel holding the checkpoint's encoder (trained norms
    included) with the checkpoint's adapters beside the first n feed-forward blocks."""
    from pipeline.models.encoder import huggingface_config

    hf = transformers.HubertModel(huggingface_config(ssl_cfg())).eval()
    encoder = {k[len("extractor.model.") :]: v for k, v in source.items() if k.startswith("extractor.model.")}
    encoder = {
        k.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1"
        ): v
        for k, v in encoder.items()
    }
    hf.load_state_dict(encoder, strict=False)
    for i in range(N_ADAPTERS):
        adapter = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 32))
        adapter.load_state_dict(
            {k[len(f"adapters.{i}.ff.") :]: v for k, v in source.items() if k.startswith(f"adapters.{i}.ff.")}
        )
        layer = hf.encoder.layers[i]
        layer.feed_forward = ReferenceAdapterFeedForward(layer.feed_forward, adapter)
    return hf(wave, output_hidden_states=True).hidden_states[N_ADAPTERS]


def test_imported_runs_train_on_with_resume_run(store, mhubert):
    from pipeline.stages.finetune_vocoder import FinetuneVocoder
    from pipeline.stages.train_adapter import TrainAdapter

    model, mhubert_dir = mhubert
    adapter_checkpoint(model, store / "checkpoint_199k.pt")
    vocoder_checkpoint(store / "epoch=77-step=137108.ckpt")
    assert run_import(store, mhubert_dir) == EXIT_OK
    client = MlflowClient()
    runs = runs_by_stage(client)
    for stage_cls, run in ((TrainAdapter, runs["train_adapter"]), (FinetuneVocoder, runs["finetune_vocoder"])):
        run_id = run.info.run_id
        assert run_stage(stage_cls, [f"resume_run={run_id}", "trainer.max_steps=2"]) == EXIT_OK
        resumed = client.get_run(run_id)
        assert resumed.info.status == "FINISHED" and resumed.data.tags["checkpoint.latest_step"] == "2"
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    # and a new finetune_vocoder run builds on both imported runs like on runs trained here
    adapter_id, vocoder_id = runs["train_adapter"].info.run_id, runs["finetune_vocoder"].info.run_id
    assert (
        run_stage(
            FinetuneVocoder, [f"adapter_run={adapter_id}", f"vocoder_run={vocoder_id}", "trainer.max_steps=1", *QUICK]
        )
        == EXIT_OK
    )
    (fresh,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("chain.vocoder_run") == vocoder_id
    ]
    assert fresh.info.status == "FINISHED" and fresh.data.tags["chain.adapter_run"] == adapter_id


def test_missing_or_misshapen_tensors_are_refused_naming_the_key(store, mhubert, capfd):
    model, mhubert_dir = mhubert
    adapter_checkpoint(model, store / "checkpoint_199k.pt", drop="adapters.1.ff.3.weight")
    assert run_import(store, mhubert_dir, vocoder=False) == EXIT_BAD_INPUT
    assert "lacks 1 tensor(s) the adapter needs, e.g. 'adapters.1.ff.3.weight'" in capfd.readouterr().err

    adapter_checkpoint(model, store / "checkpoint_199k.pt")
    vocoder_checkpoint(store / "epoch=77-step=137108.ckpt", {"generator.conv_pre.weight_v": torch.zeros(16, 16, 5)})
    capfd.readouterr()
    assert run_import(store, mhubert_dir) == EXIT_BAD_INPUT
    assert "'conv_pre.weight_v' has shape (16, 16, 5), the preset needs (16, 16, 7)" in capfd.readouterr().err


def test_a_file_with_other_pickled_objects_is_refused_and_nothing_is_recorded(store, mhubert, capfd):
    import argparse

    model, mhubert_dir = mhubert
    adapter_checkpoint(model, store / "checkpoint_199k.pt", unsafe=argparse.Namespace(lr=1))
    assert run_import(store, mhubert_dir, vocoder=False) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert "refusing to load the adapter checkpoint" in err and "argparse.Namespace" in err
    assert "keep only its tensors" in err and "import that" in err  # says what to do
    assert not runs_by_stage(MlflowClient())


def test_adapters_of_another_encoder_or_without_one_are_refused(store, mhubert, capfd):
    model, _ = mhubert
    adapter_checkpoint(model, store / "checkpoint_199k.pt")
    other = transformers.HubertModel(model.config).eval()
    randomise(other, 99)
    other.save_pretrained(store / "other")
    assert run_import(store, store / "other", vocoder=False) == EXIT_BAD_INPUT
    assert "was trained on another encoder than ssl.weights" in capfd.readouterr().err
    capfd.readouterr()
    args = [f"adapter={store / 'checkpoint_199k.pt'}", *SSL, *QUICK]
    assert import_checkpoint(args) == EXIT_BAD_INPUT
    assert "needs ssl.weights=" in capfd.readouterr().err
    assert not runs_by_stage(MlflowClient())


@pytest.mark.slow
def test_mlflow_run_entry_point_imports_into_its_own_run(store, mhubert):
    from helpers import mlflow_run

    model, mhubert_dir = mhubert
    adapter_checkpoint(model, store / "checkpoint_199k.pt")
    vocoder_checkpoint(store / "epoch=77-step=137108.ckpt")
    overrides = " ".join([*SSL, f"ssl.weights={mhubert_dir}", *QUICK, *(f"finetune_vocoder.{o}" for o in VOCODER)])
    done = mlflow_run(
        store,
        f"adapter={store / 'checkpoint_199k.pt'}",
        f"vocoder={store / 'epoch=77-step=137108.ckpt'}",
        f"overrides={overrides}",
        entry="import_checkpoint",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    assert set(by_stage) == {"train_adapter", "finetune_vocoder"} and len(runs) == 2  # no stray launcher run
    assert all(r.info.status == "FINISHED" and r.data.tags["checkpoint.latest_step"] == "0" for r in runs)
    assert by_stage["train_adapter"].data.params["adapter"].endswith("checkpoint_199k.pt")  # mlflow run's own run
