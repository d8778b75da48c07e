"""Outage recovery: how long after a killed tracking server is back a training job gets through."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.bench import figure
from pipeline.engine.outage import HTTP_DEFAULTS
from pipeline.ops.localserver import TrackingServer

MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
}  # MLflow 3.17's own defaults


def _recovery_lag(overrides: list[str], outage_s: float, http: dict[str, str]) -> float:
    """Seconds from the server answering again to the job's next training step (training waits for the
    checkpoint in flight during the outage: it is the first thing to move when the store is back)."""
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        server = TrackingServer(Path(tmp))
        server.start()
        env = {**os.environ, **http, "MLFLOW_TRACKING_URI": server.uri, "PYTHONUNBUFFERED": "1"}
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.stages.train_adapter",
                *overrides,
                "trainer.max_steps=150",
                "checkpoint.save_interval=10",
                "validation.interval=0",
                "trainer.log_interval=1",
                "tracking.flush_seconds=0.2",
                "tracking.system_metrics=false",
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
        reader.start()
        try:
            while not any("step 30/150" in line for line in list(lines)):
                if job.poll() is not None:
                    raise RuntimeError("the job ended before step 30:\n" + "".join(lines))
                time.sleep(0.05)
            server.stop()
            time.sleep(outage_s)
            back = server.start()
            if job.wait(timeout=600) != 0:
                raise RuntimeError("the job failed:\n" + "".join(lines))
        finally:
            server.stop()
            if job.poll() is None:
                job.kill()
        reader.join(timeout=10)
    steps = [
        datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for line in lines
        if re.search(r" step \d+/150 ", line)
    ]
    before, after = [at for at in steps if at <= back], [at for at in steps if at > back]
    if not after or min(after) - max(before) < outage_s / 2:
        raise RuntimeError("training did not wait for the store during the outage:\n" + "".join(lines))
    return min(after) - back


def outage_recovery(overrides: list[str], *, outage_s: float, repeats: int) -> dict[str, Any]:
    """The lag with the pipeline's HTTP settings and with MLflow's defaults, alternating."""
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_recovery_lag(overrides, outage_s, HTTP_DEFAULTS))
        theirs.append(_recovery_lag(overrides, outage_s, MLFLOW_DEFAULTS))
    return figure(
        "outage_recovery",
        statistics.median(ours),
        "s",
        f"train_adapter (tiny) against a local mlflow server that is SIGKILLed at step 30 and started again "
        f"{outage_s:g} s later; seconds from the server answering /health to the job's next training step (it "
        "waits meanwhile for the checkpoint in flight). mlflow_defaults_s: the same with MLflow's own HTTP "
        "retry settings (7 retries, back-off factor 2)",
        target="<= 5",
        met=statistics.median(ours) <= 5.0,
        lag_s={"median": round(statistics.median(ours), 2), "min": round(min(ours), 2), "max": round(max(ours), 2)},
        mlflow_defaults_s={
            "median": round(statistics.median(theirs), 2),
            "min": round(min(theirs), 2),
            "max": round(max(theirs), 2),
        },
    )
