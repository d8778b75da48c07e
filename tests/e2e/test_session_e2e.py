"""A job's session as a process."""

import pytest
from helpers import TINY, stage_runs
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

pytestmark = pytest.mark.slow


def test_a_crash_while_a_snapshot_is_written_leaves_the_previous_checkpoint_latest_and_resumes_exactly(store):
    """SIGKILL inside the second checkpoint's serialization (a fault point armed from the environment):
    the first checkpoint stays the latest, nothing half-written is listed or left in staging, and the
    resume from it is bit-identical to an uninterrupted run."""
    import signal
    import subprocess

    from helpers import PYTHON, env_for, loss_history

    args = [*TINY, "trainer.max_steps=6", "checkpoint.save_interval=2", "validation.interval=0"]
    env = {**env_for(store), "PIPELINE_FAULTS": "checkpoint.serialize@2=kill"}
    crashed = subprocess.run(
        [PYTHON, "-m", "pipeline.stages.train_adapter", *args],
        cwd=store,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert "Fault injection at checkpoint.serialize (visit 2): kill" in crashed.stderr
    client = MlflowClient()
    run_id = stage_runs(client)[0].info.run_id
    assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "2"
    stored = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert "checkpoints/step-00000004" not in stored
    staging = store / ".checkpoints" / run_id
    assert list(staging.glob(".tmp-step-00000004-*"))  # the write the crash cut short

    resumed = subprocess.run(
        [PYTHON, "-m", "pipeline.stages.train_adapter", f"resume_run={run_id}"],
        cwd=store,
        env=env_for(store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Startup: first step 3 at" in resumed.stderr
    assert not list(staging.glob(".tmp-*"))
    assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "6"

    assert run_stage(TrainAdapter, args) == EXIT_OK
    reference = stage_runs(client)[-1].info.run_id
    resumed_losses, reference_losses = dict(loss_history(client, run_id)), dict(loss_history(client, reference))
    assert sorted(resumed_losses) == list(range(1, 7)) and resumed_losses == reference_losses
