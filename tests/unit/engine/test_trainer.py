"""The training loop (engine/trainer.py) and the stage contract (engine/stage.py), with a toy stage and
in-memory stand-ins for the tracking parts: what the engine promises every stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import compose_config
from pipeline.data.datasets import ShuffledBatches
from pipeline.engine.stage import Precision, Stage
from pipeline.engine.trainer import Engine


class Points(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key  # training reads (epoch, index), validation an index
        return {"x": self.x[i], "y": self.y[i]}


def _state() -> tuple[bool, bool]:
    """(autocast on, grad enabled) on the CPU, for recording where a stage's code runs."""
    return torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()


class Toy(Stage):
    """A regression with dropout (so training draws random numbers) that records how it is called."""

    name = "toy"

    def __init__(self, cfg, precision):
        super().__init__(cfg, precision)
        self.calls: list[tuple[str, bool, bool, bool]] = []  # (phase, autocast, grad enabled, module training)
        self.backward_autocast: list[bool] = []

    def tags(self):
        return {"model": "toy", "dataset": "points"}

    def build(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        self.net[0].weight.register_hook(lambda g: self.backward_autocast.append(torch.is_autocast_enabled("cpu")))
        self.modules = {"net": self.net}
        optimizer = self.make_optimizer(self.net.parameters())
        self.optimizers = {"net": optimizer}
        self.schedulers = {"net": self.make_scheduler(optimizer)}
        self.train_set, self.val_set = Points(32, 1), Points(8, 2)
        self.train_source = ShuffledBatches(self.train_set, int(self.cfg.seed))

    def _record(self, phase: str) -> None:
        self.calls.append((phase, *_state(), self.net.training))

    def compute_loss(self, batch):
        pred = self.net(batch["x"])
        return nn.functional.mse_loss(pred.float(), batch["y"]), {}

    def training_step(self, batch):
        self._record("train")
        loss, _ = self.compute_loss(batch)
        return {
            "train/loss": loss.detach(),
            "grad_norm": self.optimize(loss, self.optimizers["net"], self.net.parameters()),
        }

    def validation_step(self, batch):
        self._record("validate")
        return super().validation_step(batch)

    def write_samples(self, out_dir, step):
        self._record("samples")
        torch.rand(100)  # a sample that draws random numbers must not shift training


class Metrics:
    def __init__(self):
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def flush(self, wait=False):
        return []

    def at_step(self, step):
        return []


class Store:
    class client:  # noqa: N801 - stands in for MlflowClient
        @staticmethod
        def log_artifacts(*args):
            raise AssertionError("the toy writes no sample files")

    def __init__(self):
        self.saved: list[int] = []

    def save(self, step, state, meta, row, flush_metrics=None, metrics=None):
        self.saved.append(step)

    def wait(self):
        pass


class NoStop:
    requested, reason = False, None


def fit(*overrides: str, precision: str = "32") -> tuple[Toy, Metrics, Store]:
    cfg = compose_config(
        "train_adapter",
        [
            "batch_size=4",
            "trainer.max_steps=6",
            "validation.interval=3",
            "checkpoint.save_interval=100",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )
    stage = Toy(cfg, Precision.from_config("cpu", precision))
    stage.build()
    metrics, store = Metrics(), Store()
    Engine(stage, metrics, store, NoStop(), run_id="r").fit()
    return stage, metrics, store


def losses(metrics: Metrics) -> list[tuple[int, float]]:
    return [(step, m["train/loss"]) for step, m in metrics.logged if "train/loss" in m]


def test_steps_run_under_autocast_and_validation_and_samples_in_eval_mode_without_gradients():
    stage, metrics, store = fit(precision="bf16")
    phases = {phase: set() for phase, *_ in stage.calls}
    for phase, *state in stage.calls:
        phases[phase].add(tuple(state))
    assert phases == {
        "train": {(True, True, True)},  # autocast, gradients, train mode
        "validate": {(True, False, False)},  # autocast, no gradients, eval mode
        "samples": {(False, False, False)},  # full precision, no gradients, eval mode
    }
    assert stage.backward_autocast and not any(stage.backward_autocast)  # optimize leaves autocast
    assert stage.net.training  # back in train mode after every validation
    assert [s for s, m in metrics.logged if "val/loss" in m] == [3, 6]
    assert store.saved == [6]  # the end of training always saves


def test_validation_and_samples_leave_the_training_random_streams_untouched():
    _, with_validation, _ = fit("validation.interval=2")
    _, without, _ = fit("validation.interval=0")
    assert losses(with_validation) == losses(without)
    assert len(losses(without)) == 6


def test_the_default_optimizer_is_adamw_from_the_optim_settings():
    cfg = compose_config("train_adapter", ["optim.lr=3e-4", "optim.betas=[0.8,0.95]", "optim.weight_decay=0.02"])
    stage = Toy(cfg, Precision.from_config("cpu", "32"))
    params = [nn.Parameter(torch.zeros(2))]
    group = stage.make_optimizer(params).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 0.02)
    assert stage.make_optimizer(params, lr=1e-5).param_groups[0]["lr"] == 1e-5


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_a_job_is_reproducible_from_its_seed(precision):
    _, first, _ = fit(precision=precision)
    _, second, _ = fit(precision=precision)
    assert losses(first) == losses(second)


class Diverging(Toy):
    """Its loss is NaN from step ``from_step`` on (counted in training steps)."""

    from_step = 3

    def training_step(self, batch):
        self.steps = getattr(self, "steps", 0) + 1
        loss, _ = self.compute_loss(batch)
        if self.steps >= self.from_step:
            loss = loss * float("nan")
        return {
            "train/loss": loss.detach(),
            "grad_norm": self.optimize(loss, self.optimizers["net"], self.net.parameters()),
        }


def test_non_finite_steps_are_skipped_counted_and_stop_the_job_when_they_persist():
    from pipeline.engine.trainer import NonFiniteTraining

    cfg = compose_config(
        "train_adapter",
        [
            "batch_size=4",
            "trainer.max_steps=10",
            "validation.interval=0",
            "checkpoint.save_interval=100",
            "trainer.max_nonfinite_steps=3",
        ],
    )
    stage = Diverging(cfg, Precision.from_config("cpu", "32"))
    stage.build()
    metrics, store = Metrics(), Store()
    engine = Engine(stage, metrics, store, NoStop(), run_id="r")
    weights = {}
    original_step = stage.optimizers["net"].step

    def record(*args, **kwargs):
        out = original_step(*args, **kwargs)
        weights[engine.pos.step + 1] = [p.detach().clone() for p in stage.net.parameters()]
        return out

    stage.optimizers["net"].step = record
    with pytest.raises(NonFiniteTraining, match="3 steps in a row .* trainer.max_nonfinite_steps=3"):
        engine.fit()
    assert sorted(weights) == [1, 2]  # steps 3, 4, 5 applied no update
    assert all(torch.equal(a, b) for a, b in zip(weights[2], stage.net.parameters()))
    assert all(torch.isfinite(p).all() for p in stage.net.parameters())
    counted = [(s, m["train/nonfinite_steps"]) for s, m in metrics.logged if "train/nonfinite_steps" in m]
    assert counted == [(3, 1), (4, 2), (5, 3)] and engine.pos.step == 5
    assert engine.state_dict()["nonfinite_streak"] == 3
    assert store.saved == []  # nothing is saved on the way out of a diverged job


def test_a_finite_step_resets_the_streak():
    cfg = compose_config(
        "train_adapter",
        [
            "batch_size=4",
            "trainer.max_steps=6",
            "validation.interval=0",
            "checkpoint.save_interval=100",
            "trainer.max_nonfinite_steps=2",
        ],
    )

    class Once(Toy):
        def training_step(self, batch):
            self.steps = getattr(self, "steps", 0) + 1
            loss, _ = self.compute_loss(batch)
            loss = loss * float("nan") if self.steps in (2, 4) else loss
            return {
                "train/loss": loss.detach(),
                "grad_norm": self.optimize(loss, self.optimizers["net"], self.net.parameters()),
            }

    stage = Once(cfg, Precision.from_config("cpu", "32"))
    stage.build()
    engine = Engine(stage, Metrics(), Store(), NoStop(), run_id="r")
    engine.fit()  # two isolated non-finite steps never make 2 in a row
    assert (engine.pos.step, engine.nonfinite_steps, engine.nonfinite_streak) == (6, 2, 0)


def test_slow_steps_still_print_a_progress_line_between_log_intervals(monkeypatch, caplog):
    """A step slower than LOG_LINE_EVERY_S (0 here) prints its line although the log interval is far off; the
    metrics logged by step, throughput included, are the same as without it."""
    import logging

    from pipeline.engine import trainer

    caplog.set_level(logging.INFO, logger="pipeline.engine.trainer")
    _, quiet, _ = fit("trainer.log_interval=100")
    assert [r.message.split()[1] for r in caplog.records if r.message.startswith("step ")] == ["6/6"]
    caplog.clear()
    monkeypatch.setattr(trainer, "LOG_LINE_EVERY_S", 0.0)
    _, chatty, _ = fit("trainer.log_interval=100")
    assert [r.message.split()[1] for r in caplog.records if r.message.startswith("step ")] == [
        f"{s}/6" for s in range(1, 7)
    ]
    assert [sorted(m) for _, m in chatty.logged] == [sorted(m) for _, m in quiet.logged]
