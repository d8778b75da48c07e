"""Score a trained chain (or an ASR model) on a test set, in an MLflow run of its own.

    python -m pipeline.evaluate run_id=<finetune_vocoder run> [asr_run=<train_asr run>] [data=demo] [seed=1234]
    python -m pipeline.evaluate model_uri=models:/speech-restoration/3 noisy_dir=recordings/
    python -m pipeline.evaluate run_id=<train_asr run>
    python -m pipeline.evaluate run_id=<finetune_vocoder or pretrain_vocoder run> steps=all
    mlflow run . -e evaluate --env-manager local -P run_id=<id>

Chain mode: the last ``test_size`` utterances of a corpus (by default the demo corpus's held-out split,
the one training validates on) are degraded with a fixed seed and scored in three conditions against
the clean reference: ``degraded`` (the input), ``restored`` (the chain) and ``copy_synthesis`` (the
vocoder on the clean features: the ceiling). Metrics (pipeline/inference/metrics.py): PESQ wide band, STOI,
ESTOI, SI-SDR, log-spectral distance, DNSMOS SIG/BAK/OVRL, and with ``asr_run`` the CER/WER of that
train_asr run's model. With ``noisy_dir`` (real recordings, no references): the non-intrusive metrics
and transcripts of ``input`` and ``restored``. For a train_asr ``run_id``: CER/WER on ``clean`` and
``degraded`` audio. A pretrain_vocoder ``run_id``: ``copy_synthesis`` (and ``degraded``) only.

Learning curves: ``steps=all`` (or ``steps=500,1000``) scores each of those checkpoints of the run and logs
the metrics at the checkpoint's step (``eval/curves.png`` plots them); checkpoint-free conditions are scored once.

The ``evaluate`` run holds a per-file table (``eval/files.json``), summary metrics
``eval/<condition>/<metric>`` and ``eval/delta/<metric>`` (restored minus degraded), a plot per metric
and a listening page; it is tagged with the runs it evaluated, and they with it (``evaluation.run``).
The same evaluation again (same runs and checkpoint steps, test set, seed) reuses the finished run.

This module is the command; what is scored is decided before any run is written in
pipeline/inference/evaluation.py, scored in pipeline/inference/scoring.py and shown in
pipeline/inference/evaluation_report.py.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from pipeline.config import ConfigError, parse_key_values
from pipeline.data.audio import AudioError
from pipeline.data.corpus import CorpusError
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, setup_logging
from pipeline.engine.resume import ResumeError
from pipeline.engine.tracking import experiment_id, log_dataset_inputs, start_or_adopt_run
from pipeline.inference.chain import load_chain, resolve_chain
from pipeline.inference.evaluation import EvaluateConfig, Plan, plan, test_dataset
from pipeline.inference.evaluation_report import describe_run, evaluated_items, log_report, record_in_registry
from pipeline.inference.scoring import MODEL_FREE, condition_items, score, summary
from pipeline.inference.summary import text_table, verdict

log = logging.getLogger(__name__)

EXPERIMENT = "evaluate"


def parse_args(argv: list[str]) -> EvaluateConfig:
    """``key=value`` words (the one grammar: ``config.parse_key_values``), checked."""
    cfg = parse_key_values(EvaluateConfig, argv)
    if bool(cfg.run_id) == bool(cfg.model_uri):
        raise ConfigError("Give exactly one of run_id=<finetune_vocoder or train_asr run> or model_uri=<models:/…>")
    if cfg.checkpoint not in ("latest", "best") and not cfg.checkpoint.isdigit():
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}; choose latest, best or a step number")
    if cfg.steps:
        if not cfg.run_id:
            raise ConfigError(
                "steps= scores several checkpoints of one run: give run_id=<finetune_vocoder or "
                "pretrain_vocoder run>, not model_uri"
            )
        if cfg.steps != "all" and not all(w.strip().isdigit() for w in cfg.steps.split(",")):
            raise ConfigError(f"steps={cfg.steps!r}; give all or step numbers separated by commas (steps=500,1000)")
    if cfg.test_size < 1:
        raise ConfigError(f"test_size={cfg.test_size} must be at least 1")
    return cfg


def finished_evaluation(client: MlflowClient, key: str):
    found = client.search_runs(
        [experiment_id(client, EXPERIMENT)],
        f"tags.`{tag.EVAL_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def print_summary(metrics: dict[str, float], run_id: str, page: str) -> None:
    lines = ["", *text_table(metrics)]
    if sentence := verdict(metrics):
        lines += ["", sentence]
    lines += ["", f"Evaluation run {run_id}; listening page: {page}", ""]
    sys.stdout.write("\n".join(lines))


def _chain_at(client: MlflowClient, p: Plan, index: int):
    """The chain of ``p.steps[index]`` (the first is loaded by ``plan``)."""
    if index == 0:
        return p.chain
    with tempfile.TemporaryDirectory(prefix="evaluate-") as workdir:  # load_chain reads the checkpoints whole
        source = resolve_chain(client, p.cfg.run_id, None, p.steps[index], Path(workdir), vocoder_only=True)
        return load_chain(source, p.chain.precision)


def evaluate_in_run(client: MlflowClient, p: Plan, run_id: str) -> dict[str, float]:
    """Restore and score the test set at each of ``p.steps`` (metrics logged at that step with ``steps=``, at 0
    otherwise), and log the table, plots and listening page (of the last step) into ``run_id``."""
    by_step = bool(p.cfg.steps)
    tables, fixed = [], None
    for index, step in enumerate(p.steps):
        items = condition_items(p.mode, _chain_at(client, p, index), p.cfg)
        table = score(items, p.transcriber, quality=p.mode != "asr", skip=() if fixed is None else MODEL_FREE)
        if fixed is None:
            fixed = table[table["condition"].isin(MODEL_FREE)]
        else:
            table = pd.concat([fixed, table], ignore_index=True)
        metrics = summary(table)
        client.log_batch(
            run_id, metrics=[mlflow.entities.Metric(k, v, 0, int(step) if by_step else 0) for k, v in metrics.items()]
        )
        if by_step:
            log.info(
                "Step %s: %s",
                step,
                ", ".join(
                    f"{k.removeprefix('eval/')} {v:.3f}"
                    for k, v in metrics.items()
                    if k.endswith(("/stoi", "/pesq_wb", "/dnsmos_ovrl"))
                ),
            )
            table.insert(0, "step", int(step))
        tables.append(table)
    log_report(client, p, run_id, tables, items)
    return metrics


def reuse(client: MlflowClient, p: Plan, done, launcher: str | None) -> None:
    """The finished evaluation ``done`` of the same key stands for this one: ``launcher`` (the run `mlflow run`
    made for this command) points at it, the registered chain's record is brought up to date, its summary shown."""
    log.info("Reusing finished evaluation run %s (same runs, checkpoint steps, test set and seed)", done.info.run_id)
    if launcher:
        client.set_tag(launcher, tag.EVALUATION_RUN, done.info.run_id)
        client.set_tag(launcher, tag.NOTE, f"Reused the finished evaluation run {done.info.run_id}.")
    record_in_registry(client, p, done.data.metrics, done.info.run_id, evaluated_items(client, p))
    print_summary(done.data.metrics, done.info.run_id, f"runs:/{done.info.run_id}/listening/index.html")


def open_run(client: MlflowClient, p: Plan, launcher: str | None) -> str:
    """The evaluation run (``launcher``'s, under `mlflow run`), tagged with what it evaluates and the key."""
    tags = {
        tag.STAGE: EXPERIMENT,
        tag.EVAL_KEY: p.key,
        tag.EVAL_MODE: p.mode,
        tag.MODEL: "hifigan" if p.chain else "conformer-ctc",
        tag.DATASET: "noisy_dir" if p.mode == "noisy" else p.cfg.data,
    }
    links = {
        tag.EVAL_VOCODER_RUN: p.what.get("vocoder_run"),
        tag.EVAL_ADAPTER_RUN: p.what.get("adapter_run"),
        tag.EVAL_ASR_RUN: p.asr_run,
        tag.EVAL_MODEL: p.cfg.model_uri,
    }
    return start_or_adopt_run(
        client,
        experiment=EXPERIMENT,
        run_name=f"{p.key[:6]}-evaluate-{p.mode}",
        tags={**tags, **{k: v for k, v in links.items() if v}},
        params={**asdict(p.cfg), **p.what},
        launcher=launcher,
    )


def run(argv: list[str], adopt_launcher: bool = True) -> int:
    """The command; ``adopt_launcher=False`` when called in-process by another entry point (main), whose
    ``mlflow run`` run must not become the evaluation run."""
    setup_logging()
    client = MlflowClient()
    try:
        with tempfile.TemporaryDirectory(prefix="evaluate-") as workdir:  # plan() loads the checkpoints whole
            p = plan(parse_args(argv), client, Path(workdir))
    except (ConfigError, ResumeError, CheckpointError, AudioError, CorpusError, ValueError, OSError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    launcher = os.environ.get("MLFLOW_RUN_ID") if adopt_launcher else None
    done = finished_evaluation(client, p.key) if p.cfg.reuse else None
    if done is not None:
        reuse(client, p, done, launcher)
        return EXIT_OK
    run_id = open_run(client, p, launcher)
    status = "FAILED"
    try:
        log_dataset_inputs(client, run_id, [test_dataset(p)], "evaluation")
        metrics = evaluate_in_run(client, p, run_id)
        describe_run(client, p, run_id, metrics)
        status = "FINISHED"
    except Exception:
        log.exception("Evaluation failed")
        return EXIT_FAILED
    finally:
        client.set_terminated(run_id, status)
    print_summary(metrics, run_id, f"runs:/{run_id}/listening/index.html")
    return EXIT_OK


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
