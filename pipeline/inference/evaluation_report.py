"""What an evaluation run shows: its per-file table (``eval/files.json``), a plot per metric (and its learning
curves with ``steps=``), a listening page, a description linking the runs it evaluated, and the Model Registry
record of the registered chain it scored (pipeline/inference/registry.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from pipeline.engine import tags as tag
from pipeline.engine.tracking import ui_url
from pipeline.inference import metrics as M
from pipeline.inference import registry
from pipeline.inference.evaluation import Plan, test_set_text
from pipeline.inference.listening import Example, write_listening_page
from pipeline.inference.scoring import Item
from pipeline.inference.summary import describe_evaluation

log = logging.getLogger(__name__)

LISTEN = 4  # files on the listening page


def log_report(client: MlflowClient, p: Plan, run_id: str, tables: list[pd.DataFrame], items: list[Item]) -> None:
    """The table of every step scored (``tables``), the plots and the listening page of the last step's
    ``items``, into ``run_id``."""
    by_step = bool(p.cfg.steps)
    client.log_table(run_id, pd.concat(tables, ignore_index=True), "eval/files.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot(tables[-1].drop(columns="step", errors="ignore"), Path(tmp) / "conditions.png")
        client.log_artifact(run_id, str(Path(tmp) / "conditions.png"), "eval")
        if by_step:
            plot_curves(pd.concat(tables, ignore_index=True), Path(tmp) / "curves.png")
            client.log_artifact(run_id, str(Path(tmp) / "curves.png"), "eval")
        examples = [Example(item.name, item.text, dict(item.audio)) for item in items[:LISTEN]]
        step_note = f" · step {p.steps[-1]}" if by_step else ""
        write_listening_page(Path(tmp) / "listening", f"evaluate · {p.mode}{step_note} · {p.key}", examples, M.RATE)
        client.log_artifacts(run_id, str(Path(tmp) / "listening"), "listening")


def plot_curves(table: pd.DataFrame, path: Path) -> None:
    """Each metric's mean over files against the checkpoint step, a line per condition (``steps=``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in M.HIGHER_IS_BETTER if c in table.columns and table[c].notna().any()]
    means = table.groupby(["condition", "step"], sort=False)[columns].mean(numeric_only=True)
    fig, axes = plt.subplots(1, len(columns), figsize=(2.8 * len(columns), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], columns):
        for index, condition in enumerate(table["condition"].unique()):
            curve = means.loc[condition, metric].sort_index()
            ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3, color=f"C{index}", label=condition)
        ax.set_xlabel("checkpoint step", fontsize=8)
        ax.set_title(f"{metric} ({'higher' if M.HIGHER_IS_BETTER[metric] else 'lower'} is better)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(table: pd.DataFrame, path: Path) -> None:
    """Each metric's mean over files, a bar per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in M.HIGHER_IS_BETTER if c in table.columns and table[c].notna().any()]
    means = table.groupby("condition", sort=False)[columns].mean(numeric_only=True)
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], columns):
        ax.bar(range(len(means)), means[metric].to_numpy(), color=[f"C{i}" for i in range(len(means))])
        ax.set_xticks(range(len(means)), means.index, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({'higher' if M.HIGHER_IS_BETTER[metric] else 'lower'} is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def describe_run(client: MlflowClient, p: Plan, run_id: str, metrics: dict[str, float]) -> None:
    """The evaluated runs tagged with ``run_id`` (``evaluation.run``), the registered chain's record, and the
    evaluation run's description: what it evaluated, the test set, the verdict and table, the listening page."""
    for evaluated in (p.what.get("vocoder_run"), p.asr_run):
        if evaluated:
            client.set_tag(evaluated, tag.EVALUATION_RUN, run_id)
    evaluated = evaluated_items(client, p)
    version = record_in_registry(client, p, metrics, run_id, evaluated)
    listening = ui_url(
        client.get_run(run_id).info.experiment_id,
        run_id,  # `mlflow run` may have chosen it
        page="artifactPath/listening/index.html",
    )
    client.set_tag(
        run_id,
        tag.NOTE,
        describe_evaluation(
            mode=p.mode,
            evaluated=evaluated,
            test_set=test_set_text(p),
            metrics=metrics,
            listening=listening,
            model_version=f"models:/{registry.MODEL_NAME}/{version}" if version else "",
        ),
    )


def _run_link(client: MlflowClient, run_id: str) -> str:
    run = client.get_run(run_id)
    return f"[{run.info.run_name}]({ui_url(run.info.experiment_id, run_id)}) (`{run_id}`)"


def evaluated_items(client: MlflowClient, p: Plan) -> list[str]:
    """What was evaluated, as Markdown items linking to the runs (the runs link back with evaluation.run)."""
    items = []
    if p.cfg.model_uri:
        items.append(f"model `{p.cfg.model_uri}`")
    if p.chain is not None:
        items.append(f"chain: {p.chain.architecture}")
    for role, run_key, step_key in (
        ("vocoder", "vocoder_run", "vocoder_step"),
        ("adapters", "adapter_run", "adapter_step"),
        ("speech recognizer (CER/WER)", "asr_run", "asr_step"),
    ):
        run_id = p.what.get(run_key)
        if run_id:
            step = p.what.get(step_key, "")
            items.append(f"{role}: {_run_link(client, run_id)}" + (f", checkpoint step {step}" if step else ""))
    return items


def record_in_registry(
    client: MlflowClient, p: Plan, metrics: dict[str, float], run_id: str, evaluated: list[str]
) -> str | None:
    """The registered chain this evaluation scored (chain mode, the latest checkpoint: the model a finetune_vocoder
    run exports): its description, tags and @champion (pipeline/inference/registry.py); its version or None.
    ``evaluated``: ``evaluated_items``."""
    if p.mode != "chain" or p.cfg.steps or p.cfg.checkpoint != "latest":
        return None
    version = registry.registered_version(client, p.cfg.model_uri, p.cfg.run_id)
    if version is None:
        return None
    chain = [item for item in evaluated if not item.startswith("model ")]
    try:
        log.info(
            "Model Registry: %s", registry.record_evaluation(client, version, metrics, run_id, test_set_text(p), chain)
        )
    except Exception as err:  # the evaluation itself is done and stored; the registry record is an extra
        log.warning("Could not record the evaluation on models:/%s/%s (%s)", registry.MODEL_NAME, version, err)
    return version
