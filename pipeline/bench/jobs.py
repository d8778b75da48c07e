"""What a whole job costs, measured on job processes: resume latency, stop latency and step time under torchrun.

Each figure puts the job next to a reference measured on the same machine at the same time:

- ``resume_latency``: process start to the first resumed step against process start to the first
  fresh step, in interleaved subprocesses, with the breakdown the job logs;
- ``stop_latency``: a stop request (SIGTERM, or the stop tag) to the job's end, its checkpoint committed;
- ``distributed_step_time``: the step time under torchrun against one plain process with the same
  effective batch, in interleaved subprocesses.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from mlflow import MlflowClient

from pipeline.bench import figure, spread
from pipeline.bench.harness import engine_stamps, new_run, run_ids, stage_startup, step_time, tracking_store

# --------------------------------------------------------------------------------------------
# Resume latency
# --------------------------------------------------------------------------------------------


def resume_latency(overrides: list[str], *, pairs: int) -> dict[str, Any]:
    """Process start → first resumed step ÷ process start → first fresh step, interleaved subprocesses."""
    fresh_s, resumed_s, fresh_phases, resumed_phases = [], [], [], []
    with tracking_store() as client:
        env = dict(os.environ)
        job = [*overrides, "validation.interval=0", "tracking.log_model=false"]
        before = run_ids(client)
        stage_startup([*job, "trainer.max_steps=2"], env)
        base = new_run(client, before)
        for pair in range(pairs):
            for side in ("fresh", "resumed") if pair % 2 == 0 else ("resumed", "fresh"):
                if side == "fresh":
                    seconds, phases = stage_startup([*job, "trainer.max_steps=1"], env)
                    fresh_s.append(seconds)
                    fresh_phases.append(phases)
                else:  # the common resume: the same run, from its latest checkpoint, one step further each time
                    seconds, phases = stage_startup([f"resume_run={base}", f"trainer.max_steps={3 + pair}"], env)
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
                before = run_ids(client)
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
                seconds = step_time(engine_stamps(client, new_run(client, before)), warmup)
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
    before = run_ids(client)
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
            client.set_tag(new_run(client, before), "stop_requested", "true")
        proc.stderr.read()
        proc.wait(timeout=600)
        seconds = time.perf_counter() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
    run = client.get_run(new_run(client, before))
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
