"""Adapter recipes: this project's default and the open Miipher-2 reimplementation's, each a config choice."""

from pathlib import Path

import mlflow
import pytest
import torch
from helpers import TINY
from mlflow import MlflowClient

from pipeline.config import ConfigError, apply_overrides, compose_config
from pipeline.engine.checkpoint_files import load_state
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.models.adapters import build_adapted_encoder
from pipeline.models.losses import feature_loss


def test_the_reimplementation_recipe_sets_its_values_and_the_default_keeps_ours():
    default = compose_config("train_adapter", [])
    theirs = compose_config("train_adapter", ["recipe=atotti_miipher2"])
    assert (
        default.adapter.bottleneck,
        default.adapter.init,
        default.adapter.residual,
        default.adapter.train_layer_norms,
        default.loss.sc,
    ) == (256, "normal", False, False, "per_example")
    assert (
        theirs.adapter.bottleneck,
        theirs.adapter.init,
        theirs.adapter.init_gain,
        theirs.adapter.residual,
        theirs.adapter.train_layer_norms,
        theirs.loss.sc,
    ) == (768, "xavier", 0.01, True, True, "pooled_power")
    assert (
        theirs.optim.lr,
        theirs.optim.weight_decay,
        list(theirs.optim.betas),
        theirs.optim.warmup_steps,
        theirs.optim.min_lr_ratio,
        theirs.batch_size,
    ) == (2e-4, 0.01, [0.9, 0.95], 10000, 0.0, 16)
    assert theirs.tracking.tags.recipe == "atotti_miipher2" and default.tracking.tags.recipe == "default"
    assert (theirs.ssl.name, theirs.ssl.layer) == ("mhubert_147", 6)
    # the command line still wins over the recipe
    assert compose_config("train_adapter", ["recipe=atotti_miipher2", "batch_size=4"]).batch_size == 4


def test_a_recipe_cannot_be_switched_on_resume():
    base = compose_config("train_adapter", [])
    with pytest.raises(ConfigError, match="recipe.*fresh start"):
        apply_overrides("train_adapter", base, ["recipe=atotti_miipher2"])


def test_pooled_spectral_convergence_is_the_power_ratio_over_the_batch():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    target[0] *= 10  # examples of different energy: pooled and per-example differ
    _, pooled = feature_loss(pred, target, sc="pooled_power")
    _, per_example = feature_loss(pred, target, sc="per_example")
    expected = float(((pred - target) ** 2).sum() / (target**2).sum())
    assert float(pooled["sc"]) == pytest.approx(expected, rel=1e-6)
    norms = [float(torch.linalg.norm(target[i] - pred[i]) / torch.linalg.norm(target[i])) for i in range(3)]
    assert float(per_example["sc"]) == pytest.approx(sum(norms) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="loss.sc='frobenius'"):
        feature_loss(pred, target, sc="frobenius")


def tiny_adapted(*overrides):
    cfg = compose_config("train_adapter", ["ssl=tiny", "adapter.bottleneck=8", *overrides])
    return build_adapted_encoder(cfg.ssl, cfg.adapter).eval()


def test_reimplementation_adapters_start_from_the_doubled_residual_and_train_the_norms():
    model = tiny_adapted("recipe=atotti_miipher2", "adapter.bottleneck=8")
    adapter = model.adapters[0]
    assert (
        adapter.residual and torch.count_nonzero(adapter.down.bias) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    )
    bound = 0.01 * (6 / (adapter.down.in_features + adapter.down.out_features)) ** 0.5  # Xavier-uniform, gain 0.01
    assert adapter.down.weight.abs().max() <= bound and adapter.down.weight.abs().max() > bound / 2
    assert set(model.trainable_modules()) == {"adapters", "layer_norms"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or ".trained." in n or n.startswith(("adapters.", "layer_norms.")) for n in trainable)
    x = torch.randn(1, 8000)
    with torch.no_grad():
        # the layer sees 2h + FF(h) + A(h): not the frozen encoder even at the start, unlike the default recipe
        assert (model(x) - model.target_features(x)).abs().max() > 0.1
        default = tiny_adapted()
        assert (default(x) - default.target_features(x)).abs().max() < 0.1
        # training the norm copies leaves the clean target (the frozen originals) untouched
        before = model.target_features(x)
        for norm in model.layer_norms:
            norm.weight.add_(1.0)
        assert torch.equal(model.target_features(x), before)


def test_train_adapter_with_the_reimplementation_recipe_saves_adapters_and_norms(store):
    from pipeline.stages.train_adapter import TrainAdapter

    args = [
        *TINY,
        "recipe=atotti_miipher2",
        "adapter.bottleneck=16",
        "batch_size=4",
        "optim.warmup_steps=2",
        "trainer.max_steps=4",
        "validation.interval=4",
        "checkpoint.save_interval=4",
    ]
    assert run_stage(TrainAdapter, args) == EXIT_OK
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("train_adapter").experiment_id])[0]
    assert run.data.tags["recipe"] == "atotti_miipher2" and run.data.params["loss.sc"] == "pooled_power"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/step-00000004")
    state = load_state(Path(local))
    assert set(state["modules"]) == {"adapters", "layer_norms"}
    assert any(
        not torch.equal(v, torch.ones_like(v))
        for k, v in state["modules"]["layer_norms"].items()
        if k.endswith("weight")
    )  # the norms trained
    assert run_stage(TrainAdapter, [*TINY, "loss.sc=frobenius"]) == EXIT_BAD_INPUT
