"""What the figures are measured in: a throwaway tracking store, a stage built as a job builds it, the runs the
jobs leave in the store and their step times, and a stage process's start-up line.

Shared by the engine's figures (training.py, jobs.py), the data figures, corpus cleaning and the cost-growth curves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow import MlflowClient

from pipeline.engine.session import plan_job, seed_everything, torch_deterministic
from pipeline.stages import stage_class

STARTUP_LINE = re.compile(r"Startup: first step (\d+) at ([\d.]+) s after process start \((.*)\)")


@contextmanager
def working_in(workdir: str, tracking_uri: str) -> Iterator[None]:
    """Work in ``workdir`` (artifacts, checkpoint staging) with ``tracking_uri`` as the store; both back after."""
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


@contextmanager
def tracking_store() -> Iterator[MlflowClient]:
    """A throwaway SQLite tracking store with its artifacts and checkpoint staging in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, working_in(tmp, f"sqlite:///{tmp}/mlflow.db"):
        yield MlflowClient()


def build_stage(stage_name: str, overrides: list[str], client: MlflowClient):
    """The stage a job with these overrides trains, built as ``run_stage`` builds it."""
    stage_cls = stage_class(stage_name)
    plan = plan_job(stage_cls, overrides, client)
    if plan.cfg.trainer.deterministic:
        torch_deterministic()
    seed_everything(int(plan.cfg.seed))
    stage = stage_cls(plan.cfg, plan.precision, inputs=plan.inputs, resuming=False)
    stage.build()
    return stage


def run_ids(client: MlflowClient) -> set[str]:
    """The IDs of every run in the store."""
    return {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


def new_run(client: MlflowClient, before: set[str]) -> str:
    """The one run the store holds that is not among ``before`` (a job's run, found after it ran)."""
    new = run_ids(client) - before
    if len(new) != 1:
        raise RuntimeError(f"expected one new run, found {len(new)}")
    return new.pop()


def engine_stamps(client: MlflowClient, run_id: str) -> list[float]:
    """The time of each step of an engine run, from its ``train/loss`` metric timestamps (ms)."""
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    return [m.timestamp / 1000 for m in history]


def step_time(stamps: list[float], warmup: int) -> float:
    """The mean step time after the first ``warmup`` steps."""
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def stage_startup(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Run one train_adapter process; the first step's time after process start and the phases it logged."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.train_adapter", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"train_adapter {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    found = STARTUP_LINE.search(out.stderr)
    if not found:
        raise RuntimeError("the job logged no start-up line")
    phases = {}
    for part in found.group(3).split(", "):
        name, _, seconds = part.rpartition(" ")[0].rpartition(" ")
        phases[name] = float(seconds)
    return float(found.group(2)), phases
