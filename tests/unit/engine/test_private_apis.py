"""The MLflow, torch and Ray internals behind pipeline/engine/private_apis.py still work as the adapters expect.

Each test fails with the name of the internal that changed: an MLflow, torch or Ray upgrade that renames or
drops one breaks here, not in the middle of a training job.
"""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import sys
import time

import mlflow.data
import pandas as pd
import pytest
import torch
import torch.distributed as tdist
from mlflow import MlflowClient
from mlflow.entities import Dataset, Metric, RunData
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.engine.private_apis import (
    RAY_IDLE_WORKER_MS,
    artifact_repository,
    dataset_entity,
    ddp_ignore,
    init_local_ray,
    metric_steps,
    set_last_lr,
    start_system_metrics,
)


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


def test_ddp_ignore_leaves_the_named_parameters_and_buffers_out_of_ddp(tmp_path):
    internal = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    assert internal is not None, (
        "torch's DistributedDataParallel no longer has _set_params_and_buffers_to_ignore_for_model; "
        "pipeline.engine.private_apis.ddp_ignore needs another way to keep a frozen encoder out of DDP"
    )
    assert list(inspect.signature(internal).parameters) == ["module", "params_and_buffers_to_ignore"], (
        "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model takes other arguments now"
    )
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    module[0].requires_grad_(False)  # the frozen part: its parameters, and the BatchNorm's buffers, ignored
    ignored = ["0.weight", "0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    ddp_ignore(module, ignored)
    tdist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        assert ddp.parameters_to_ignore == set(ignored), "DDP no longer reads the names ddp_ignore leaves"
        synced = {id(p) for p in ddp._module_parameters} | {id(b) for b in ddp.modules_buffers}
        left_out = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if id(t) not in synced]
        assert sorted(left_out) == sorted(ignored), "DDP syncs what ddp_ignore named, or leaves out what it did not"
    finally:
        tdist.destroy_process_group()


def test_artifact_repository_uploads_lists_and_deletes_a_runs_artifacts(store):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("private-apis")).info.run_id
    (store / "state.pt").write_bytes(b"12345")
    repo = artifact_repository(client.get_run(run_id).info.artifact_uri)
    for method in ("log_artifact", "log_artifacts", "list_artifacts", "delete_artifacts"):
        assert callable(getattr(repo, method, None)), f"MLflow's ArtifactRepository has no {method} any more"
    repo.log_artifact(str(store / "state.pt"), "checkpoints/step-00000001")
    listed = {(e.path, e.file_size) for e in repo.list_artifacts("checkpoints/step-00000001")}
    assert listed == {("checkpoints/step-00000001/state.pt", 5)}
    seen = [e.path for e in client.list_artifacts(run_id, "checkpoints/step-00000001")]
    assert seen == ["checkpoints/step-00000001/state.pt"], "the repository is not the run's"
    repo.delete_artifacts("checkpoints/step-00000001")
    assert repo.list_artifacts("checkpoints") == []


def test_start_system_metrics_logs_the_runs_system_metrics_on_from_its_last_step(store):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    parameters = inspect.signature(SystemMetricsMonitor).parameters
    assert {"run_id", "sampling_interval", "resume_logging"} <= set(parameters), (
        "MLflow's SystemMetricsMonitor takes other arguments now; see pipeline.engine.private_apis.start_system_metrics"
    )
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("private-apis")).info.run_id
    client.log_batch(run_id, metrics=[Metric("system/cpu_utilization_percentage", 50.0, 0, 4)])  # an earlier attempt
    monitor = start_system_metrics(run_id, sampling_interval=0.1, resumed=True)
    time.sleep(0.5)
    monitor.finish()
    steps = metric_steps(client.get_run(run_id))
    assert steps.get("system/cpu_utilization_percentage", 0) > 4, "system metrics did not go on from the run's step"
    assert steps.keys() > {"system/cpu_utilization_percentage"}, f"no other system metric was logged: {steps}"


def test_ray_init_takes_system_config_without_starting_ray(monkeypatch):
    """Ray takes its private arguments out of ray.init's keyword arguments, then refuses any left over before it
    starts anything: an argument of its own left over is one it no longer knows."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RuntimeError, match="Unknown keyword argument") as refused:
            init_local_ray(idle_worker_seconds=60, configure_logging=False, not_a_ray_argument=1)
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # ray.init sets its own before it checks the arguments
    assert str(refused.value).endswith(": not_a_ray_argument"), (
        f"ray.init no longer takes _system_config ({refused.value}); see pipeline.engine.private_apis.init_local_ray"
    )


def test_the_ray_setting_is_one_ray_knows():
    """Ray's C++ config checks each setting's name and type when it reads ``_system_config`` and aborts the process
    on one it does not know: checked in a process of its own, with no Ray started."""
    config = json.dumps({RAY_IDLE_WORKER_MS: 60_000})
    check = "import sys, ray._raylet; ray._raylet.Config.initialize(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", check, config], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (
        f"Ray refuses the setting {config} that pipeline.engine.private_apis.init_local_ray passes: "
        + (done.stderr.strip().splitlines() or ["(no message)"])[0]
    )
