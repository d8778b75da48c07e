"""Kill soak of ``clean_corpus``: the cleaning job SIGKILLed again and again, resumed each time, compared with
a job that never stopped.

    python -m pipeline.ops.soak --job clean_corpus --kills 20 --seed 1 [--files 20] [--workdir DIR]
        [--chain-run <finetune_vocoder run> --tracking-uri <its store>]

A corpus of ``--files`` short files (1.3 s of the demo corpus each) is cleaned by a tiny chain (``--chain-run``, or
one trained first in the work directory as the tests' ``chain`` fixture trains it): restore only (``scores=false``),
two files per batch, each batch made 0.5 s slower at the ``clean.restore`` fault point (as a real chain is slower
than the tiny one) so that kills fall among batches in flight, rows committed every 0.2 s. First an uninterrupted job
of the same corpus runs (the reference: its start-up and its work time scale the kill moments); then the soaked job
is killed ``--kills`` times: the first kill after its first commit, the others at moments drawn from the seed between
the launch and the attempt's expected end (start-up plus the work still to do); an attempt that has committed every
input before its moment is killed while it finishes. A kill takes the driver alone or, drawn from the seed, its whole
process family (the driver, Ray and its workers: the node lost). After each kill the job is resumed with
``resume_run``; after the last one it runs to the end.

Checks: every input exactly once in ``<output>/manifest.parquet`` and restored; each file's audio equal to the
reference's within one 16-bit step; no input committed twice; the run FINISHED with ``resume.count`` equal to the
resumes that opened it; no ``*.partial`` file left; no process of a job still running 20 s after its driver ended.
The report is JSON, as the training soak's (``pipeline/ops/soak.py``).
"""

from __future__ import annotations

import logging
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
from mlflow import MlflowClient

from pipeline.ops.process_family import Family
from pipeline.ops.soak import launch, store_runs, store_uri

log = logging.getLogger(__name__)

MODULE = "pipeline.clean_corpus"
JOB = ["files_per_batch=2", "commit_seconds=0.2", "scores=false", "listen_random=1", "listen_lowest=1"]
# the tiny chain of the soak and of the tests' `chain` fixture (tests/conftest.py): each stage trained 2 steps
CHAIN_STEPS = [
    "batch_size=4",
    "data.segment_seconds=0.5",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "trainer.max_steps=2",
    "checkpoint.save_interval=2",
    "validation.interval=0",
]
FILE_SECONDS = 1.3
WHOLE_FAMILY_SHARE = 0.5  # of the kills that take the driver with Ray and its workers; the others the driver alone
FIRST_KILL_S = (0.0, 2.0)  # the first kill: this long after the first commit
POLL_S = 0.2
LEFT_BEHIND_S = 20.0  # a job's processes still running this long after its driver ended are left behind
# each batch of the restore actor made 0.5 s slower (as a real chain's are slower than the tiny one's), so that the
# kills fall among batches in flight too; results are the same (the reference job runs with it as well)
SLOW_RESTORE = "clean.restore=sleep:0.5"
OPENED = re.compile(r"Cleaning \d+ inputs \(\d+ done before\)")  # the driver holds the run and starts the pipeline


@dataclass(frozen=True)
class Kill:
    whole_family: bool
    moment: float | None  # a fraction of the attempt's expected time (start-up and the work left); None: first


@dataclass
class Attempt:
    code: int
    opened_s: float | None  # when the driver logged that it holds the run (seconds after the launch)
    ended_s: float
    phase: str | None  # where the kill fell (``_phase``)
    left_behind: list[str]  # processes of the job still running LEFT_BEHIND_S after the driver ended


@dataclass
class Soaked:
    """The job under soak: where it runs and what the reference taught about its timing."""

    workdir: Path
    uri: str
    client: MlflowClient
    job: list[str]  # a fresh job's arguments
    total: int
    known: set[str]  # runs in the store that are not the soaked job's
    startup_s: float = 0.0
    work_s: float = 0.0
    run_id: str | None = None
    stats: dict[str, Any] = field(
        default_factory=lambda: {
            "driver_kills": 0,
            "family_kills": 0,
            "launches": 0,
            "resumes": 0,
            "resumes_opened": 0,
            "resume_count_increments": [],
            "finished_before_kill": 0,
            "kills_by_phase": {},
            "left_behind": [],
        }
    )


def run_clean_soak(
    workdir: Path, kills: int, seed: int, chain_run: str | None = None, tracking_uri: str | None = None, files: int = 20
) -> dict[str, Any]:
    """Kill, resume, finish, compare; returns the report (``problems`` empty when every check passed)."""
    rng = random.Random(seed)
    uri = tracking_uri or store_uri(workdir)
    client = MlflowClient(tracking_uri=uri)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    chain_run = chain_run or train_tiny_chain(workdir, uri)
    corpus = make_corpus(workdir / "corpus", files)
    soaked = Soaked(
        workdir,
        uri,
        client,
        [f"run_id={chain_run}", f"input={corpus}", f"output={workdir / 'clean'}", *JOB],
        files,
        {r.info.run_id for r in store_runs(client)},
    )
    reference = reference_job(
        soaked, [f"run_id={chain_run}", f"input={corpus}", f"output={workdir / 'reference'}", *JOB]
    )
    started = time.monotonic()
    kill_and_resume(soaked, plan_kills(kills, rng), rng)
    soak_s = time.monotonic() - started
    problems, compared = check_outputs(workdir / "clean", workdir / "reference", files)
    problems += check_run(soaked)
    stats = soaked.stats
    return {
        "job": "clean_corpus",
        "kills": stats["driver_kills"] + stats["family_kills"],
        **stats,
        "inputs": files,
        **compared,
        "reference_startup_seconds": round(soaked.startup_s, 1),
        "reference_work_seconds": round(soaked.work_s, 1),
        "soak_seconds": round(soak_s, 1),
        "seed": seed,
        "run_id": soaked.run_id,
        "reference_run_id": reference,
        "problems": problems,
    }


def train_tiny_chain(workdir: Path, uri: str) -> str:
    """train_adapter -> pretrain_vocoder -> finetune_vocoder on the tiny presets; the finetune_vocoder run."""
    client = MlflowClient(tracking_uri=uri)

    def train(stage: str, *args: str) -> str:
        log_path = workdir / "logs" / f"chain-{stage}.log"
        if launch(workdir, [*args, *CHAIN_STEPS], log_path, module=f"pipeline.stages.{stage}", tracking_uri=uri).wait():
            raise RuntimeError(f"training the tiny chain's {stage} failed:\n{log_path.read_text()[-3000:]}")
        return store_runs(client, f"tags.stage = '{stage}'")[-1].info.run_id

    adapter = train("train_adapter", "ssl=tiny", "adapter.bottleneck=16")
    vocoder = train("pretrain_vocoder", "ssl=tiny", "vocoder=tiny")
    return train("finetune_vocoder", f"adapter_run={adapter}", f"vocoder_run={vocoder}")


def make_corpus(root: Path, files: int) -> Path:
    """``files`` overlapping 1.3 s cuts of one demo utterance (16-bit WAV), each its own input."""
    from pipeline.data.corpus import read_corpus

    root.mkdir(parents=True, exist_ok=True)
    clean, rate = sf.read(str(read_corpus("ljspeech", None)[2].path), dtype="float32")
    length, hop = int(FILE_SECONDS * rate), max((len(clean) - int(FILE_SECONDS * rate)) // max(files, 1), 1)
    for i in range(files):
        sf.write(root / f"utt{i:03d}.wav", clean[i * hop : i * hop + length], rate)
    return root


def plan_kills(kills: int, rng: random.Random) -> list[Kill]:
    """The first kill after the first commit, the others at moments drawn from the seed."""
    return [Kill(rng.random() < WHOLE_FAMILY_SHARE, None if i == 0 else rng.random()) for i in range(kills)]


def reference_job(soaked: Soaked, args: list[str]) -> str:
    """The same job, never interrupted; its start-up and work times set the scale of the kill moments."""
    before = {r.info.run_id for r in store_runs(soaked.client)}
    attempt = run_attempt(soaked, args, soaked.workdir / "logs" / "reference.log", None)
    if attempt.code != 0:
        raise RuntimeError(
            f"the reference job failed:\n{(soaked.workdir / 'logs' / 'reference.log').read_text()[-3000:]}"
        )
    soaked.startup_s = attempt.opened_s or attempt.ended_s
    soaked.work_s = attempt.ended_s - soaked.startup_s
    run_id = next(r.info.run_id for r in store_runs(soaked.client) if r.info.run_id not in before)
    soaked.known.add(run_id)
    log.info("reference job: %.1f s of start-up, %.1f s of work", soaked.startup_s, soaked.work_s)
    return run_id


def kill_and_resume(soaked: Soaked, plan: list[Kill], rng: random.Random) -> None:
    """Launch, kill as planned, resume with resume_run, until the plan is done and a last attempt finishes."""
    stats = soaked.stats
    for kill in [*plan, None]:
        resuming = soaked.run_id is not None
        args = [f"resume_run={soaked.run_id}"] if resuming else soaked.job
        count_before = _resume_count(soaked)
        stats["launches"] += 1
        log_path = soaked.workdir / "logs" / f"attempt-{stats['launches']:04d}.log"
        attempt = run_attempt(soaked, args, log_path, kill, rng)
        if attempt.left_behind:
            stats["left_behind"].append({"launch": stats["launches"], "processes": attempt.left_behind})
        soaked.run_id = soaked.run_id or _soaked_run(soaked)
        if resuming:
            stats["resumes"] += 1
            stats["resumes_opened"] += attempt.opened_s is not None
            stats["resume_count_increments"].append(_resume_count(soaked) - count_before)
        if attempt.code == 0:
            stats["finished_before_kill"] += kill is not None
            log.info("attempt %d ran to the end%s", stats["launches"], " before its kill" if kill else "")
            break
        if attempt.code != -signal.SIGKILL:
            raise RuntimeError(
                f"attempt {stats['launches']} failed with exit code {attempt.code}:\n"
                f"{log_path.read_text(errors='replace')[-3000:]}"
            )
        stats["family_kills" if kill.whole_family else "driver_kills"] += 1
        stats["kills_by_phase"][attempt.phase] = stats["kills_by_phase"].get(attempt.phase, 0) + 1
        log.info(
            "attempt %d: killed %s at %.1f s, in %s",
            stats["launches"],
            "with its whole family" if kill.whole_family else "(the driver alone)",
            attempt.ended_s,
            attempt.phase,
        )


def run_attempt(
    soaked: Soaked, args: list[str], log_path: Path, kill: Kill | None, rng: random.Random | None = None
) -> Attempt:
    """One launch, killed as ``kill`` says (None: left to run to its end); waits for its processes to end. A job
    that has committed every input before its kill moment is killed then, while it finishes."""
    proc = launch(
        soaked.workdir,
        args,
        log_path,
        module=MODULE,
        faults_spec=SLOW_RESTORE,
        tracking_uri=soaked.uri,
        new_session=True,
    )
    family = Family(proc.pid)
    started = time.monotonic()
    deadline = _kill_moment(soaked, kill) if kill and kill.moment is not None else None
    opened_s, phase, done_before = None, None, _done(soaked)
    while proc.poll() is None:
        now = time.monotonic() - started
        family.sample()
        if opened_s is None and OPENED.search(log_path.read_text(errors="replace")):
            opened_s = now
        if kill:
            soaked.run_id = soaked.run_id or _soaked_run(soaked)
            done = _done(soaked)
            if deadline is None and done:  # the first kill: after the first commit
                deadline = now + rng.uniform(*FIRST_KILL_S)
            # finishing: every input committed, by this attempt or (all committed before) once it holds the run
            finishing = done >= soaked.total and (done_before < soaked.total or opened_s is not None)
            if finishing:
                deadline = min(deadline, now)
            if deadline is not None and now >= deadline:
                phase = _phase(opened_s is not None, done - done_before, finishing)
                family.kill(kill.whole_family)
                proc.wait()
                break
        time.sleep(POLL_S)
    ended_s = time.monotonic() - started
    if opened_s is None and OPENED.search(log_path.read_text(errors="replace")):
        opened_s = ended_s
    return Attempt(proc.returncode, opened_s, ended_s, phase, family.left_behind(LEFT_BEHIND_S))


def _phase(opened: bool, committed: int, all_done: bool) -> str:
    """Where a kill falls: before the driver holds the run, before this attempt's first commit (actors
    starting), among batches, or after every input is committed (the manifest and report being written)."""
    if all_done:
        return "finishing"
    if not opened:
        return "start-up"
    return "batches" if committed else "actors starting"


def _kill_moment(soaked: Soaked, kill: Kill) -> float:
    """Seconds after the launch: the kill's fraction of start-up plus the work still to do."""
    left = 1.0 - _done(soaked) / max(soaked.total, 1)
    return max(kill.moment * (soaked.startup_s + left * soaked.work_s), POLL_S)


def _soaked_run(soaked: Soaked) -> str | None:
    runs = [r for r in store_runs(soaked.client, "tags.stage = 'clean_corpus'") if r.info.run_id not in soaked.known]
    return runs[0].info.run_id if runs else None


def _done(soaked: Soaked) -> int:
    """Inputs committed so far (the run's progress tag: ``<done>/<total> inputs ...``)."""
    if not soaked.run_id:
        return 0
    progress = soaked.client.get_run(soaked.run_id).data.tags.get("progress", "0/")
    return int(progress.partition("/")[0] or 0)


def _resume_count(soaked: Soaked) -> int:
    if not soaked.run_id:
        return 0
    return int(soaked.client.get_run(soaked.run_id).data.tags.get("resume.count", "0"))


def check_outputs(out: Path, reference: Path, files: int) -> tuple[list[str], dict[str, Any]]:
    """Every input once and restored, each file within one 16-bit step of the reference's, nothing half written."""
    problems = []
    expected = [f"utt{i:03d}.wav" for i in range(files)]
    manifest = pd.read_parquet(out / "manifest.parquet") if (out / "manifest.parquet").exists() else None
    if manifest is None:
        return [f"no manifest in {out}"], {"inputs_compared": 0}
    ids = manifest["id"].tolist()
    if sorted(ids) != expected:
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        problems.append(
            f"manifest ids: {len(ids)} rows for {files} inputs, duplicates {duplicates[:10]}, "
            f"missing {sorted(set(expected) - set(ids))[:10]}"
        )
    not_restored = manifest[manifest["status"] != "restored"]
    if len(not_restored):
        problems.append(f"not restored: {dict(zip(not_restored['id'], not_restored['status']))}")
    steps = {}
    for row in manifest[manifest["status"] == "restored"].itertuples():
        ours, theirs = sf.read(row.output, dtype="int16")[0], sf.read(str(reference / row.id), dtype="int16")[0]
        steps[row.id] = (
            int(np.abs(ours.astype(np.int32) - theirs).max(initial=0)) if ours.shape == theirs.shape else None
        )
    differing = {k: v for k, v in steps.items() if v is None or v > 1}
    if differing:
        problems.append(f"audio differs from the uninterrupted job's by more than one 16-bit step: {differing}")
    partial = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".partial"))
    if partial:
        problems.append(f"half-written files left: {partial}")
    known = [v for v in steps.values() if v is not None]
    return problems, {
        "inputs_compared": len(steps),
        "identical_files": sum(v == 0 for v in known),
        "max_difference_steps": max(known, default=0),
    }


def check_run(soaked: Soaked) -> list[str]:
    """FINISHED; resume.count equal to the resumes that opened the run; no input committed twice; nothing left
    running."""
    from pipeline.inference.cleaning.manifest import PARTS

    if not soaked.run_id:
        return ["the soaked job never opened a run"]
    problems, stats = [], soaked.stats
    run = soaked.client.get_run(soaked.run_id)
    if run.info.status != "FINISHED":
        problems.append(f"the soaked run ended {run.info.status}")
    count, increments = int(run.data.tags.get("resume.count", "0")), stats["resume_count_increments"]
    if (
        any(i not in (0, 1) for i in increments)
        or count != sum(increments)
        or not stats["resumes_opened"] <= count <= stats["resumes"]
    ):
        problems.append(
            f"resume.count {count} for {stats['resumes']} resumes ({stats['resumes_opened']} opened the "
            f"run; increments {increments})"
        )
    parts = _parts(soaked.client, soaked.run_id, PARTS)
    twice = parts["id"][parts["id"].duplicated()].tolist()
    if twice:
        problems.append(f"inputs committed more than once: {twice[:10]}")
    if stats["left_behind"]:
        problems.append(
            f"processes still running {LEFT_BEHIND_S:.0f} s after their driver ended: {stats['left_behind']}"
        )
    return problems


def _parts(client: MlflowClient, run_id: str, folder: str) -> pd.DataFrame:
    import tempfile

    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            download_artifacts(run_id=run_id, artifact_path=folder, dst_path=tmp, tracking_uri=client.tracking_uri)
        )
        tables = [pd.read_parquet(p) for p in sorted(local.glob("*.parquet"))]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame({"id": []})
