"""import_checkpoint: the open Miipher-2 reimplementation's adapter and vocoder checkpoints become runs.

No downloads: the files are written here in the reimplementation's layout (key names and nesting as its
code saves them: a dict with ``model_state_dict`` holding ``extractor.model.*`` + ``adapters.<i>.ff.*``,
an OmegaConf config and NumPy RNG states; a Lightning checkpoint with ``generator.*`` and the two
discriminators under old-style weight-norm names), with small widths and every parameter random. The
reference models below follow the reimplementation's published architecture (its src/), written for
these tests.
"""

import pytest
import torch
from miipher2_reference import (
    HIDDEN,
    N_ADAPTERS,
    QUICK,
    SSL,
    adapter_checkpoint,
    committed_state,
    mhubert,  # noqa: F401 (a fixture the tests request by name)
    randomise,
    run_import,
    runs_by_stage,
    ssl_cfg,
    vocoder_checkpoint,
    vocoder_preset,
)
from mlflow import MlflowClient
from torch import nn

from pipeline.config import compose_config
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.import_checkpoint import run as import_checkpoint
from pipeline.models.adapters import build_adapted_encoder
from pipeline.models.hifigan import build_vocoder

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------------------------
# The reimplementation's files, built here
# --------------------------------------------------------------------------------------------


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
