"""Kill soak: a training job SIGKILLed again and again, resumed each time, compared with one that never stopped.

    python -m pipeline.ops.soak --kills 200 --seed 1 [--workdir DIR]
    python -m pipeline.ops.soak --job clean_corpus --kills 20 [--chain-run RUN --tracking-uri URI]

The second is the cleaning job's soak (``pipeline/ops/soak_clean.py``); what follows is the training job's.

``train_adapter`` on the tiny preset, with a checkpoint every 2 steps, validation every 10 and metrics
flushed every 0.2 s, is killed ``--kills`` times: once or more inside each fault window (a named
fault-injection point of ``pipeline/common/faults.py`` armed for that attempt: the tensor snapshot,
serialization, fsync, sha256, upload, ``index.csv``, the ``checkpoint.latest`` tags, retention's
deletes, the metric flush, the attempt bookkeeping at start-up, the resume's download and
verification), the rest at wall-clock moments drawn from the seed. After each kill the job is resumed
with ``resume_run``; after the last one it runs to the end. Then the run is checked against an
uninterrupted run of the same job: every ``train/loss`` value equal bit for bit, exactly one value per
step, every attempt recorded, ``checkpoint.latest`` naming a verified checkpoint, retention having kept
exactly what its policy says, nothing left in staging, no stray runs. It prints a JSON report
(docs/reliability.md); the exit code is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

log = logging.getLogger(__name__)

WINDOWS = (
    "checkpoint.snapshot",
    "checkpoint.serialize",
    "checkpoint.fsync",
    "checkpoint.sha256",
    "checkpoint.upload",
    "checkpoint.index",
    "checkpoint.commit",
    "checkpoint.retention",
    "metrics.flush",
    "startup.attempt",
    "resume.download",
    "resume.verify",
)
VISITS = {
    "metrics.flush": 6,
    "startup.attempt": 1,
    "resume.download": 1,
    "resume.verify": 1,
}  # else 2: n drawn in 1..max
JOB = [
    "ssl=tiny",
    "batch_size=4",
    "data.segment_seconds=0.5",
    "adapter.bottleneck=16",
    "trainer.log_interval=1",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "tracking.stop_poll_seconds=0.5",
    "tracking.log_model=false",
    "checkpoint.save_interval=2",
    "checkpoint.keep_last_n=2",
    "checkpoint.keep_best_k=1",
    "validation.interval=10",
    "validation.num_samples=0",
]
KILL_AFTER_S = (2.0, 10.0)  # wall-clock kills: drawn in this range after the launch (start-up included)
FALLBACK_S = 40.0  # a window not reached by then is killed anyway, and tried again later
FIRED = re.compile(r"Fault injection at (\S+) \(visit \d+\): kill")
TRAIN_MODULE = "pipeline.stages.train_adapter"


def plan_kills(kills: int, rng: random.Random) -> list[str]:
    """Each window once, the rest wall-clock kills ("time"), shuffled; the first kill comes after the
    first committed checkpoint (a resume needs one) and never in a window only a resume reaches."""
    plan = list(WINDOWS) + ["time"] * max(kills - len(WINDOWS), 0)
    rng.shuffle(plan)
    return ["first"] + plan


def store_uri(workdir: Path) -> str:
    """The soak's own tracking store: SQLite in the work directory."""
    return f"sqlite:///{workdir}/mlflow.db"


def launch(
    workdir: Path,
    args: list[str],
    log_path: Path,
    *,
    module: str = TRAIN_MODULE,
    faults_spec: str | None = None,
    tracking_uri: str | None = None,
    new_session: bool = False,
) -> subprocess.Popen:
    """``python -m <module> ARGS`` in ``workdir``, its output in ``log_path``; faults armed only by ``faults_spec``.
    ``new_session``: the job and the processes it starts in a session of their own (nothing reaches the soak)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": tracking_uri or store_uri(workdir)}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("PIPELINE_FAULTS", None)
    if faults_spec:
        env["PIPELINE_FAULTS"] = faults_spec
    with open(log_path, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def _attempt(workdir: Path, args: list[str], kind: str, rng: random.Random, log_path: Path) -> tuple[int, str | None]:
    """One launch; returns (exit code, the window a fault killed it in or None)."""
    if kind == "time":
        spec, deadline = None, rng.uniform(*KILL_AFTER_S)
    elif kind == "first":
        spec, deadline = "checkpoint.snapshot@2=kill", FALLBACK_S
    elif kind == "final":
        spec, deadline = None, None
    else:
        spec, deadline = f"{kind}@{rng.randint(1, VISITS.get(kind, 2))}=kill", FALLBACK_S
    proc = launch(workdir, args, log_path, faults_spec=spec)
    try:
        code = proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
    fired = FIRED.search(log_path.read_text(errors="replace"))
    return code, fired.group(1) if fired else None


def run_soak(workdir: Path, kills: int, seed: int, max_steps: int) -> dict[str, Any]:
    """Kill, resume, finish, compare; returns the report (``problems`` empty when every check passed)."""
    rng = random.Random(seed)
    job = [*JOB, f"trainer.max_steps={max_steps}"]
    client = _client(workdir)
    started = time.monotonic()
    soaked = _kill_and_resume(workdir, job, plan_kills(kills, rng), rng, client, max_steps)
    soak_s = time.monotonic() - started
    reference = _reference_run(workdir, job, client)
    problems, attempts, compared = _check_history(client, soaked["run_id"], reference, max_steps, soaked["opened"])
    problems += _check_store(client, soaked["run_id"], workdir, max_steps)
    return {
        "kills": sum(soaked["hits"].values()) + soaked["random_kills"],
        "windows_hit": soaked["hits"],
        "random_kills": soaked["random_kills"],
        "launches": soaked["launches"],
        "attempts_recorded": attempts,
        "steps_compared": compared,
        "soak_seconds": round(soak_s, 1),
        "seed": seed,
        "run_id": soaked["run_id"],
        "problems": problems,
    }


def _kill_and_resume(
    workdir: Path, job: list[str], pending: list[str], rng: random.Random, client: MlflowClient, max_steps: int
) -> dict[str, Any]:
    """Launch, kill as planned, resume with resume_run, until the plan is done and a last attempt finishes."""
    hits: dict[str, int] = {w: 0 for w in WINDOWS}
    random_kills, launches, opened, run_id = 0, 0, 0, None
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while True:
        kind = pending.pop(0) if pending else "final"
        if run_id is None and kind not in ("first", "final"):  # no run yet: start one first
            pending.insert(0, kind)
            kind = "first"
        args = job if run_id is None else [f"resume_run={run_id}"]
        launches += 1
        log_path = logs / f"attempt-{launches:04d}.log"
        code, window = _attempt(workdir, args, kind, rng, log_path)
        text = log_path.read_text(errors="replace")
        opened += "MLflow run " in text
        if code == 0:
            if kind == "final":
                break
            raise RuntimeError(
                f"attempt {launches} ({kind}) finished the job before the soak was done; raise "
                f"max_steps (now {max_steps}). Log: {log_path}"
            )
        if code != -signal.SIGKILL:
            raise RuntimeError(f"attempt {launches} ({kind}) failed with exit code {code}:\n{text[-3000:]}")
        if window:
            hits[window] += 1
        else:
            random_kills += 1
            if kind not in ("time", "first"):
                pending.insert(rng.randint(0, len(pending)), kind)  # not reached this time: try again later
        if run_id is None:
            runs = store_runs(client)
            run_id = runs[0].info.run_id if runs else None
        log.info("attempt %d: %s, killed %s", launches, kind, f"in {window}" if window else "at a random moment")
    return {"run_id": run_id, "hits": hits, "random_kills": random_kills, "launches": launches, "opened": opened}


def _reference_run(workdir: Path, job: list[str], client: MlflowClient) -> str:
    """The same job, never interrupted; returns its run ID."""
    before = {r.info.run_id for r in store_runs(client)}
    log_path = workdir / "logs" / "reference.log"
    if launch(workdir, job, log_path).wait() != 0:
        raise RuntimeError(f"the reference run failed:\n{log_path.read_text()[-3000:]}")
    return next(r.info.run_id for r in store_runs(client) if r.info.run_id not in before)


def _check_history(
    client: MlflowClient, run_id: str, reference: str, max_steps: int, opened: int
) -> tuple[list[str], int, int]:
    """One train/loss value per step, equal to the reference's; every attempt recorded. Returns the
    problems, the attempts recorded and the steps compared."""
    problems = []
    history = client.get_metric_history(run_id, "train/loss")
    steps = sorted(m.step for m in history)
    if steps != list(range(1, max_steps + 1)):
        dupes = len(steps) - len(set(steps))
        gaps = sorted(set(range(1, max_steps + 1)) - set(steps))
        problems.append(
            f"train/loss history: {len(steps)} values for {max_steps} steps ({dupes} duplicates, "
            f"missing steps {gaps[:10]})"
        )
    ours = {m.step: m.value for m in history}
    theirs = {m.step: m.value for m in client.get_metric_history(reference, "train/loss")}
    differing = [s for s in theirs if ours.get(s) != theirs[s]]
    if differing or len(theirs) != max_steps:
        problems.append(
            f"train/loss differs from the uninterrupted run at steps {differing[:10]} "
            f"({len(differing)} of {len(theirs)})"
        )
    count = client.get_run(run_id).data.tags.get("resume.count")
    attempts = sorted(
        int(re.search(r"attempt-(\d+)", a.path).group(1))
        for a in client.list_artifacts(run_id, "config")
        if "attempt-" in a.path
    )
    if attempts != list(range(1, len(attempts) + 1)) or str(len(attempts) - 1) != count:
        problems.append(f"attempts recorded {attempts}, resume.count {count}")
    if len(attempts) < opened:
        problems.append(f"{opened} launches opened the run but only {len(attempts)} attempts are recorded")
    return problems, len(attempts), len(theirs)


def _check_store(client: MlflowClient, run_id: str, workdir: Path, max_steps: int) -> list[str]:
    """The latest checkpoint verifies, retention kept what its policy says, staging is empty, no stray runs."""
    from pipeline.engine.checkpointing import RetentionPolicy, list_checkpoints, read_index, steps_to_keep

    run = client.get_run(run_id)
    problems = _check_checkpoints(client, run, workdir, max_steps)
    stored = list_checkpoints(client, run_id)
    keep = sorted(steps_to_keep(read_index(client, run_id), RetentionPolicy(2, 1, "val/loss", "min"), max_steps))
    if stored != keep:
        problems.append(f"retention: stored checkpoints {stored}, the policy keeps {keep}")
    staging = workdir / ".checkpoints" / run_id
    leftovers = sorted(p.name for p in staging.iterdir()) if staging.exists() else []
    if leftovers:
        problems.append(f"staging leftovers in {staging}: {leftovers}")
    if len(store_runs(client)) != 2:
        problems.append(f"{len(store_runs(client))} runs in the store; expected the soaked run and the reference")
    if run.info.status != "FINISHED":
        problems.append(f"the soaked run ended {run.info.status}")
    return problems


def _check_checkpoints(client: MlflowClient, run, workdir: Path, max_steps: int) -> list[str]:
    from pipeline.engine.checkpoint_files import CheckpointError, checkpoint_name, verify
    from pipeline.engine.checkpointing import download_checkpoint

    tags = run.data.tags
    if tags.get("checkpoint.latest") != f"checkpoints/{checkpoint_name(max_steps)}" or tags.get(
        "checkpoint.latest_step"
    ) != str(max_steps):
        return [f"checkpoint.latest is {tags.get('checkpoint.latest')} (step {tags.get('checkpoint.latest_step')})"]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        try:
            verify(download_checkpoint(client, run.info.run_id, max_steps, Path(tmp)))
        except CheckpointError as err:
            return [f"the latest checkpoint does not verify: {err}"]
    return []


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=store_uri(workdir))


def store_runs(client: MlflowClient, filter_string: str = ""):
    """The store's runs, oldest first (those matching ``filter_string``)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string, order_by=["attributes.start_time ASC"]) if experiments else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=("train_adapter", "clean_corpus"), default="train_adapter")
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="default: enough for the kills (6 per kill, ≥ 120)")
    parser.add_argument("--workdir", type=Path, help="kept afterwards (default: a temporary directory)")
    parser.add_argument(
        "--chain-run",
        help="clean_corpus: a finetune_vocoder run in --tracking-uri's store (default: a tiny chain trained first)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="clean_corpus: the store of --chain-run, which gets the job's runs "
        "too (default: SQLite in the work directory)",
    )
    parser.add_argument("--files", type=int, default=20, help="clean_corpus: inputs of the corpus (1.3 s each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = _soak(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            report = _soak(args, Path(tmp))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    sys.exit(1 if report["problems"] else 0)


def _soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if args.job == "clean_corpus":
        from pipeline.ops.soak_clean import run_clean_soak

        return run_clean_soak(
            workdir, args.kills, args.seed, chain_run=args.chain_run, tracking_uri=args.tracking_uri, files=args.files
        )
    return run_soak(workdir, args.kills, args.seed, args.max_steps or max(120, 6 * args.kills))


if __name__ == "__main__":
    main()
