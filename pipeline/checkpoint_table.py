"""The checkpoint table across runs: ``python -m pipeline.checkpoint_table [--model M] [--dataset D]``.

Reads every run's ``checkpoints/index.csv`` (one row per kept checkpoint) from the tracking store
given by MLFLOW_TRACKING_URI, and prints name, model, dataset, epoch, step, size, created, run ID,
stage and the key metrics, as a table, CSV or JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.checkpointing import read_index

log = logging.getLogger(__name__)

COLUMNS = ["name", "model", "dataset", "epoch", "step", "size", "created", "run_id", "stage"]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def checkpoint_table(
    client: MlflowClient, model: str | None = None, dataset: str | None = None, stage: str | None = None
) -> pd.DataFrame:
    """One row per committed checkpoint still kept, newest first."""
    filters = ["tags.`checkpoint.latest` != ''"]
    for key, value in (("model", model), ("dataset", dataset), ("stage", stage)):
        if value:
            filters.append(f"tags.{key} = {_quote(value)}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    frames = []
    page_token = None
    while experiments:
        runs = client.search_runs(experiments, " and ".join(filters), max_results=1000, page_token=page_token)
        for run in runs:
            try:
                rows = read_index(client, run.info.run_id)
            except CheckpointError as err:  # one unreachable run does not hide the others
                log.warning("%s", err)
                continue
            if rows:
                frame = pd.DataFrame(rows)
                frame["run_id"] = run.info.run_id
                frame["stage"] = run.data.tags.get(tag.STAGE)
                frames.append(frame)
        page_token = runs.token
        if not page_token:
            break
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    metrics = sorted(c for c in table.columns if c not in COLUMNS)
    for col in ["epoch", "step", "size", *metrics]:
        table[col] = pd.to_numeric(table[col], errors="coerce")
    return (
        table[COLUMNS + metrics].sort_values(["created", "step"], ascending=False, kind="stable").reset_index(drop=True)
    )


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List checkpoints across MLflow runs.")
    parser.add_argument("--model", help="only this model (the run tag `model`, e.g. mhubert_147)")
    parser.add_argument("--dataset", help="only this dataset (the run tag `dataset`, e.g. demo)")
    parser.add_argument("--stage", help="only this stage (e.g. train_adapter)")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    table = checkpoint_table(MlflowClient(), args.model, args.dataset, args.stage)
    if args.format == "csv":
        sys.stdout.write(table.to_csv(index=False))
    elif args.format == "json":
        records = json.loads(table.to_json(orient="records"))  # NaN -> null
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
    elif table.empty:
        sys.stdout.write("no checkpoints found\n")
    else:
        shown = table.assign(size=table["size"].map(_human_size))
        sys.stdout.write(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
