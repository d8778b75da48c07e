"""Training faults in a real process: a data-loader worker killed."""

import pytest
from helpers import TINY, loss_history, one_run
from mlflow import MlflowClient

from pipeline.common import faults
from pipeline.engine.cli import EXIT_FAILED, EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

pytestmark = pytest.mark.slow


def test_a_killed_data_loader_worker_fails_the_job_clearly_and_the_resume_is_exact(
    store, armed, capfd, tmp_path, monkeypatch
):
    job = [*TINY, "trainer.max_steps=8", "checkpoint.save_interval=2", "validation.interval=0", "data.num_workers=1"]
    assert run_stage(TrainAdapter, job) == EXIT_OK
    client = MlflowClient()
    reference = loss_history(client, one_run(client).info.run_id)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/killed.db")
    armed("data.batch@6=kill")  # the worker SIGKILLs itself while it makes its 6th batch
    assert run_stage(TrainAdapter, job) == EXIT_FAILED
    faults.disarm()
    err = capfd.readouterr().err
    assert "A data loader worker died" in err and "resume_run=" in err and "Traceback" not in err
    client = MlflowClient()  # the second store
    run = one_run(client)
    committed = int(run.data.tags["checkpoint.latest_step"])
    assert run.info.status == "FAILED" and 2 <= committed < 8

    assert run_stage(TrainAdapter, [f"resume_run={run.info.run_id}"]) == EXIT_OK
    assert loss_history(client, run.info.run_id) == reference
