"""The MLflow and torch internals the pipeline relies on, each behind one function.

Neither library offers a public way to do these; a new release may rename or drop what they reach.
tests/engine/test_private_apis.py exercises every one of them against the installed versions and
fails with the name of the internal that changed, so an upgrade breaks there and not in the middle
of a training job.
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
