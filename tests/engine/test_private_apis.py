"""The MLflow and torch internals behind pipeline/engine/private_apis.py still work as the adapters expect.

Each test fails with the name of the internal that changed: an MLflow or torch upgrade that renames or
drops one breaks here, not in the middle of a training job.
"""

from __future__ import annotations

import mlflow.data
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, Metric, RunData

from pipeline.engine.private_apis import dataset_entity, metric_steps, set_last_lr


def test_metric_steps_reads_the_latest_point_of_each_metric_from_the_run(store):
    assert hasattr(RunData({}), "_metric_objs"), (
        "MLflow's RunData no longer has _metric_objs (the latest point of each metric); "
        "pipeline.engine.private_apis.metric_steps needs another way to read the last step of a metric"
    )
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("private-apis")).info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric("train/loss", 1.0 / step, 0, step) for step in (1, 2, 7)] + [Metric("val/loss", 0.5, 0, 5)],
    )
    assert metric_steps(client.get_run(run_id)) == {"train/loss": 7, "val/loss": 5}, (
        "MLflow's RunData._metric_objs no longer holds each metric's latest point (key, step)"
    )


def test_set_last_lr_is_what_the_scheduler_reports():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert hasattr(scheduler, "_last_lr"), (
        "torch's LRScheduler no longer has _last_lr; pipeline.engine.private_apis.set_last_lr needs another "
        "way to set what get_last_lr() returns after a resume changed the learning rate"
    )
    set_last_lr(scheduler, [0.125])
    assert scheduler.get_last_lr() == [0.125], "torch's get_last_lr() no longer returns LRScheduler._last_lr"
    state = scheduler.state_dict()
    assert state.get("_last_lr") == [0.125], "torch no longer saves LRScheduler._last_lr in the scheduler's state"


def test_dataset_entity_is_what_log_inputs_takes():
    dataset = mlflow.data.from_pandas(pd.DataFrame({"x": [1.0, 2.0]}), source="demo", name="demo")
    if not hasattr(dataset, "_to_mlflow_entity"):
        pytest.fail(
            "mlflow.data datasets no longer have _to_mlflow_entity; "
            "pipeline.engine.private_apis.dataset_entity needs another way to build the entity"
        )
    entity = dataset_entity(dataset)
    assert isinstance(entity, Dataset), "Dataset._to_mlflow_entity no longer returns an mlflow.entities.Dataset"
    assert (entity.name, entity.digest) == ("demo", dataset.digest)
