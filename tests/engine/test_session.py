"""Planning a job (engine/session.py plan_job): everything is decided and checked before anything is written."""

import pytest
from mlflow import MlflowClient

from conftest import TINY, snapshot, stage_runs
from pipeline.config import ConfigError
from pipeline.engine.session import EXIT_OK, plan_job, run_stage
from pipeline.stages.train_adapter import TrainAdapter


def test_a_plan_resolves_launch_arguments_and_config_and_writes_nothing(store):
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", "checkpoint.save_interval=1"]) == EXIT_OK
    client = MlflowClient()
    run_id = stage_runs(client)[0].info.run_id
    before, experiments = snapshot(client), len(client.search_experiments())

    plan = plan_job(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=4", "optim.lr=2e-4"], client)
    assert (plan.resume.run_id, plan.resume.step, plan.launch.explicit_step) == (run_id, 2, False)
    assert plan.changes == {"optim.lr": (1e-3, 2e-4), "trainer.max_steps": (2, 4)}
    assert plan.cfg.ssl.name == "tiny" and plan.overrides == ["trainer.max_steps=4", "optim.lr=2e-4"]

    older = plan_job(TrainAdapter, [f"resume_run={run_id}", "resume_step=1", "trainer.max_steps=4"], client)
    assert (older.resume.step, older.launch.explicit_step) == (1, True)

    fresh = plan_job(TrainAdapter, [*TINY, "seed=7"], client)
    assert fresh.resume is None and fresh.changes == {} and fresh.cfg.seed == 7

    with pytest.raises(ConfigError, match="change the model architecture"):
        plan_job(TrainAdapter, [f"resume_run={run_id}", "ssl.layer=1", "trainer.max_steps=4"], client)
    with pytest.raises(ConfigError, match="Nothing to train"):
        plan_job(TrainAdapter, [f"resume_run={run_id}"], client)
    assert snapshot(client) == before and len(client.search_experiments()) == experiments
