"""Optuna sweeps over any training stage, tracked in MLflow (docs/architecture.md, Scale and sweeps).

    python -m pipeline.sweep stage=train_adapter n_trials=20 storage=sqlite:///optuna.db study=lr-search \
        ssl=tiny trainer.max_steps=200
    mlflow run . -e sweep --env-manager local -P stage=train_adapter -P n_trials=20 -P overrides="ssl=tiny"

The search space, objective metric, direction and pruner come from ``configs/sweep/<stage>.yaml``
(``sweep.<key>=...`` overrides them). The study lives in the storage, so running the same command
again continues it, and any number of workers (processes or machines) can share one study.

MLflow: one parent run per study; each trial is a run nested under it, trained in-process by the
stage's engine, with a status that mirrors the trial (COMPLETE -> FINISHED, PRUNED -> KILLED,
FAIL -> FAILED) and a ``trial.state`` tag. The child run ID is the trial's user attribute
``mlflow_run_id``. A trial interrupted by a signal (its checkpoint committed) or by a crash (found
stale through Optuna's heartbeat) is re-queued with the same parameters and resumes into its own
child run when the study continues.

This module is the command: the study opened, its parent run and summary; the trials run in
pipeline/sweep_trials.py, and what they search is pipeline/sweep_space.py's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from pipeline.config import ConfigError, compose_config, mask_secrets, parse_command_line
from pipeline.engine import launcher_watch
from pipeline.engine import tags as tag
from pipeline.engine.cli import EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED, exit_now, setup_logging
from pipeline.engine.distributed import Dist
from pipeline.engine.launch import parse_launch
from pipeline.engine.stage import Stage
from pipeline.engine.tracking import start_or_adopt_run
from pipeline.sweep_space import SweepSpec, check_space_unchanged, load_spec, open_study, stage_class, validate
from pipeline.sweep_trials import Sweep, follow_trials, run_trials

log = logging.getLogger(__name__)

SWEEP_KEYS = ("stage", "n_trials", "storage", "study")


# --------------------------------------------------------------------------------------------
# Parent run, summary
# --------------------------------------------------------------------------------------------


def parent_run_for(
    client: MlflowClient, study: optuna.Study, created: bool, stage: str, experiment: str, params: dict[str, Any]
) -> str:
    if not created:
        for _ in range(300):  # the creating worker sets it within moments
            parent = study.user_attrs.get("mlflow_parent_run")
            if parent:
                client.update_run(parent, status="RUNNING")
                return parent
            time.sleep(0.1)
        raise ConfigError(f"Study {study.study_name!r} has no MLflow parent run; was it created by this pipeline?")
    parent = start_or_adopt_run(
        client,
        experiment=experiment,
        run_name=f"sweep-{study.study_name}",
        tags={tag.STAGE: "sweep", tag.SWEEP_STAGE: stage, tag.SWEEP_STUDY: study.study_name},
        params=params,
        launcher=os.environ.get("MLFLOW_RUN_ID"),
    )
    study.set_user_attr("mlflow_parent_run", parent)
    return parent


def set_shared_tag(client: MlflowClient, run_id: str, key: str, value: str, tries: int = 3) -> None:
    """``set_tag`` on a run that other workers write too (the study's parent run). MLflow's SQL store inserts a
    tag it did not find a moment before, so two workers setting the same new tag at once collide on the tag's
    primary key (seen with PostgreSQL); the loser writes again, which is then an update."""
    for attempt in range(1, tries + 1):
        try:
            client.set_tag(run_id, key, value)
            return
        except MlflowException as err:
            if attempt == tries or "unique" not in str(err).lower():
                raise
            log.info("Tag %s of run %s was written by another worker at the same moment; writing it again", key, run_id)


def summarise(client: MlflowClient, study: optuna.Study, parent: str, metric: str) -> None:
    """Best trial, a table of all trials and Optuna's plots, on the parent run."""
    trials = study.get_trials(deepcopy=False)
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "resume_of": t.user_attrs.get("resume_of"),
            **{f"params.{k}": v for k, v in t.params.items()},
        }
        for t in trials
    ]
    import pandas as pd

    client.log_table(parent, pd.DataFrame(rows), "trials.json")
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {
        state.name.lower(): sum(t.state == state for t in trials)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    lines = [
        f"**Optuna study `{study.study_name}`** · objective `{metric}` ({study.direction.name.lower()})",
        "",
        f"Trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed",
        "",
    ]
    if completed:
        best = study.best_trial
        set_shared_tag(client, parent, tag.BEST_TRIAL, str(best.number))
        set_shared_tag(client, parent, tag.BEST_RUN_ID, best.user_attrs.get("mlflow_run_id", ""))
        client.log_metric(parent, f"best/{metric}", best.value, step=len(trials))
        client.log_text(
            parent,
            json.dumps(
                {
                    "number": best.number,
                    "value": best.value,
                    "params": best.params,
                    "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
                },
                indent=2,
            ),
            "best_trial.json",
        )
        lines += [
            f"Best: trial {best.number}, {metric} = {best.value:.6g}, run `{best.user_attrs.get('mlflow_run_id')}`",
            "",
            "| parameter | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in best.params.items()]
    _log_plots(client, study, parent, len(completed))
    set_shared_tag(client, parent, tag.NOTE, "\n".join(lines))


def _log_plots(client: MlflowClient, study: optuna.Study, parent: str, completed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots = {"optimization_history": vis.plot_optimization_history}
    if completed >= 2 and len(study.best_trial.params) > 0:
        plots["param_importances"] = vis.plot_param_importances
        importances = optuna.importance.get_param_importances(study)
        client.log_text(parent, json.dumps(importances, indent=2), "param_importances.json")
    with tempfile.TemporaryDirectory() as tmp:
        for name, plot in plots.items():
            try:
                ax = plot(study)
                ax.figure.savefig(Path(tmp) / f"{name}.png", dpi=90, bbox_inches="tight")
                plt.close(ax.figure)
            except Exception as err:  # a plot must never fail the sweep
                log.warning("Could not draw %s: %s", name, err)
        client.log_artifacts(parent, tmp, "plots")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@dataclass
class SweepArgs:
    """The sweep's command line (the one grammar: launch arguments ``SWEEP_KEYS``, then overrides)."""

    stage: str  # the training stage swept
    n_trials: int  # trials in the study, all workers together
    storage: str  # Optuna RDB storage URL
    study: str  # study name
    spec_overrides: list[str]  # ``sweep.<key>=...`` words, without the prefix: overrides of the sweep spec
    stage_overrides: list[str]  # the other words: the stage's own, given to every trial


def parse_args(argv: list[str]) -> SweepArgs:
    """Split words into sweep arguments, ``sweep.*`` spec overrides and stage overrides."""
    line = parse_command_line(argv, SWEEP_KEYS)
    stage = line.launch.get("stage") or "train_adapter"
    try:
        n_trials = int(float(line.launch.get("n_trials") or 20))
    except ValueError as err:
        raise ConfigError(f"n_trials must be a number, not {line.launch.get('n_trials')!r}") from err
    return SweepArgs(
        stage=stage,
        n_trials=n_trials,
        storage=line.launch.get("storage") or "sqlite:///optuna.db",
        study=line.launch.get("study") or f"{stage}-sweep",
        spec_overrides=[w[len("sweep.") :] for w in line.overrides if w.startswith("sweep.")],
        stage_overrides=[w for w in line.overrides if not w.startswith("sweep.")],
    )


def run_sweep(argv: list[str]) -> int:
    """The sweep. Under torchrun (``-P nproc=N``) every trial trains on all the ranks: rank 0 runs the study
    and hands each trial's words to the others, which train it with it (``follow_trials``)."""
    dist = Dist.from_env()
    setup_logging(dist.rank)
    dist.init()
    if not dist.is_main:
        return follow_trials(dist)
    try:
        return _run_study(argv)
    finally:
        dist.broadcast(None)  # no more trials: the other ranks leave


def _run_study(argv: list[str]) -> int:
    """Check everything, open the study and its parent run, run trials, summarise."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        args = parse_args(argv)
        stage_cls = stage_class(args.stage)
        spec = load_spec(args.stage, args.spec_overrides)
        space = validate(stage_cls, spec, args.stage_overrides)
        study, created = open_study(args.storage, args.study, spec)
        check_space_unchanged(study, space)
    except (ConfigError, ValueError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT

    client = MlflowClient()
    parent = _parent_run(client, stage_cls, args, spec, study, created)
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
    sweep = Sweep(stage_cls, spec, space, args.stage_overrides, study, parent, experiment, client)
    log.info(
        "Study %r in %s: %d trials wanted; MLflow parent run %s",
        args.study,
        mask_secrets({"s": args.storage})["s"],
        args.n_trials,
        parent,
    )
    code = EXIT_OK
    try:
        code = run_trials(sweep, args.n_trials)
    finally:
        _close(client, study, parent, spec.metric, code)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    log.info("Study %r: %d trials finished; parent run %s", args.study, len(done), parent)
    return code


def _parent_run(
    client: MlflowClient, stage_cls: type[Stage], args: SweepArgs, spec: SweepSpec, study: optuna.Study, created: bool
) -> str:
    """The study's MLflow parent run, in the stage's experiment (the launcher's, under ``mlflow run``)."""
    launch = parse_launch(args.stage_overrides, stage_cls.run_inputs)  # e.g. finetune_vocoder's adapter_run=
    experiment = compose_config(args.stage, launch.overrides).tracking.experiment or args.stage
    if os.environ.get("MLFLOW_RUN_ID") and created:
        experiment = client.get_experiment(client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id).name
    params = {
        "sweep.stage": args.stage,
        "sweep.n_trials": args.n_trials,
        "sweep.storage": args.storage,
        "sweep.study": args.study,
        "sweep.metric": spec.metric,
        "sweep.direction": spec.direction,
        "sweep.pruner": spec.pruner,
        "sweep.overrides": " ".join(args.stage_overrides),
        **{f"space.{k}": v for k, v in spec.space.items()},
    }
    return parent_run_for(client, study, created, args.stage, experiment, params)


def _close(client: MlflowClient, study: optuna.Study, parent: str, metric: str, code: int) -> None:
    """The summary on the parent run and its status (RUNNING while other workers still run trials); this
    worker's own ``mlflow run`` record nested under it."""
    summarise(client, study, parent, metric)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    stopped = code in (EXIT_STOPPED, EXIT_ABORTED)
    status = "KILLED" if stopped else "RUNNING" if running else "FINISHED"
    if status == "RUNNING":
        log.info("Other workers still run trials of this study; the parent run stays RUNNING")
    else:
        client.set_terminated(parent, status)
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher and launcher != parent:  # this worker's own `mlflow run` record, nested under the study
        client.set_tag(launcher, tag.PARENT_RUN, parent)
        client.set_tag(launcher, tag.SWEEP_WORKER, "true")
        client.set_terminated(launcher, "KILLED" if stopped else "FINISHED")


def main() -> None:
    launcher_watch.watch()  # the sweep stops (its trial with a checkpoint) when its launcher is gone
    exit_now(run_sweep(sys.argv[1:]), Dist.from_env())


if __name__ == "__main__":
    main()
