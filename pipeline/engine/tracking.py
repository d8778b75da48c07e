"""MLflow helpers: a job's run (opened or adopted, its params and dataset inputs), the tracking store's access
check, the run description and links into the UI (docs/architecture.md, Tracking). What the loop sends without
waiting (metrics, tags) is in engine/senders.py."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Param

from pipeline.config import mask_secrets, redact
from pipeline.engine import tags as tag
from pipeline.engine.outage import first_line
from pipeline.engine.private_apis import dataset_entity, metric_steps
from pipeline.engine.senders import MAX_BATCH

# The two senders live in engine/senders.py; importable from here too until every importer names that module.
from pipeline.engine.senders import MetricLogger as MetricLogger
from pipeline.engine.senders import TagWriter as TagWriter

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000


class AccessError(RuntimeError):
    """The tracking store cannot be used by this job (unreachable, wrong credentials, no permission)."""


def access_error(err: Exception, what: str) -> AccessError | None:
    """A clear AccessError for a refusal by the server's auth (401/403), else None."""
    code = getattr(err, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = repr(user) if user else "nobody (MLFLOW_TRACKING_USERNAME is not set)"
    uri = mlflow.get_tracking_uri()
    if code == "UNAUTHENTICATED":
        return AccessError(
            f"The tracking server {uri} refused the credentials of {who}: check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; the server's admin creates users "
            "(docs/team-server.md)"
        )
    if code == "PERMISSION_DENIED":
        return AccessError(
            f"User {who} may not {what} on the tracking server {uri}. Ask the experiment's owner or the "
            "server's admin for EDIT permission on it (docs/team-server.md), or use another "
            "experiment: tracking.experiment=<name>"
        )
    return None


def check_access(client: MlflowClient) -> None:
    """One cheap read before anything else, so that an unreachable store or wrong credentials fail at
    once with one message (AccessError), not after the model is built."""
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # MLflow's own exceptions, or requests' when the server is unreachable
        raise access_error(err, "read experiments") or AccessError(
            f"Cannot use the tracking store {mlflow.get_tracking_uri()}: {first_line(err)}. "
            "Check MLFLOW_TRACKING_URI and that the server is up"
        ) from err


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment called ``name``, created when missing."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def default_run_name(run_id: str, *parts: str) -> str:
    """A default run name: the run ID's first six characters, then what the run is (``3fa9c1-tiny-demo``).
    The runs table cuts long names off at the end, so names that differ must differ at the front."""
    return "-".join([run_id[:6], *parts])


def start_or_adopt_run(
    client: MlflowClient,
    *,
    experiment: str,
    run_name: str | Callable[[str], str],
    tags: dict[str, str],
    params: dict[str, Any] | None = None,
    launcher: str | None = None,
) -> str:
    """A job's own run: ``launcher`` (the run `mlflow run` created, MLFLOW_RUN_ID), renamed, or a new run in
    ``experiment``; then named (``run_name``, or ``run_name(run_id)``), tagged, and given the params it
    does not have yet (secrets masked in all three, ``redact``; `mlflow run` logs its entry-point parameters
    first, and MLflow params cannot change)."""
    if launcher:
        run_id, untagged = launcher, tags
    else:  # created with its tags (one write: a job killed at once still leaves a run that says its stage)
        run_id, untagged = client.create_run(experiment_id(client, experiment), tags=redact(tags)).info.run_id, {}
    name = run_name(run_id) if callable(run_name) else run_name
    for key, value in redact({tag.RUN_NAME: name, **untagged}).items():
        client.set_tag(run_id, key, value)
    if params:
        existing = client.get_run(run_id).data.params
        log_params(client, run_id, {k: v for k, v in mask_secrets(params).items() if k not in existing})
    return run_id


def log_dataset_inputs(client: MlflowClient, run_id: str, datasets: list, context: str) -> None:
    """Log ``mlflow.data`` datasets as the run's inputs, tagged with their role (training, output); their names
    and sources with secrets masked (``redact``: e.g. the credentials of an ``s3://`` or ``https://`` address)."""
    entities = [dataset_entity(d) for d in datasets]
    client.log_inputs(
        run_id,
        [
            DatasetInput(
                Dataset(redact(e.name), e.digest, e.source_type, redact(e.source), e.schema, e.profile),
                [InputTag("mlflow.data.context", context)],
            )
            for e in entities
        ],
    )


def copy_history(client: MlflowClient, src_run: str, dst_run: str, max_step: int) -> int:
    """Copy every metric of ``src_run`` up to ``max_step`` into ``dst_run``; returns the count."""
    keys = client.get_run(src_run).data.metrics.keys()
    metrics = [m for key in keys for m in client.get_metric_history(src_run, key) if m.step <= max_step]
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(dst_run, metrics=metrics[i : i + MAX_BATCH])
    return len(metrics)


def latest_steps(run) -> dict[str, int]:
    """The last step logged of each metric of ``run``. MLflow keeps every metric's latest point (highest
    step) with the run, so this costs no history query, however long the run has trained."""
    return metric_steps(run)


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_base() -> str:
    """The tracking server's address without credentials, or "" for a local store (no UI runs yet)."""
    uri = urlsplit(mlflow.get_tracking_uri())
    if uri.scheme not in ("http", "https") or not uri.hostname:
        return ""
    return urlunsplit((uri.scheme, uri.hostname + (f":{uri.port}" if uri.port else ""), uri.path.rstrip("/"), "", ""))


# The runs table as the pipeline's links open it: an MLflow "shared view" stored as an experiment tag
# (``mlflow.sharedViewState.<key>``, what the UI's Share button writes), named by ``viewStateShareKey``.
RUNS_VIEW_KEY = "speech-pipeline-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_COLUMNS = [
    f"tags.`{tag.PROGRESS}`",
    "metrics.`val/loss`",
    "metrics.`val/mel`",
    "metrics.`val/cer`",
    "metrics.`val/wer`",
    "metrics.`train/loss`",
    f"tags.`{tag.MODEL}`",
    f"tags.`{tag.DATASET}`",
    f"tags.`{tag.CHECKPOINT_LATEST}`",
]  # a metric no run of the experiment logs shows no column
RUNS_VIEW = json.dumps(
    {
        "selectedColumns": RUNS_VIEW_COLUMNS,
        "columnOrder": RUNS_VIEW_COLUMNS,
        "columnWidths": {f"tags.`{tag.PROGRESS}`": 300},
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    },
    sort_keys=True,
)
# ``workflowType``: a fresh browser would otherwise open the UI's GenAI pages (traces, no runs, "Agent versions").
ML_VIEW = "workflowType=machine_learning"


def ensure_runs_view(client: MlflowClient, experiment_id: str) -> None:
    """Store the runs table view the experiment links open (progress, validation and training loss, model,
    dataset, latest checkpoint as columns) in the experiment, once. Never fails a job: a link without its
    view still opens the runs table, with the UI's default columns after a notice."""
    try:
        if client.get_experiment(experiment_id).tags.get(RUNS_VIEW_TAG) != RUNS_VIEW:
            client.set_experiment_tag(experiment_id, RUNS_VIEW_TAG, RUNS_VIEW)
    except Exception as err:
        log.warning(
            "Could not store the runs table view in experiment %s (%s); its links show MLflow's default columns",
            experiment_id,
            first_line(err),
        )


def ui_url(experiment_id: str, run_id: str | None = None, base: str | None = None, page: str = "") -> str:
    """A link into the MLflow UI, in its model-training pages: the experiment's runs table in the pipeline's
    view (``ensure_runs_view``) or another of its pages (``page="models"``, the Models tab), or a run's
    page (``page``: one of its tabs, such as ``artifactPath/checkpoints/index.csv``). ``base`` defaults to
    ``ui_base()``: with a local store the link stays relative to whatever serves the UI."""
    if run_id:
        view = f"runs/{run_id}{'/' + page if page else ''}?{ML_VIEW}"
    elif page:
        view = f"{page}?{ML_VIEW}"
    else:
        view = f"runs?{ML_VIEW}&viewStateShareKey={RUNS_VIEW_KEY}"
    return f"{(ui_base() if base is None else base).rstrip('/')}/#/experiments/{experiment_id}/{view}"


def dashboard_hint(experiment_id: str, run_id: str | None = None) -> str:
    """Where to look at a run (or an experiment) in the MLflow UI, for the closing log line."""
    if ui_base():
        return ui_url(experiment_id, run_id)
    return (
        f"mlflow ui --backend-store-uri {redact(mlflow.get_tracking_uri())}, then open "
        f"{ui_url(experiment_id, run_id, base=LOCAL_UI)}"
    )


def resume_command(stage: str, run_id: str, nproc: int = 1) -> str:
    """The command that resumes ``run_id``, with as many processes (torchrun) as it trained with."""
    launcher = f"torchrun --nproc_per_node={nproc}" if nproc > 1 else "python"
    return f"{launcher} -m pipeline.stages.{stage} resume_run={run_id}"


def describe_run(
    *,
    stage: str,
    run_id: str,
    progress: str,
    status: str,
    latest_checkpoint: str | None,
    history: list[dict[str, Any]],
    experiment_id: str = "",
    nproc: int = 1,
    batch: str = "",
    job_key: str = "",
) -> str:
    """The run's Markdown description. The UI shows its first lines until "Show more": status, progress,
    the latest checkpoint and the resume command come first; then how to stop, links, the attempts.
    ``nproc``: the processes the latest attempt trained with (torchrun); ``batch``: its effective batch;
    ``job_key``: the run's job key (resume=auto), if any."""
    ranks = f" -P nproc={nproc}" if nproc > 1 else ""
    lines = [
        f"**{status}** · {progress or 'starting'} · latest checkpoint `{latest_checkpoint or 'none yet'}`",
        "",
        f"Resume: `mlflow run . -e {stage} --env-manager local{ranks} -P resume_run={run_id}`",
        "",
        f"Or: `{resume_command(stage, run_id, nproc)}`. Stop it gracefully: set the tag "
        "`stop_requested` = `true` on this run.",
        "",
    ]
    if batch:
        lines += [f"Effective batch: {batch}", ""]
    if job_key:
        lines += [
            f"Job key `{job_key}`: a launch with `resume=auto` and this key (a requeued Slurm job) continues "
            "this run by itself.",
            "",
        ]
    if experiment_id:
        lines += [
            f"[All runs of this experiment]({ui_url(experiment_id)}) · "
            f"[checkpoints]({ui_url(experiment_id, run_id, page='artifactPath/checkpoints/index.csv')}) · "
            f"[checkpoints of every run, by metric]({ui_url(experiment_id, page='models')})",
            "",
        ]
    earlier = int(history[0]["attempt"]) - 1 if history else 0
    if earlier > 0:  # a resume reads back only the newest attempts (attempts.ATTEMPTS_SHOWN)
        lines += [f"Attempts 1-{earlier}: `config/attempt-<n>.yaml` in this run's artifacts.", ""]
    lines += ["| attempt | started (UTC) | from | overrides | status |", "|---|---|---|---|---|"]
    for h in history:
        overrides = " ".join(redact(h.get("overrides") or [])) or "—"
        lines.append(
            f"| {h['attempt']} | {h['started']} | {h.get('from') or 'fresh'} | `{overrides}` | {h.get('status', '')} |"
        )
    return "\n".join(lines)
