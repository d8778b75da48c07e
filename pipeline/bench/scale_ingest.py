"""Metric ingest of one team server: how many metric points per second a team's tracking server
(pipeline/ops/teamserver.py: PostgreSQL + ``mlflow server`` with basic auth, one worker) stores while 1, 4
and 16 training jobs log every step at once, and how much slower the slowest job's steps get.

Each job is its own process, as on a team's machines: it creates its run through the server as a trainer
(basic auth), then runs ``steps`` steps, each logging ``metrics`` points through the engine's own
``MetricLogger`` (batched every ``flush_seconds`` or 1000 points, sent in order by a background thread), so
batching and any waiting on the store are the engine's. After the loop it waits until everything is stored
(``flush(wait=True)``), as a job does at its end. The jobs of one size start together: each reports
"ready" once its imports are done and its run exists, and all get "go" at the same moment.

A step *sleeps* ``step_s`` instead of computing: on the 2 cores this runs on, 16 jobs burning the CPU
would measure the CPU, not the server. A sleeping step is what a GPU job looks like to the tracking
server anyway (the host waits on the device), and it leaves the cores to the server, PostgreSQL and the
jobs' sender threads, which are what is measured.

1000 steps by default: 20 metrics every ~22 ms is ~900 points/s per job, more than one server worker stores
(about 1,900 points/s on 2 shared cores), so at 16 jobs most of the time is the backlog draining after the
loop; 2000 steps took about 6 minutes at 16 jobs alone (11.5 minutes for the whole figure).

Figures, for each size N:

- ``scale/metric_ingest/points_per_s/<N>_jobs``: points stored (counted in PostgreSQL afterwards) ÷ seconds
  from "go" until the last job's final flush returned. Below the server's capacity this is the offered
  load (N × metrics ÷ step time); ``drain_s`` (last flush minus end of the last loop) shows a backlog.
- ``scale/metric_ingest/slowest_step_ratio/<N>_jobs``: the slowest job's mean step time ÷ the mean step
  time of the 1-job run (the smallest size's, if 1 is not among the sizes).

and ``scale/metric_ingest`` summing them up. ``server_cpu_s``/``postgres_cpu_s``/``jobs_cpu_s`` say where
the CPU went during each size.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

USER = "bench"
EXPERIMENT = "bench-metric-ingest"
JOB_TIMEOUT_S = 1800.0  # a job's loop and final flush, backlog included


@dataclass(frozen=True)
class JobLoad:
    """What each job does: ``steps`` steps, each sleeping ``step_s`` and logging ``metrics`` points through
    MetricLogger, which sends them every ``flush_seconds``."""

    steps: int
    metrics: int
    step_s: float
    flush_seconds: float

    def argv(self) -> list[str]:
        """The job process's options (main's)."""
        return [
            "--steps",
            str(self.steps),
            "--metrics",
            str(self.metrics),
            "--step-s",
            str(self.step_s),
            "--flush-seconds",
            str(self.flush_seconds),
        ]

    def description(self) -> str:
        return (
            f"{self.steps} steps x {self.metrics} metrics per job, each step sleeping {self.step_s:g} s (a GPU job's "
            f"host waits; no CPU burn on a 2-core machine), logged every step through MetricLogger "
            f"(flush_seconds={self.flush_seconds:g}), jobs as separate processes started together after their imports "
            "and run creation, against one team server (PostgreSQL + `mlflow server --workers 1` with basic auth)"
        )


def metric_ingest(
    jobs_sizes: tuple[int, ...] = (1, 4, 16),
    steps: int = 1000,
    metrics: int = 20,
    step_s: float = 0.02,
    flush_seconds: float = 1.0,
) -> list[dict[str, Any]]:
    """Points/s stored and the slowest job's step-time ratio for each number of concurrent jobs, on one team
    server started for the whole figure."""
    load = JobLoad(steps, metrics, step_s, flush_seconds)
    sizes = sorted(set(jobs_sizes))
    by_size = _measure(sizes, load)
    baseline = by_size[sizes[0]]["step_s"]
    base_step = sum(baseline) / len(baseline)  # one job at size 1: its own mean step time
    figures = []
    for n, size in by_size.items():
        figures += _size_figures(n, size, load, base_step, sizes[0])
    figures.append(_summary_figure(by_size, load, base_step))
    return figures


def _measure(sizes: list[int], load: JobLoad) -> dict[int, dict[str, Any]]:
    """Each size's jobs, one size after another, on one team server started for all of them."""
    from mlflow import MlflowClient

    from pipeline.ops.teamserver import TeamServer

    by_size: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        server = TeamServer(workdir, {USER: secrets.token_urlsafe(12)})
        try:
            server.start_all()
            with server.as_admin() as auth:  # the admin creates the experiment and lets the trainer write to it
                experiment = MlflowClient(server.uri).create_experiment(EXPERIMENT)
                auth.grant_user_permission(USER, "experiment", experiment, "EDIT")
            for n in sizes:
                log.info("metric ingest: %d job(s) x %d steps x %d metrics", n, load.steps, load.metrics)
                by_size[n] = _one_size(server, workdir, n, load)
        finally:
            server.stop_all()
    return by_size


def _size_figures(n: int, size: dict[str, Any], load: JobLoad, base_step: float, smallest: int) -> list[dict]:
    """The points stored per second and the slowest job's step-time ratio of ``n`` jobs."""
    from pipeline.bench import figure

    return [
        figure(
            f"scale/metric_ingest/points_per_s/{n}_jobs",
            size["stored"] / size["wall_s"],
            "points/s",
            f"{n} job(s): points stored (counted in PostgreSQL afterwards) ÷ seconds from 'go' until the last "
            f"job's flush(wait=True) returned; {load.description()}",
            jobs=n,
            stored_points=size["stored"],
            logged_points=size["logged"],
            all_stored=size["stored"] == size["logged"] == n * load.steps * load.metrics,
            wall_s=round(size["wall_s"], 3),
            offered_points_per_s=round(size["offered"], 1),
            drain_s=round(size["drain_s"], 3),
            start_skew_s=round(size["start_skew_s"], 3),
            server_cpu_s=round(size["server_cpu_s"], 2),
            postgres_cpu_s=round(size["postgres_cpu_s"], 2),
            jobs_cpu_s=round(size["jobs_cpu_s"], 2),
            job_warnings=size["job_warnings"],
        ),
        figure(
            f"scale/metric_ingest/slowest_step_ratio/{n}_jobs",
            max(size["step_s"]) / base_step,
            f"slowest job's step / {smallest}-job step",
            f"{n} job(s): the slowest job's mean step time (loop wall ÷ steps, any wait in MetricLogger.log "
            f"included) ÷ the mean step time at {smallest} job(s); {load.description()}",
            jobs=n,
            step_s=_spread(size["step_s"]),
            baseline_step_s=round(base_step, 6),
            total_s=_spread(size["total_s"]),
        ),
    ]


def _summary_figure(by_size: dict[int, dict[str, Any]], load: JobLoad, base_step: float) -> dict[str, Any]:
    """``scale/metric_ingest``: the sizes together, valued by the largest size's step ratio over the smallest's."""
    from pipeline.bench import figure

    sizes = list(by_size)
    points_per_s = {str(n): round(size["stored"] / size["wall_s"], 1) for n, size in by_size.items()}
    ratios = {str(n): round(max(size["step_s"]) / base_step, 4) for n, size in by_size.items()}
    largest_over_smallest = ratios[str(sizes[-1])] / ratios[str(sizes[0])]
    return figure(
        "scale/metric_ingest",
        largest_over_smallest,
        f"slowest step ratio, {sizes[-1]} ÷ {sizes[0]} job(s)",
        f"The per-size figures together; value: the slowest_step_ratio at {sizes[-1]} job(s) ÷ the one at "
        f"{sizes[0]}; {load.description()}",
        points_per_s=points_per_s,
        slowest_step_ratio=ratios,
        largest_over_smallest=round(largest_over_smallest, 4),
        steps=load.steps,
        metrics=load.metrics,
        step_s=load.step_s,
        flush_seconds=load.flush_seconds,
    )


def _one_size(server, workdir: Path, n: int, load: JobLoad) -> dict[str, Any]:
    """Start ``n`` jobs, release them together, collect their reports, count what was stored."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "AWS_"))}
    env.update(server.trainer_env(USER), PYTHONUNBUFFERED="1")
    logs = [workdir / f"job-{n}-{i}.log" for i in range(n)]
    jobs: list[subprocess.Popen] = []
    try:
        for i, path in enumerate(logs):
            jobs.append(_start_job(f"{n}-jobs-{i}", load, workdir, env, path))
        for job, path in zip(jobs, logs):  # every job imported and created its run
            if job.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a job of {n} failed before the start:\n{_tail(path)}")
        cpu_before = _server_cpu(server)
        go_at = time.time()
        for job in jobs:
            job.stdin.write("go\n")
            job.stdin.flush()
        reports = []
        for job, path in zip(jobs, logs):
            # a job writes nothing between "ready" and its report: communicate() loses nothing read-ahead
            out, _ = job.communicate(timeout=JOB_TIMEOUT_S)
            if job.returncode != 0 or not out.strip():
                raise RuntimeError(f"a job of {n} failed (exit code {job.returncode}):\n{_tail(path)}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
        cpu_after = _server_cpu(server)
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    warnings = sum(path.read_text(errors="replace").count("WARNING") for path in logs)
    if warnings:
        log.warning("%d job(s): %d warning(s) in the jobs' logs (e.g. retried batches)", n, warnings)
    stored = _stored_points(server.backend_uri, [r["run_id"] for r in reports])
    step_times = [r["step_s"] for r in reports]
    return {
        "stored": stored,
        "logged": sum(r["points"] for r in reports),
        "step_s": step_times,
        "total_s": [r["total_s"] for r in reports],
        "wall_s": max(r["finished_at"] for r in reports) - go_at,
        "drain_s": max(r["finished_at"] for r in reports) - max(r["loop_end_at"] for r in reports),
        "start_skew_s": max(r["started_at"] for r in reports) - go_at,
        "offered": sum(load.metrics / s for s in step_times),
        "server_cpu_s": cpu_after["server"] - cpu_before["server"],
        "postgres_cpu_s": cpu_after["postgres"] - cpu_before["postgres"],
        "jobs_cpu_s": sum(r["cpu_s"] for r in reports),
        "job_warnings": warnings,
    }


def _start_job(run_name: str, load: JobLoad, workdir: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """One job process (``--job``), its stderr into ``log_path``; it answers on stdout ("ready", then its report)."""
    with open(log_path, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.bench.scale_ingest", "--job", "--run-name", run_name, *load.argv()],
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def _stored_points(backend_uri: str, run_ids: list[str]) -> int:
    """The metric points of these runs in the server's PostgreSQL database."""
    from sqlalchemy import bindparam, create_engine, text

    engine = create_engine(backend_uri)
    try:
        with engine.connect() as conn:
            query = text("SELECT count(*) FROM metrics WHERE run_uuid IN :ids").bindparams(
                bindparam("ids", expanding=True)
            )
            return int(conn.execute(query, {"ids": run_ids}).scalar())
    finally:
        engine.dispose()


def _server_cpu(server) -> dict[str, float]:
    """CPU seconds used so far by the `mlflow server` process tree and by the PostgreSQL cluster."""
    postmaster = int((server.postgres.data / "postmaster.pid").read_text().split()[0])
    return {"server": _tree_cpu_s(server.process.pid), "postgres": _tree_cpu_s(postmaster)}


def _tree_cpu_s(pid: int) -> float:
    """User + system seconds of a process, its living descendants and its children that have exited."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _spread(values: list[float]) -> dict[str, Any]:
    from pipeline.bench import spread

    return spread(values, digits=6)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# --------------------------------------------------------------------------------------------
# One job (a process of its own, started by _one_size)
# --------------------------------------------------------------------------------------------


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process: the sender's too
    return usage.ru_utime + usage.ru_stime


def run_job(run_name: str, steps: int, metrics: int, step_s: float, flush_seconds: float) -> dict[str, Any]:
    """Create a run as the trainer in the environment, wait for "go" on stdin, log every step through
    MetricLogger, flush; returns the job's report."""
    from mlflow import MlflowClient

    from pipeline.engine.outage import configure_http
    from pipeline.engine.senders import MetricLogger
    from pipeline.engine.tracking import check_access, start_or_adopt_run

    configure_http()  # the engine's HTTP retry settings, as a training job has them
    client = MlflowClient()
    check_access(client)
    run_id = start_or_adopt_run(client, experiment=EXPERIMENT, run_name=run_name, tags={"bench": "scale/metric_ingest"})
    logger = MetricLogger(client, run_id, flush_seconds)
    names = [f"bench/m{i:02d}" for i in range(metrics)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no 'go' on stdin")
    started_at, cpu_start, start = time.time(), _own_cpu_s(), time.perf_counter()
    for step in range(1, steps + 1):
        time.sleep(step_s)  # the forward/backward pass of a GPU job: the host waits
        logger.log({name: math.sin(step * 1e-3 + i) for i, name in enumerate(names)}, step)
    loop_s, loop_end_at = time.perf_counter() - start, time.time()
    logger.flush(wait=True)
    total_s, finished_at, cpu_s = time.perf_counter() - start, time.time(), _own_cpu_s() - cpu_start
    logger.close()
    client.set_terminated(run_id)
    return {
        "run_id": run_id,
        "step_s": loop_s / steps,
        "total_s": total_s,
        "points": steps * metrics,
        "started_at": started_at,
        "loop_end_at": loop_end_at,
        "finished_at": finished_at,
        "cpu_s": cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", action="store_true", help="run one job (started by metric_ingest)")
    parser.add_argument("--run-name", default="job")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16], help="the sizes (without --job)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--step-s", type=float, default=0.02)
    parser.add_argument("--flush-seconds", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING if args.job else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.job:
        report = run_job(args.run_name, args.steps, args.metrics, args.step_s, args.flush_seconds)
        sys.stdout.write(json.dumps(report) + "\n")  # the job's result, read by metric_ingest
        return
    from pipeline.bench import emit

    for fig in metric_ingest(tuple(args.jobs), args.steps, args.metrics, args.step_s, args.flush_seconds):
        emit(fig)


if __name__ == "__main__":
    main()
