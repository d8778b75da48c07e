"""What the engine costs: step overhead, checkpoint stall, resume latency and the metric path.

Each figure puts the engine next to a reference measured on the same machine at the same time:

- ``tracking_overhead``: the engine (``run_stage``, a real SQLite tracking store, metrics every step,
  system metrics on, checkpoints every K) against a bare loop over the same stage's parts (its
  loader, ``training_step`` under the same autocast, its LR schedulers), in interleaved segments;
- ``checkpoint_stall``: the time the training thread is blocked by ``Engine.save_checkpoint`` against a
  synchronous save + sha256 + upload of the same state, alternating, in one process;
- ``resume_latency``: process start to the first resumed step against process start to the first
  fresh step, in interleaved subprocesses, with the breakdown the job logs;
- ``metric_throughput``: points per second the metric path accepts on the training thread.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

from pipeline.bench import figure, spread
from pipeline.engine.checkpoint_files import checkpoint_name, write_local
from pipeline.engine.checkpointing import CheckpointStore, RetentionPolicy
from pipeline.engine.session import plan_job, run_stage, seed_everything, torch_deterministic
from pipeline.engine.tracking import MetricLogger, start_or_adopt_run
from pipeline.engine.trainer import Engine
from pipeline.stages import stage_class

log = logging.getLogger(__name__)

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


def _sync(stage) -> None:
    if stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)


def bare_loop(stage, steps: int) -> list[float]:
    """A hand-written loop over the stage's parts; returns the time after each step."""
    cfg = stage.cfg
    workers, size = int(cfg.data.num_workers), int(cfg.batch_size)
    for m in stage.modules.values():
        m.train()
    stamps, epoch = [], 0
    while len(stamps) < steps:
        for batch in stage.train_source.loader(epoch, 0, size, workers, stage.collate):
            batch = stage.to_device(batch)
            with stage.precision.autocast():
                out = stage.training_step(batch)
            for sch in stage.schedulers.values():
                sch.step()
            {k: float(v) for k, v in out.items()}  # what any loop does to print or log its loss
            stamps.append(time.perf_counter())
            if len(stamps) == steps:
                break
        epoch += 1
    return stamps


def engine_stamps(client: MlflowClient, run_id: str) -> list[float]:
    """The time of each step of an engine run, from its ``train/loss`` metric timestamps (ms)."""
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    return [m.timestamp / 1000 for m in history]


def step_time(stamps: list[float], warmup: int) -> float:
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def tracking_overhead(
    stage_name: str, overrides: list[str], *, steps: int, save_every: int, pairs: int, warmup: int, label: str
) -> dict[str, Any]:
    """Engine step time ÷ bare-loop step time over ``steps`` steps, ``pairs`` interleaved segments."""
    job = [
        *overrides,
        f"trainer.max_steps={steps}",
        f"checkpoint.save_interval={save_every}",
        "validation.interval=0",
        "tracking.system_metrics=true",
        "tracking.log_model=false",
    ]
    engine_times, bare_times, ratios = [], [], []
    with tracking_store() as client:
        stage = None
        for pair in range(pairs):
            order = ("bare", "engine") if pair % 2 == 0 else ("engine", "bare")
            times = {}
            for side in order:
                if side == "bare":
                    stage = build_stage(stage_name, job, client)
                    times[side] = step_time(bare_loop(stage, steps), warmup)
                    samples = int(stage.cfg.batch_size)
                    del stage
                else:
                    before = _run_ids(client)
                    code = run_stage(stage_class(stage_name), job)
                    if code != 0:
                        raise RuntimeError(f"engine run failed with exit code {code}")
                    run_id = _new_run(client, before)
                    times[side] = step_time(engine_stamps(client, run_id), warmup)
            engine_times.append(times["engine"])
            bare_times.append(times["bare"])
            ratios.append(times["engine"] / times["bare"])
    value = statistics.median(ratios)
    return figure(
        f"tracking_overhead/{label}",
        value,
        "engine step / bare step",
        f"{stage_name} {' '.join(overrides)}: median over {pairs} interleaved pairs of the mean step time over steps "
        f"{warmup + 1}..{steps} (metrics every step, system metrics on, a checkpoint every {save_every} steps, "
        "SQLite tracking store) against a bare loop over the same stage parts",
        target="<= 1.03",
        met=value <= 1.03,
        ratio=spread(ratios),
        engine_step_s=spread(engine_times),
        bare_step_s=spread(bare_times),
        samples_per_s={
            "engine": round(samples / statistics.median(engine_times), 2),
            "bare": round(samples / statistics.median(bare_times), 2),
        },
    )


def _run_ids(client: MlflowClient) -> set[str]:
    return {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


def _new_run(client: MlflowClient, before: set[str]) -> str:
    new = _run_ids(client) - before
    if len(new) != 1:
        raise RuntimeError(f"expected one new run, found {len(new)}")
    return new.pop()


# --------------------------------------------------------------------------------------------
# Checkpoint stall
# --------------------------------------------------------------------------------------------


def checkpoint_stall(overrides: list[str], *, pairs: int, label: str, target: float | None = 0.2) -> dict[str, Any]:
    """Time the training thread spends in ``Engine.save_checkpoint`` ÷ a synchronous save + sha256 +
    upload of the same state, alternating in one process, a training step before each."""
    blocked, synchronous, sizes = [], [], []
    with tracking_store() as client:
        stage = build_stage("train_adapter", [*overrides, "tracking.system_metrics=false"], client)
        run_id = start_or_adopt_run(client, experiment="bench", run_name=f"stall-{label}", tags={})
        store = CheckpointStore(client, run_id, Path(".checkpoints"), RetentionPolicy(1, 0, "val/loss", "min"))
        engine = Engine(stage, MetricLogger(client, run_id, 5.0), store, stopper=None, run_id=run_id)
        batches = _endless_batches(stage)

        def train_one() -> None:
            with stage.precision.autocast():
                stage.training_step(next(batches))
            engine.pos.step += 1

        train_one()  # the optimizer's state exists from here on
        for pair in range(pairs):
            for side in ("engine", "sync") if pair % 2 == 0 else ("sync", "engine"):
                train_one()
                _sync(stage)
                started = time.perf_counter()
                if side == "engine":
                    engine.save_checkpoint()
                    blocked.append(time.perf_counter() - started)
                    store.wait()  # not timed: checkpoints are far apart in a real job
                else:
                    local = write_local(
                        Path("sync-staging"),
                        engine.pos.step,
                        engine.state_dict(),
                        {"format_version": 1, "step": engine.pos.step},
                    )
                    store.repo.log_artifacts(str(local), f"sync/{checkpoint_name(engine.pos.step)}")
                    synchronous.append(time.perf_counter() - started)
                    sizes.append((local / "state.pt").stat().st_size)
                    store.repo.delete_artifacts(f"sync/{checkpoint_name(engine.pos.step)}")
                    shutil.rmtree(local)
        store.close()
    ratios = [b / s for b, s in zip(blocked, synchronous)]
    value = statistics.median(ratios)
    size_mb = statistics.median(sizes) / 1e6
    return figure(
        f"checkpoint_stall/{label}",
        value,
        "blocked / synchronous save",
        f"train_adapter {' '.join(overrides)} ({size_mb:.1f} MB state.pt): median over {pairs} alternating pairs of "
        "the training thread's time in Engine.save_checkpoint against write (torch.save + fsync + sha256) + upload "
        "of the same state, synchronously, SQLite tracking store with local artifacts",
        target=None if target is None else f"<= {target}",
        met=None if target is None else value <= target,
        state_mb=round(size_mb, 2),
        ratio=spread(ratios),
        blocked_s=spread(blocked),
        synchronous_s=spread(synchronous),
    )


def _endless_batches(stage) -> Iterator[dict]:
    epoch = 0
    while True:
        for batch in stage.train_source.loader(epoch, 0, int(stage.cfg.batch_size), 0, stage.collate):
            yield stage.to_device(batch)
        epoch += 1


# --------------------------------------------------------------------------------------------
# Resume latency
# --------------------------------------------------------------------------------------------


def _job(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Run one stage process; the first step's time after process start and the phases it logged."""
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


def resume_latency(overrides: list[str], *, pairs: int) -> dict[str, Any]:
    """Process start → first resumed step ÷ process start → first fresh step, interleaved subprocesses."""
    fresh_s, resumed_s, fresh_phases, resumed_phases = [], [], [], []
    with tracking_store() as client:
        env = dict(os.environ)
        job = [*overrides, "validation.interval=0", "tracking.log_model=false"]
        before = _run_ids(client)
        _job([*job, "trainer.max_steps=2"], env)
        base = _new_run(client, before)
        for pair in range(pairs):
            for side in ("fresh", "resumed") if pair % 2 == 0 else ("resumed", "fresh"):
                if side == "fresh":
                    seconds, phases = _job([*job, "trainer.max_steps=1"], env)
                    fresh_s.append(seconds)
                    fresh_phases.append(phases)
                else:  # the common resume: the same run, from its latest checkpoint, one step further each time
                    seconds, phases = _job([f"resume_run={base}", f"trainer.max_steps={3 + pair}"], env)
                    resumed_s.append(seconds)
                    resumed_phases.append(phases)
    ratios = [r / f for r, f in zip(resumed_s, fresh_s)]
    value = statistics.median(ratios)
    return figure(
        "resume_latency",
        value,
        "resumed / fresh",
        f"train_adapter {' '.join(overrides)}: median over {pairs} interleaved pairs of process start → first step, "
        "a resume of the same run from its latest checkpoint (resume_run, the run lease's read-back included) against "
        "a fresh start, each its own process; the breakdown is the median of each phase the job logs (Startup: ...)",
        target="<= 1.5",
        met=value <= 1.5,
        ratio=spread(ratios),
        fresh_s=spread(fresh_s),
        resumed_s=spread(resumed_s),
        fresh_breakdown_s=_median_phases(fresh_phases),
        resumed_breakdown_s=_median_phases(resumed_phases),
    )


def _median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(statistics.median(r.get(name, 0.0) for r in runs), 3) for name in runs[0]}


# --------------------------------------------------------------------------------------------
# Metric path
# --------------------------------------------------------------------------------------------


def metric_throughput(*, steps: int, per_step: int) -> dict[str, Any]:
    """Points per second ``MetricLogger.log`` accepts on the training thread, and how fast the store
    takes them (SQLite, asynchronous batches)."""
    with tracking_store() as client:
        run_id = start_or_adopt_run(client, experiment="bench", run_name="metrics", tags={})
        metrics = MetricLogger(client, run_id, flush_seconds=5.0)
        names = [f"bench/m{i}" for i in range(per_step)]
        started = time.perf_counter()
        for step in range(1, steps + 1):
            metrics.log({name: step * 1e-3 + i for i, name in enumerate(names)}, step)
        accepted = time.perf_counter() - started
        metrics.flush(wait=True)
        stored = time.perf_counter() - started
        metrics.close()
        count = len(client.get_metric_history(run_id, names[0]))
    points = steps * per_step
    return figure(
        "metric_throughput",
        points / accepted,
        "points/s",
        f"{steps} steps × {per_step} metrics through MetricLogger.log on the caller's thread (batched, sent "
        "in order by a background thread every flush_seconds or 1000 points); stored_points_per_s includes waiting "
        "until the SQLite store holds them all",
        per_point_us=round(accepted / points * 1e6, 2),
        stored_points_per_s=round(points / stored, 1),
        stored_check=count == steps,
    )


# --------------------------------------------------------------------------------------------
# Several processes (torchrun)
# --------------------------------------------------------------------------------------------


def distributed_step_time(
    stage_name: str,
    overrides: list[str],
    *,
    nproc: int,
    batch_size: int,
    steps: int,
    pairs: int,
    warmup: int,
    label: str,
) -> dict[str, Any]:
    """Step time under torchrun (``nproc`` ranks, ``batch_size`` each) ÷ step time of one plain process with
    the same effective batch, interleaved subprocesses started through ``pipeline.launcher``. ``nproc=1``
    compares torchrun's one-rank job (process group, DDP) with a plain process at the same batch."""
    job = [
        *overrides,
        f"trainer.max_steps={steps}",
        "validation.interval=0",
        f"checkpoint.save_interval={steps}",
        "tracking.log_model=false",
        "tracking.system_metrics=false",
    ]
    plain_s, ranks_s = [], []
    with tracking_store() as client:
        for pair in range(pairs):
            for side in ("plain", "ranks") if pair % 2 == 0 else ("ranks", "plain"):
                before = _run_ids(client)
                size = batch_size * nproc if side == "plain" else batch_size
                launch = ["--nproc=1"] if side == "plain" else [f"--nproc={nproc}", "--torchrun=--max-restarts=0"]
                out = subprocess.run(
                    [sys.executable, "-m", "pipeline.launcher", *launch, stage_name, *job, f"batch_size={size}"],
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"{stage_name} ({side}) failed:\n{out.stderr[-3000:]}")
                seconds = step_time(engine_stamps(client, _new_run(client, before)), warmup)
                (plain_s if side == "plain" else ranks_s).append(seconds)
    ratios = [r / p for r, p in zip(ranks_s, plain_s)]
    value = statistics.median(ratios)
    return figure(
        f"distributed_step_time/{label}",
        value,
        "torchrun step / one-process step",
        f"{stage_name} {' '.join(overrides)}: {nproc} rank(s) x batch {batch_size} under torchrun against one plain "
        f"process with batch {batch_size * nproc}, {steps} steps each, step time from the logged train/loss times "
        f"after {warmup} warm-up steps, median over {pairs} interleaved pairs",
        ratio=spread(ratios),
        torchrun_step_s=spread(ranks_s),
        plain_step_s=spread(plain_s),
    )


# --------------------------------------------------------------------------------------------
# Stop latency
# --------------------------------------------------------------------------------------------


def _stop_once(client: MlflowClient, overrides: list[str], how: str, env: dict[str, str]) -> float:
    """Start a job, wait for its step 3, ask it to stop (``how``: signal | tag); seconds until the process has ended
    with its run KILLED and a checkpoint committed."""
    import signal

    before = _run_ids(client)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.stages.train_adapter",
            *overrides,
            "trainer.max_steps=100000",
            "trainer.log_interval=1",
            "validation.interval=0",
            "checkpoint.save_interval=100000",
            "tracking.log_model=false",
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stderr:
            if " step 3/" in line:
                break
        else:
            raise RuntimeError("the job ended before its step 3")
        asked = time.perf_counter()
        if how == "signal":
            proc.send_signal(signal.SIGTERM)
        else:
            client.set_tag(_new_run(client, before), "stop_requested", "true")
        proc.stderr.read()
        proc.wait(timeout=600)
        seconds = time.perf_counter() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
    run = client.get_run(_new_run(client, before))
    if run.info.status != "KILLED" or not run.data.tags.get("checkpoint.latest_step"):
        raise RuntimeError(f"the stop ({how}) left the run {run.info.status} without a checkpoint")
    return seconds


def stop_latency(overrides: list[str], *, repeats: int) -> list[dict[str, Any]]:
    """Seconds from a stop request (SIGTERM, or the stop_requested tag at its default 3 s poll) to the job's end:
    the step finished, a checkpoint committed, the run ended KILLED, the process gone."""
    out = []
    with tracking_store() as client:
        env = dict(os.environ)
        for how, target in (("signal", 15.0), ("tag", 20.0)):
            seconds = [_stop_once(client, overrides, how, env) for _ in range(repeats)]
            value = statistics.median(seconds)
            out.append(
                figure(
                    f"stop_latency/{how}",
                    value,
                    "s",
                    f"train_adapter {' '.join(overrides)}: median over {repeats} jobs of the time from "
                    + ("SIGTERM" if how == "signal" else "setting the stop_requested tag (polled every 3 s)")
                    + " after step 3 to the process's end, its checkpoint committed and its run KILLED",
                    target=f"<= {target:g}",
                    met=value <= target,
                    seconds=spread(seconds),
                )
            )
    return out
