"""Checkpoints in the experiment's Models tab (docs/architecture.md, Checkpoints as logged models).

Each committed checkpoint becomes an MLflow 3 *logged model* of its run: named ``step-<8 digits>-<run name>``
(the Models tab cuts names off at the end, so the step comes first),
with the key params (stage, model, dataset, step, epoch, learning rate, batch size, seed), the metrics of
its step linked to it by ``model_id`` (so the Models tab can show and sort them), and the tag
``checkpoint.uri`` = ``runs:/<run>/checkpoints/step-<8 digits>``. The checkpoint's bytes stay where they
are, in the run's artifacts: the logged model points at them instead of holding a second copy (MLflow
would otherwise store each checkpoint twice, once per artifact location). Retention deletes the logged
model of every checkpoint it deletes. A stage's final ``model/`` becomes one more logged model,
``final-<run name>``, pointing at ``runs:/<run>/model``; only that one is also recorded as an output of the run
(the run page's "Logged models"): MLflow has no way to remove a run's output, and ``get_run`` returns them all,
so one output per commit would make every read of a week-long run grow with its checkpoints (10,000 commits:
10,000 outputs in each ``get_run``, the stop-tag poll's included).

The linked metrics are the very points the run logged (same key, value, step and timestamp): MLflow's
SQL store keeps one copy of a point logged twice, so the run's charts do not get a second value per
step. File stores (``file:``) keep both copies, so there the metrics are not linked. Nothing here may
fail training: every failure is a warning.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric

from pipeline.engine import tags as tag
from pipeline.engine.checkpointing import CHECKPOINT_DIR
from pipeline.engine.checkpoint_files import checkpoint_name

log = logging.getLogger(__name__)

MODEL_TYPE = "checkpoint"
FINAL_MODEL_TYPE = "final-model"
STEP_TAG = "checkpoint.step"
URI_TAG = "checkpoint.uri"
# The config keys every stage has that tell checkpoints apart in the Models tab (with model, dataset, step).
KEY_PARAMS = ("optim.lr", "batch_size", "seed")


def model_name(what: str, run_name: str) -> str:
    """A logged model name, what it is first (``step-00000012-3fa9c1-tiny-demo``): MLflow refuses / : . % and
    quotes in it."""
    return re.sub(r"[/:.%\"']", "_", f"{what}-{run_name}")


def links_metrics(tracking_uri: str) -> bool:
    """Whether re-logging a point with a ``model_id`` leaves the run's history as it was (SQL and server stores)."""
    return not tracking_uri.startswith("file:") and "://" in tracking_uri


class CheckpointModels:
    """The logged models of one run's checkpoints."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, run_name: str,
                 config: dict[str, Any], run_tags: dict[str, str]):
        self.client, self.run_id, self.experiment_id, self.run_name = client, run_id, experiment_id, run_name
        self.params = {"stage": run_tags.get(tag.STAGE, ""), "model": run_tags.get(tag.MODEL, ""),
                       "dataset": run_tags.get(tag.DATASET, "")}
        self.params.update({key: str(config[key]) for key in KEY_PARAMS if config.get(key) is not None})
        self.link = links_metrics(mlflow.get_tracking_uri())

    def committed(self, step: int, row: dict[str, Any], metrics: list[Metric]) -> None:
        """List the checkpoint committed at ``step`` in the Models tab."""
        name = checkpoint_name(step)
        self._create(model_name(name, self.run_name), MODEL_TYPE, step, metrics,
                     params={"step": str(step), "epoch": f"{float(row.get('epoch', 0)):.4g}"},
                     tags={STEP_TAG: str(step), URI_TAG: f"runs:/{self.run_id}/{CHECKPOINT_DIR}/{name}"},
                     what=f"checkpoint {name}")

    def final(self, step: int, metrics: list[Metric]) -> None:
        """The stage's final ``model/`` (logged in the run's artifacts) as a logged model."""
        self._create(model_name("final", self.run_name), FINAL_MODEL_TYPE, step, metrics, params={"step": str(step)},
                     tags={STEP_TAG: str(step), URI_TAG: f"runs:/{self.run_id}/model"}, what="the final model",
                     output=True)

    def deleted(self, steps: list[int]) -> None:
        """Retention deleted the checkpoints at ``steps``: delete their logged models too."""
        if not steps:
            return
        try:
            wanted = {str(s) for s in steps}
            for model in self._models():
                if model.model_type == MODEL_TYPE and model.tags.get(STEP_TAG) in wanted:
                    self.client.delete_logged_model(model.model_id)
        except Exception as err:
            log.warning("Retention deleted checkpoints %s, but their entries in the Models tab could not be "
                        "deleted (%s)", ", ".join(checkpoint_name(s) for s in steps), err)

    def _models(self):
        token = None
        while True:
            page = self.client.search_logged_models([self.experiment_id], f"source_run_id = '{self.run_id}'",
                                                    page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _create(self, name: str, model_type: str, step: int, metrics: list[Metric], params: dict[str, str],
                tags: dict[str, str], what: str, output: bool = False) -> None:
        try:
            model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                    params={**self.params, **params}, tags=tags, model_type=model_type)
            if output:  # the run page lists it
                self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
            if self.link and metrics:
                self.client.log_batch(self.run_id, metrics=[
                    Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id) for m in metrics])
            self.client.finalize_logged_model(model.model_id, "READY")
        except Exception as err:
            log.warning("Could not list %s of run %s in the Models tab (%s); the checkpoint itself is stored",
                        what, self.run_id, err)
