"""Optuna sweeps: nested MLflow runs, pruning, continuation, several workers on PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import optuna
import pytest
from helpers import SWEEP_STAGE, all_runs
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline.config import ConfigError
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.sweep import run_sweep
from pipeline.sweep_space import parse_distribution

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def sweep_args(store: Path, *extra: str, n_trials: int = 4, study: str = "s") -> list[str]:
    return [
        "stage=train_adapter",
        f"n_trials={n_trials}",
        f"storage=sqlite:///{store}/optuna.db",
        f"study={study}",
        *SWEEP_STAGE,
        *extra,
    ]


def load(storage: str, study: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=study, storage=storage)


def test_distributions_parse_and_reject_mistakes():
    assert parse_distribution("k", "loguniform(1e-5, 1e-3)").log
    assert parse_distribution("k", "int(1, 8)").high == 8
    assert parse_distribution("k", "choice('a', 'b')").choices == ("a", "b")
    for bad in (
        "loguniform(1e-3)",
        "uniform(2, 1)",
        "normal(0, 1)",
        "loguniform(0, 1)",
        "int(1.5, 3)",
        "choice()",
        "lr in [1, 2]",
        "uniform(1, foo)",
    ):
        with pytest.raises(ConfigError):
            parse_distribution("k", bad)


def test_four_trial_sweep_with_pruning_mirrors_states_in_nested_runs(store):
    # lr choices far apart make pruning decisive: lr=0 never improves on the starting loss.
    code = run_sweep(
        sweep_args(
            store,
            "sweep.space.optim.lr='choice(0.0, 0.03)'",
            "sweep.space.adapter.bottleneck=none",
            "sweep.space.optim.weight_decay=none",
            "sweep.pruner_startup_trials=1",
            "sweep.sampler_seed=0",
        )
    )
    assert code == EXIT_OK
    study = load(f"sqlite:///{store}/optuna.db")
    trials = study.trials
    assert len(trials) == 4
    states = {t.state for t in trials}
    assert TrialState.COMPLETE in states and TrialState.PRUNED in states, [t.state for t in trials]
    client = MlflowClient()
    parent_id = study.user_attrs["mlflow_parent_run"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["stage"] == "sweep"
    children = [r for r in all_runs(client) if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 4
    by_number = {int(r.data.tags["trial.number"]): r for r in children}
    for t in trials:
        child = by_number[t.number]
        assert t.user_attrs["mlflow_run_id"] == child.info.run_id
        assert child.data.tags["trial.state"] == t.state.name
        assert child.info.status == STATUS[t.state.name]
        assert child.data.params["optim.lr"] == str(t.params["optim.lr"])
        assert child.info.experiment_id == parent.info.experiment_id  # nested in the UI
        assert client.get_metric_history(child.info.run_id, "val/loss")
        if t.state == TrialState.PRUNED:
            assert child.data.tags["stopped_by"] == "pruned"
            assert max(m.step for m in client.get_metric_history(child.info.run_id, "train/loss")) < 9
    best = study.best_trial
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.tags["best.run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best/val/loss"] == pytest.approx(best.value)
    art = Path(urlparse(parent.info.artifact_uri).path)
    assert (art / "best_trial.json").is_file() and (art / "trials.json").is_file()
    assert (art / "plots" / "optimization_history.png").is_file()
    assert parent.data.params["sweep.n_trials"] == "4"

    # the same command again continues the study: nothing left to do for 4, two more for 6
    assert run_sweep(sweep_args(store, "sweep.space.optim.lr=choice(0.0,0.03)")) == EXIT_OK
    assert len(load(f"sqlite:///{store}/optuna.db").trials) == 4
    assert run_sweep(sweep_args(store, n_trials=6)) == EXIT_BAD_INPUT  # the space changed: refused
    assert len(load(f"sqlite:///{store}/optuna.db").trials) == 4
    assert (
        run_sweep(
            sweep_args(
                store,
                "sweep.space.optim.lr=choice(0.0,0.03)",
                "sweep.space.adapter.bottleneck=none",
                "sweep.space.optim.weight_decay=none",
                n_trials=6,
            )
        )
        == EXIT_OK
    )
    study = load(f"sqlite:///{store}/optuna.db")
    assert len(study.trials) == 6 and study.user_attrs["mlflow_parent_run"] == parent_id
    assert (art / "plots" / "param_importances.png").is_file() or len(
        [t for t in study.trials if t.state == TrialState.COMPLETE]
    ) < 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["stage=train_nothing"], "Unknown stage 'train_nothing'"),
        (["sweep.space.optim.lrr=uniform(0,1)"], "'optim.lrr' is not a key of the train_adapter config"),
        (["sweep.space.optim.lr=loguniform(1e-3)"], "Malformed distribution for optim.lr"),
        (["sweep.space.batch_size='uniform(1.5, 4.5)'"], "batch_size"),
        (["sweep.metric=val/cer"], "Objective metric 'val/cer' is never logged by train_adapter"),
        (["validation.interval=0"], "would never be logged"),
        (["n_trials=many"], "n_trials must be a number"),
        # a storage no retry can open fails at once, without the password
        (["storage=sqlite:////no-such-dir/optuna.db"], "Cannot open the Optuna storage sqlite:////no-such-dir"),
        (
            ["storage=postgresql://u:secret@127.0.0.1:1/db"],
            "Cannot open the Optuna storage postgresql://***@127.0.0.1:1/db",
        ),
        (["storage=postgres://u@localhost/db"], "Can't load plugin: sqlalchemy.dialects:postgres"),
    ],
)
def test_mistakes_are_caught_before_any_trial_runs(store, capfd, extra, message):
    assert run_sweep(sweep_args(store) + extra) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert message in err and "secret" not in err and "retrying" not in err
    assert all_runs(MlflowClient()) == []
    assert not (store / "optuna.db").exists() or not optuna.get_all_study_summaries(f"sqlite:///{store}/optuna.db")


@pytest.mark.parametrize("stage", ["train_adapter", "train_asr"])
def test_every_stage_search_space_is_valid(stage):
    from pipeline.sweep_space import load_spec, stage_class, validate

    space = validate(stage_class(stage), load_spec(stage, []), [])
    assert space and all(isinstance(d, optuna.distributions.BaseDistribution) for d in space.values())


def test_a_sweep_over_a_stage_that_builds_on_runs_takes_them_as_launch_arguments():
    """finetune_vocoder's adapter_run= and vocoder_run= are launch arguments, not config keys: the sweep's
    checks compose the config without them (each trial gets them back on its command line)."""
    from pipeline.sweep_space import SweepSpec, stage_class, validate

    spec = SweepSpec(metric="val/mel", space={"optim.lr": "loguniform(1e-5, 1e-3)"})
    space = validate(stage_class("finetune_vocoder"), spec, ["adapter_run=a1", "vocoder_run=v1", "batch_size=4"])
    assert set(space) == {"optim.lr"}


def test_a_tag_two_workers_write_at_once_is_written_again_after_the_primary_key_collision(store):
    """Seen with PostgreSQL: two workers finishing together both insert `best.trial` on the parent run; the loser's
    insert fails on the tag's primary key. The loser writes again (an update now); other errors still raise."""
    from mlflow.exceptions import MlflowException

    from pipeline.sweep import set_shared_tag

    real = MlflowClient()
    run_id = real.create_run(real.create_experiment("e")).info.run_id
    collision = MlflowException(
        '(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "tag_pk"'
    )

    class RacingClient:
        def __init__(self, failures):
            self.failures, self.calls = list(failures), 0

        def set_tag(self, run, key, value):
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
            real.set_tag(run, key, value)

    racing = RacingClient([collision])
    set_shared_tag(racing, run_id, "best.trial", "2")
    assert racing.calls == 2 and real.get_run(run_id).data.tags["best.trial"] == "2"
    with pytest.raises(MlflowException, match="other failure"):
        set_shared_tag(RacingClient([MlflowException("other failure")]), run_id, "best.trial", "3")
    with pytest.raises(MlflowException, match="unique constraint"):
        set_shared_tag(RacingClient([collision] * 3), run_id, "best.trial", "3")
