"""The MLflow, torch and Ray internals the pipeline relies on, each behind one function.

None of these libraries offers a public way to do these; a new release may rename or drop what they reach.
tests/unit/engine/test_private_apis.py exercises every one of them against the installed versions and
fails with the name of the internal that changed, so an upgrade breaks there and not in the middle
of a training job. Each function says why the public API does not suffice and what to do when it breaks.
"""

from __future__ import annotations

from typing import Any


def metric_steps(run) -> dict[str, int]:
    """The last step logged of each metric of ``run`` (an ``mlflow.entities.Run``).

    MLflow keeps every metric's latest point (highest step) with the run, so this costs no history
    query however long the run has trained; the public ``run.data.metrics`` keeps only the values,
    the points themselves are in ``RunData._metric_objs``.
    """
    return {m.key: m.step for m in run.data._metric_objs}


def set_last_lr(scheduler, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` return ``lrs``: what a torch LR scheduler reports as its current
    learning rates after the optimizer's were changed by hand (a resumed config's new settings).
    torch keeps them in ``LRScheduler._last_lr`` and has no setter."""
    scheduler._last_lr = list(lrs)


def dataset_entity(dataset) -> Any:
    """The ``mlflow.entities.Dataset`` of an ``mlflow.data`` dataset (its name, digest, source and schema),
    what ``MlflowClient.log_inputs`` takes; only ``mlflow.log_input`` (the fluent API, on the active run)
    converts it publicly, through ``Dataset._to_mlflow_entity``."""
    return dataset._to_mlflow_entity()


def ddp_ignore(module, names: list[str]) -> None:
    """Leave the parameters and buffers ``names`` of ``module`` (as ``module.named_parameters()`` names them)
    out of the DistributedDataParallel that will wrap it: DDP neither broadcasts them when it wraps the module
    nor reduces or syncs them in training. Call it before wrapping (``Dist.wrap``; a frozen encoder).

    DDP takes no argument for this; torch's own way is the static
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, a stop-gap until
    https://github.com/pytorch/pytorch/issues/43690 gives a public one. If it breaks, use that public way
    when there is one; else wrap only the trainable submodules. Without the call training stays correct
    (every rank loads the same frozen weights) but each wrap broadcasts them all."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def artifact_repository(artifact_uri: str) -> Any:
    """The ``ArtifactRepository`` of ``artifact_uri`` (a run's ``info.artifact_uri``; local, S3, the tracking
    server's proxy, ...): what uploads, lists and deletes a run's artifacts (``CheckpointStore.repo``).

    MLflow's public artifact calls (``MlflowClient.log_artifacts``, ``list_artifacts``, ``mlflow.artifacts``)
    upload, list and download but cannot delete, which checkpoint retention does; the repository itself comes
    from ``mlflow.store.artifact.artifact_repository_registry.get_artifact_repository``, outside the documented
    API. If it breaks, see where MLflow's tracking client gets a run's repository now
    (``TrackingServiceClient._get_artifact_repo`` in mlflow/tracking/_tracking_service/client.py) and call that."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri)


def start_system_metrics(run_id: str, sampling_interval: float, resumed: bool) -> Any:
    """Start MLflow's system metrics (``system/*``: CPU, memory, disk, network, GPU) for ``run_id``, sampled
    every ``sampling_interval`` seconds by a thread of MLflow's; returns the monitor, whose ``finish()`` stops
    it and stores what it holds. ``resumed``: the steps go on from the run's last system metric, not from 0.

    MLflow starts this monitor publicly only for the fluent API's active run
    (``mlflow.start_run(log_system_metrics=True)``); a job writes to its run through an ``MlflowClient`` and
    has no active run, so it builds the undocumented
    ``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`` itself. If it breaks, follow what
    ``mlflow.start_run`` does with ``log_system_metrics`` now; meanwhile a job trains without system metrics
    (``tracking.system_metrics=false``, or the job's warning when starting them fails)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, resume_logging=resumed)
    monitor.start()
    return monitor


RAY_IDLE_WORKER_MS = "idle_worker_killing_time_threshold_ms"  # a RayConfig setting (Ray's ray_config_def.h)


def init_local_ray(idle_worker_seconds: float, **options) -> Any:
    """``ray.init(**options)`` starting a local Ray whose idle task workers live ``idle_worker_seconds`` before
    Ray kills them (its default is 1 s, and a new worker imports torch again); returns Ray's context.

    Ray's own settings (RayConfig, read by its raylet and GCS) reach a Ray that ``ray.init`` starts only
    through ``ray.init``'s private ``_system_config`` argument; a cluster started with ``ray start`` reads them
    from ``RAY_<setting>`` environment variables, and ``ray.init`` refuses ``_system_config`` when it joins
    one. If it breaks (``ray.init`` calls the argument unknown, or Ray fails to start with "Received unexpected
    config parameter"), set ``RAY_idle_worker_killing_time_threshold_ms`` in the environment Ray starts in, or
    drop the setting: the job stays correct, only slower (docs/benchmarks.md)."""
    import ray

    return ray.init(_system_config={RAY_IDLE_WORKER_MS: round(idle_worker_seconds * 1000)}, **options)
