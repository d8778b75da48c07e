"""Clean a corpus with a trained restoration chain: a distributed, resumable, tracked job on Ray Data.

    python -m pipeline.clean_corpus model_uri=models:/speech-restoration/3 input=crawl/ output=clean/
    python -m pipeline.clean_corpus run_id=<finetune_vocoder run> input=s3://bucket/crawl/ output=s3://bucket/clean/ \
        keep.min_ovrl=3.0 keep.min_speaker_similarity=0.75
    python -m pipeline.clean_corpus resume_run=<this job's run>          # after a kill: finishes the job
    mlflow run . -e clean_corpus --env-manager local -P model_uri=... -P input=... -P output=...

Every input (a directory tree, a glob, a CSV/Parquet manifest with a ``path`` column, or prepare_data's
shards; local or ``s3://``) ends as one row of ``<output>/manifest.parquet``: ``restored`` with its output
file (same relative path, WAV or FLAC) and quality scores, ``skipped: <reason>`` or ``failed: <error>``;
``keep`` says whether it meets the ``keep.*`` thresholds. By default a local Ray is started inside the job
with this machine's cores; ``ray_address=auto`` or ``ray://host:10001`` joins a running cluster
(docs/cleaning.md). The job is one MLflow run (experiment ``clean_corpus``): progress by step, the rows
committed every ``commit_seconds``, the manifest, a summary, score histograms and a listening page.
Bad input (an unknown model, a missing input, an output inside the input, an unreachable Ray address,
thresholds out of range) gives one message and exit code 2 before anything is written.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline.common.files import contained
from pipeline.config import ConfigError
from pipeline.data.audio import AudioError
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.cli import setup_logging
from pipeline.engine.lease import Lease, LeaseHeld
from pipeline.engine.outcomes import BAD_INPUT, FAILED, FINISHED, STOPPED, STORAGE_FAILED, Outcome
from pipeline.engine.resume import ResumeError
from pipeline.engine.stage import Precision
from pipeline.engine.tracking import start_or_adopt_run
from pipeline.inference.chain import RestorationChain, resolve_chain
from pipeline.inference.cleaning import report, sources
from pipeline.inference.cleaning.config import (
    EXPERIMENT,
    FORMATS,
    STAGE,
    CleanCorpusConfig,
    check,
    flat_params,
    parse_args,
    resumed_config,
)
from pipeline.inference.cleaning.dataflow import OUTPUT_EXISTS, RETRYABLE
from pipeline.inference.cleaning.job import (
    Settings,
    Stop,
    Tracker,
    check_resources,
    checkpoint_files,
    cluster_text,
    run_pipeline,
    settings,
    start_ray,
    stop_ray,
)
from pipeline.inference.cleaning.manifest import (
    as_table,
    commit_preexisting,
    committed_rows,
    keep_column,
    read_preexisting,
)

log = logging.getLogger(__name__)

LEASE_TIMEOUT_S, LEASE_HEARTBEAT_S = 60.0, 10.0


def describe(cfg: CleanCorpusConfig, run_id: str, status: str, progress: str, source: dict, results: str = "") -> str:
    lines = [
        f"**{status}** · {progress}",
        "",
        f"Resume: `mlflow run . -e {STAGE} --env-manager local --experiment-name {EXPERIMENT} -P resume_run={run_id}`",
        "",
        f"Or: `python -m pipeline.{STAGE} resume_run={run_id}`. Stop it gracefully: set the tag "
        "`stop_requested` = `true` on this run, or send SIGTERM.",
        "",
        f"Input `{cfg.input}` → output `{cfg.output}` ({cfg.format}); "
        f"manifest: `{sources.join(cfg.output, 'manifest.parquet')}`",
        "",
        f"Chain: vocoder run `{source.get('vocoder_run', '?')}` step {source.get('vocoder_step', '?')}, adapter run "
        f"`{source.get('adapter_run', '?')}` step {source.get('adapter_step', '?')}",
    ]
    return "\n".join(lines + (["", results] if results else []))


@dataclass
class Prepared:
    cfg: CleanCorpusConfig
    units: list[sources.Unit]
    files: dict[str, bytes]  # the chain's checkpoints
    metadata: dict[str, str]
    rate_in: int
    rate_out: int


def prepare(client: MlflowClient, argv: list[str]) -> Prepared:
    """Everything checked before a run is written: config, input, output, the chain (loaded once here)."""
    cfg = parse_args(argv)
    if cfg.resume_run:
        cfg = resumed_config(client, argv, cfg)
    check(cfg)
    units = sources.list_units(cfg.input, FORMATS[cfg.format][0])
    with tempfile.TemporaryDirectory(prefix="clean-corpus-") as workdir:
        source = resolve_chain(client, cfg.run_id, cfg.model_uri, cfg.checkpoint, Path(workdir))
        chain = RestorationChain.from_checkpoints(
            source.adapter_dir, source.vocoder_dir, Precision.from_config("cpu", "32"), ssl_weights=cfg.ssl_weights
        )
        files = checkpoint_files(source.adapter_dir, source.vocoder_dir)
    return Prepared(cfg, units, files, dict(source.metadata), chain.rate_in, chain.rate_out)


def open_run(client: MlflowClient, p: Prepared) -> tuple[str, Lease, int, pd.DataFrame]:
    """(run ID, its lease, attempt number, rows committed before) of a new job or of the job resumed."""
    cfg = p.cfg
    if cfg.resume_run:
        run = client.get_run(cfg.resume_run)
        lease = Lease(client, cfg.resume_run, LEASE_TIMEOUT_S, LEASE_HEARTBEAT_S).acquire(run.data.tags)
        attempt = int(run.data.tags.get(tag.RESUME_COUNT, "0")) + 1
        client.set_tag(cfg.resume_run, tag.RESUME_COUNT, str(attempt))
        client.update_run(cfg.resume_run, "RUNNING")
        launcher = os.environ.get("MLFLOW_RUN_ID")
        if launcher and launcher != cfg.resume_run:  # the run `mlflow run` made for this attempt points at the job
            client.set_tag(launcher, tag.ATTEMPT_OF, cfg.resume_run)
            client.set_tag(
                launcher,
                tag.NOTE,
                f"Attempt {attempt + 1} of the {STAGE} job {cfg.resume_run}; its rows, "
                "metrics and manifest are in that run.",
            )
        return cfg.resume_run, lease, attempt, committed_rows(client, cfg.resume_run)
    params = {**flat_params(cfg), **{f"chain.{k}": v for k, v in p.metadata.items()}, "inputs": str(len(p.units))}
    tags = {
        tag.STAGE: STAGE,
        tag.MODEL: "hifigan",
        tag.DATASET: cfg.input,
        tag.CHAIN_VOCODER_RUN: p.metadata.get("vocoder_run", ""),
        tag.CHAIN_ADAPTER_RUN: p.metadata.get("adapter_run", ""),
    }
    run_id = start_or_adopt_run(
        client,
        experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT,
        run_name=lambda rid: f"{rid[:6]}-clean-corpus",
        tags={k: v for k, v in tags.items() if v},
        params=params,
        launcher=os.environ.get("MLFLOW_RUN_ID"),
    )
    lease = Lease(client, run_id, LEASE_TIMEOUT_S, LEASE_HEARTBEAT_S).acquire({}, contended=False)
    return run_id, lease, 0, as_table([])


def protected_outputs(client: MlflowClient, run_id: str, cfg: CleanCorpusConfig) -> set[str]:
    """The output names this job must not replace: those that existed before it wrote anything (recorded in the
    run before the first write, so a resume tells them from its own), none with ``overwrite=true``."""
    before = read_preexisting(client, run_id)
    if before is None:
        before = sources.existing_outputs(cfg.output)
        commit_preexisting(client, run_id, before)
    if before and not cfg.overwrite:
        log.info("%d output file(s) existed before this job: they are kept (overwrite=true replaces them)", len(before))
    return set() if cfg.overwrite else before


def pending_units(
    units: list[sources.Unit], done: pd.DataFrame, protected: set[str]
) -> tuple[list[dict], pd.DataFrame]:
    """(the units still to read, rows decided now). A file or sample is done when it has a committed row that is
    not retryable; a file whose output existed before the job is skipped here, unread. A shard carries the ids
    already done and its protected outputs."""
    final = done[~done["status"].astype(str).str.startswith(RETRYABLE)]
    ids = set(final["id"])
    out, kept = [], []
    for unit in units:
        if unit.kind == "file" and unit.id not in ids:
            if unit.output in protected:
                kept.append({"id": unit.id, "source": unit.source, "output": "", "status": OUTPUT_EXISTS})
            else:
                out.append(asdict(unit))
        elif unit.kind == "shard":
            stem = unit.id.removesuffix(".tar") + "/"
            skip = [i for i in ids if i.startswith(stem)]
            if len(skip) < unit.samples or not unit.samples:
                out.append({**asdict(unit), "skip": skip, "protected": [n for n in protected if n.startswith(stem)]})
    return out, as_table([pd.DataFrame(kept)] if kept else [])


class ManifestUnwritable(Exception):
    """The output cannot take the final manifest (full, read-only, gone): every row is committed to the run,
    so a resume writes it once the output is fixed."""


def finish(client: MlflowClient, run_id: str, p: Prepared, tracker: Tracker) -> dict[str, float]:
    """Write the manifest (output and run), the summary, histograms and listening page; the results in Markdown."""
    cfg = p.cfg
    table = tracker.rows().reset_index(drop=True)
    table["keep"] = keep_column(table, cfg.keep)
    data = io.BytesIO()
    table.to_parquet(data, index=False)
    target = contained(cfg.output, "manifest.parquet")
    try:
        sources.write_atomic(target, data.getvalue())
    except OSError as err:
        raise ManifestUnwritable(f"Cannot write the manifest {target}: {err}") from err
    figures = report.summary(table)
    tracker.fence()
    with tempfile.TemporaryDirectory() as tmp:
        table.to_parquet(Path(tmp) / "manifest.parquet", index=False)
        client.log_artifact(run_id, str(Path(tmp) / "manifest.parquet"), "manifest")
        client.log_table(run_id, report.summary_table(table), "summary/summary.json")
        report.histogram(table, Path(tmp) / "scores.png")
        client.log_artifact(run_id, str(Path(tmp) / "scores.png"), "plots")
        report.write_page(
            table, Path(tmp) / "listening", f"clean_corpus · {cfg.input}", cfg.listen_random, cfg.listen_lowest
        )
        client.log_artifacts(run_id, str(Path(tmp) / "listening"), "listening")
    now = int(pd.Timestamp.now().timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"summary/{k}", v, now, len(table)) for k, v in figures.items()])
    return figures


def results_markdown(figures: dict[str, float]) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in figures.items())
    return (
        f"| result | value |\n|---|---|\n{rows}\n\nListening page: `listening/index.html` in this run's "
        "artifacts; the manifest: `manifest/manifest.parquet`; histograms: `plots/scores.png`."
    )


def run(argv: list[str]) -> int:
    setup_logging()
    client = MlflowClient()
    try:
        p = prepare(client, argv)
    except (ConfigError, ResumeError, CheckpointError, AudioError, ValueError, OSError) as err:
        log.error("%s", err)
        return BAD_INPUT.code
    if p.cfg.resume_run and client.get_run(p.cfg.resume_run).info.status == "FINISHED":
        log.info(
            "Run %s is finished: nothing to resume (manifest: %s)",
            p.cfg.resume_run,
            sources.join(p.cfg.output, "manifest.parquet"),
        )
        return FINISHED.code
    try:
        start_ray(p.cfg.ray_address, p.cfg.ray_object_store_mb)
    except Exception as err:  # ConnectionError, or Ray's own errors for a bad address
        log.error(
            "Cannot reach the Ray cluster at ray_address=%s: %s. Start it with `ray start --head` (docs/cleaning.md) "
            "or leave ray_address empty for a local Ray.",
            p.cfg.ray_address,
            str(err).splitlines()[0][:300],
        )
        return BAD_INPUT.code
    try:
        s = settings(p.cfg, p.rate_in)
        check_resources(s)
        run_id, lease, attempt, done = open_run(client, p)
    except (ConfigError, LeaseHeld) as err:
        log.error("%s", err)
        stop_ray()
        return BAD_INPUT.code
    return run_job(client, p, s, run_id, lease, attempt, done)


@dataclass
class Ending:
    """How a cleaning job ended (engine/outcomes.py), the description's first words when not the run's status,
    and a finished job's summary figures."""

    outcome: Outcome = FAILED
    headline: str = ""
    figures: dict[str, float] = field(default_factory=dict)


def run_job(
    client: MlflowClient, p: Prepared, s: Settings, run_id: str, lease: Lease, attempt: int, done: pd.DataFrame
) -> int:
    """Clean in the opened run and end the run as the job ended, unless another job took it over; the exit code."""
    total = sum(u.samples if u.kind == "shard" else 1 for u in p.units)
    tracker = Tracker(client, run_id, attempt, total, done, lease.fence)
    stop = Stop(client, run_id)
    ending = Ending()
    try:
        ending = clean(client, p, s, run_id, tracker, stop)
    except ManifestUnwritable as err:
        ending = Ending(STORAGE_FAILED, "STOPPED: the manifest could not be written")
        log.error(
            "%s. Every row is committed to the run: free space (or fix the output) and resume with: "
            "python -m pipeline.%s resume_run=%s",
            err,
            STAGE,
            run_id,
        )
    except KeyboardInterrupt:  # a second signal: stopped at once
        ending = Ending(STOPPED)
    except Exception:
        log.exception("The cleaning job failed; resume with: python -m pipeline.%s resume_run=%s", STAGE, run_id)
    finally:
        stop.restore()
        stop_ray()
        if lease.held:
            end_run(client, run_id, p, tracker, ending)
        lease.release()
    if ending.outcome is FINISHED:
        log.info(
            "Done: %d of %d inputs restored (%d skipped, %d failed), %d kept, %.3f h of audio. Manifest: %s; run %s",
            *(ending.figures[k] for k in ("restored", "files", "skipped", "failed", "kept", "audio_hours")),
            sources.join(p.cfg.output, "manifest.parquet"),
            run_id,
        )
    return ending.outcome.code


def clean(client: MlflowClient, p: Prepared, s: Settings, run_id: str, tracker: Tracker, stop: Stop) -> Ending:
    """The inputs still to do cleaned in the run (the inputs decided without reading them committed first)."""
    import ray

    cfg, done, total = p.cfg, tracker.done, tracker.total
    client.set_tag(run_id, tag.NOTE, describe(cfg, run_id, "RUNNING", f"{len(done)}/{total} inputs", p.metadata))
    tracker.fence()
    units, decided = pending_units(p.units, done, protected_outputs(client, run_id, cfg))
    retry = int(done["status"].astype(str).str.startswith(RETRYABLE).sum())
    log.info(
        "Cleaning %d inputs (%d done before%s) into %s; run %s",
        total,
        len(done) - retry,
        f", {retry} to try again" if retry else "",
        cfg.output,
        run_id,
    )
    if len(decided):
        tracker.add(decided)
        tracker.commit()
    client.set_tag(run_id, tag.CLEAN_CLUSTER, cluster_text(s))
    client.set_tag(run_id, tag.CLEAN_PRECISION, f"{s.restore['device']} / {s.restore['precision']}")
    outcome = run_pipeline(units, s, ray.put(p.files), tracker, stop)
    if outcome is FINISHED:
        return Ending(FINISHED, figures=finish(client, run_id, p, tracker))
    if outcome is STORAGE_FAILED:
        log.error(
            "The output storage is full (%s); the rows in hand are committed. Free space and resume with: "
            "python -m pipeline.%s resume_run=%s (it redoes every 'failed (retryable)' input)",
            cfg.output,
            STAGE,
            run_id,
        )
        return Ending(STORAGE_FAILED, "STOPPED: output storage full")
    log.warning(
        "Stopped (%s) with %d of %d inputs done; resume with: python -m pipeline.%s resume_run=%s",
        stop.by,
        len(tracker.rows()),
        total,
        STAGE,
        run_id,
    )
    return Ending(outcome)


def end_run(client: MlflowClient, run_id: str, p: Prepared, tracker: Tracker, ending: Ending) -> None:
    """The run's description (its first words, the progress, a finished job's results) and its status."""
    status = ending.outcome.status
    headline = ending.headline or ("STOPPED" if status == "KILLED" else status)
    results = results_markdown(ending.figures) if ending.outcome is FINISHED else ""
    progress = f"{len(tracker.rows())}/{tracker.total} inputs"
    client.set_tag(run_id, tag.NOTE, describe(p.cfg, run_id, headline, progress, p.metadata, results))
    client.set_terminated(run_id, status)


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
