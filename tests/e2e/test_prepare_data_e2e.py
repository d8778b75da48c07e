"""prepare_data started with `mlflow run`."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_exact_resume_while_reading_shards_with_two_workers(store, shards):
    import signal
    import subprocess
    import sys

    from helpers import TINY, env_for, loss_history, run_module, stage_runs

    args = [
        *TINY,
        "data=shards",
        f"data.root={shards}",
        "data.num_workers=2",
        "data.segment_seconds=0.5",
        "trainer.max_steps=40",
        "validation.interval=10",
        "checkpoint.save_interval=15",
    ]
    reference = run_module(store, *args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    client = MlflowClient()
    (ref,) = stage_runs(client)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.train_adapter", *args],
        cwd=store,
        env=env_for(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if "step 19/40" in line:  # mid-epoch (12 batches per epoch with 2 workers), past a checkpoint
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 3, rest[-3000:]
    run = next(r for r in stage_runs(client) if r.info.run_id != ref.info.run_id)
    stopped = int(run.data.tags["checkpoint.latest_step"])
    assert 19 <= stopped < 40 and stopped % 12 != 0
    resumed = run_module(store, *args, f"resume_run={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, expected = loss_history(client, run.info.run_id), loss_history(client, ref.info.run_id)
    assert [s for s, _ in got] == list(range(1, 41))
    assert got == expected
