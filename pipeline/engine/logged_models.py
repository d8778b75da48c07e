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

A checkpoint's logged model is made (PENDING) when the metrics of its step are first sent: the metric sender
links those points by ``model_id`` in the same call that stores them (``CheckpointLink``), so each point is stored
once. It becomes READY when the checkpoint is committed. Linking a point already stored would log it a second time,
and MLflow's SQL store then looks up the duplicate among the run's whole history (in SQLite 1.35 s per commit at
2 million points, 12 s at 20 million; docs/benchmarks.md, Cost growth): a commit would cost more the longer the run.
A model left PENDING by a job that died before its commit is deleted (or made READY if the commit happened) when
the run is resumed. File stores (``file:``) keep both copies of a point logged twice, so there the metrics are not
linked. Nothing here may fail training: every failure is a warning.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import checkpoint_name
from pipeline.engine.checkpointing import CHECKPOINT_DIR

log = logging.getLogger(__name__)

MODEL_TYPE = "checkpoint"
FINAL_MODEL_TYPE = "final-model"
STEP_TAG = "checkpoint.step"
URI_TAG = "checkpoint.uri"
# A resume looks for models its dead predecessor left PENDING among the run's newest this many (a job has at most two
# checkpoints in flight: one being written, one whose metrics are being sent).
NEWEST_TIDIED = 10
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

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        run_name: str,
        config: dict[str, Any],
        run_tags: dict[str, str],
    ):
        self.client, self.run_id, self.experiment_id, self.run_name = client, run_id, experiment_id, run_name
        self.params = {
            "stage": run_tags.get(tag.STAGE, ""),
            "model": run_tags.get(tag.MODEL, ""),
            "dataset": run_tags.get(tag.DATASET, ""),
        }
        self.params.update({key: str(config[key]) for key in KEY_PARAMS if config.get(key) is not None})
        self.link_metrics = links_metrics(mlflow.get_tracking_uri())

    def link(self, step: int, row: dict[str, Any]) -> CheckpointLink:
        """The logged model of the checkpoint being saved at ``step``, made when first asked for."""
        return CheckpointLink(self, step, row)

    def committed(self, step: int, row: dict[str, Any], link: CheckpointLink | None = None) -> None:
        """The checkpoint at ``step`` is committed: its logged model (made now if the metric sender has not) is
        READY; points of its step that were sent before it existed (``link.relog``) are linked now."""
        link = link or self.link(step, row)
        model_id = link.model_id()
        if model_id is None:
            return
        try:
            if self.link_metrics and link.relog:
                self.client.log_batch(self.run_id, metrics=_with_model(link.relog, model_id))
            self.client.finalize_logged_model(model_id, "READY")
        except Exception as err:
            log.warning(
                "Checkpoint %s is committed, but its entry in the Models tab could not be made ready (%s)",
                checkpoint_name(step),
                err,
            )

    def final(self, step: int, metrics: list[Metric]) -> None:
        """The stage's final ``model/`` (logged in the run's artifacts) as a logged model. Its step's points were
        stored already (linked to the last checkpoint's model), so linking them costs one duplicate lookup; once per
        run."""
        model_id = self._create(
            model_name("final", self.run_name),
            FINAL_MODEL_TYPE,
            params={"step": str(step)},
            tags={STEP_TAG: str(step), URI_TAG: f"runs:/{self.run_id}/model"},
            what="the final model",
        )
        if model_id is None:
            return
        try:
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step)])  # the run page lists it
            if self.link_metrics and metrics:
                self.client.log_batch(self.run_id, metrics=_with_model(metrics, model_id))
            self.client.finalize_logged_model(model_id, "READY")
        except Exception as err:
            log.warning("Could not list the final model of run %s in the Models tab (%s)", self.run_id, err)

    def resumed(self, committed_step: int) -> None:
        """On a resume of the run whose latest commit is ``committed_step``: the models the previous attempt left
        PENDING (among the run's newest: nothing was made since it died). Up to that step their checkpoint was
        committed (the job died before marking them READY); past it, it never was: deleted."""
        try:
            newest = self.client.search_logged_models(
                [self.experiment_id],
                f"source_run_id = '{self.run_id}'",
                max_results=NEWEST_TIDIED,
                order_by=[{"field_name": "creation_timestamp", "ascending": False}],
            )
            for model in newest:
                if model.model_type != MODEL_TYPE or model.status != LoggedModelStatus.PENDING:
                    continue
                if int(model.tags.get(STEP_TAG, "-1")) <= committed_step:
                    self.client.finalize_logged_model(model.model_id, "READY")
                else:
                    self.client.delete_logged_model(model.model_id)
        except Exception as err:
            log.warning(
                "Could not tidy the Models tab entries of checkpoints an earlier attempt did not commit (%s)", err
            )

    def abandoned(self, link: CheckpointLink) -> None:
        """The checkpoint of ``link`` could not be committed: its model (if made) goes (best effort; else the
        resume tidies it)."""
        model_id = link.abandon()
        if model_id is not None:
            try:
                self.client.delete_logged_model(model_id)
            except Exception as err:
                log.debug("Could not delete the model of uncommitted checkpoint %s (%s)", link.step, err)

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
            log.warning(
                "Retention deleted checkpoints %s, but their entries in the Models tab could not be deleted (%s)",
                ", ".join(checkpoint_name(s) for s in steps),
                err,
            )

    def _models(self):
        token = None
        while True:
            page = self.client.search_logged_models(
                [self.experiment_id], f"source_run_id = '{self.run_id}'", page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return

    def _create(
        self, name: str, model_type: str, params: dict[str, str], tags: dict[str, str], what: str
    ) -> str | None:
        """A PENDING logged model of this run; its ID, or None (warned) when the store refused."""
        try:
            return self.client.create_logged_model(
                self.experiment_id,
                name=name,
                source_run_id=self.run_id,
                params={**self.params, **params},
                tags=tags,
                model_type=model_type,
            ).model_id
        except Exception as err:
            log.warning(
                "Could not list %s of run %s in the Models tab (%s); the checkpoint itself is stored",
                what,
                self.run_id,
                err,
            )
            return None


class CheckpointLink:
    """The logged model of one checkpoint being saved, shared by the metric sender (which links the points of its
    step in the call that first stores them) and the checkpoint writer (which marks it READY at the commit). It is
    made once, by whichever asks first; a failed attempt is tried again by the next one."""

    def __init__(self, models: CheckpointModels, step: int, row: dict[str, Any]):
        self.models, self.step, self.row = models, step, row
        self.relog: list[Metric] = []  # points of this step stored before the link was asked for (see MetricLogger)
        self.made_id: str | None = None
        self._abandoned = False
        self._lock = threading.Lock()

    def model_id(self) -> str | None:
        with self._lock:
            if self.made_id is None and not self._abandoned:
                name = checkpoint_name(self.step)
                self.made_id = self.models._create(
                    model_name(name, self.models.run_name),
                    MODEL_TYPE,
                    params={"step": str(self.step), "epoch": f"{float(self.row.get('epoch', 0)):.4g}"},
                    tags={STEP_TAG: str(self.step), URI_TAG: f"runs:/{self.models.run_id}/{CHECKPOINT_DIR}/{name}"},
                    what=f"checkpoint {name}",
                )
            return self.made_id

    def abandon(self) -> str | None:
        """The checkpoint will not be committed: no model is made from now on; the one made already, if any."""
        with self._lock:
            self._abandoned = True
            return self.made_id

    def metric_model_id(self) -> str | None:
        """The model ID to store this step's points with, or None where points are not linked (file stores)."""
        return self.model_id() if self.models.link_metrics else None


def _with_model(metrics: list[Metric], model_id: str) -> list[Metric]:
    return [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in metrics]
