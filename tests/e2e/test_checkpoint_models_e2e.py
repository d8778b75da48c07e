"""A checkpoint's logged model when its job is killed between upload and commit, and the resume that tidies it."""

from __future__ import annotations

import pytest
from helpers import checkpoint_models
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_a_job_killed_between_upload_and_commit_leaves_a_pending_model_that_its_resume_deletes(tmp_path):
    """SIGKILL after step 4's checkpoint is uploaded and its metrics stored with its model's ID, before the commit:
    the model stays PENDING (the Models tab shows it was not finished); the resume from step 2 deletes it, trains
    steps 3-6 again and lists one READY model per kept checkpoint."""
    import signal
    import subprocess

    from helpers import PYTHON, TINY, env_for, stage_runs

    args = [
        *TINY,
        "trainer.max_steps=6",
        "checkpoint.save_interval=2",
        "validation.interval=0",
        "checkpoint.keep_last_n=5",
        "checkpoint.keep_best_k=0",
    ]
    env = {**env_for(tmp_path), "PIPELINE_FAULTS": "checkpoint.commit@2=kill"}
    crashed = subprocess.run(
        [PYTHON, "-m", "pipeline.stages.train_adapter", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = stage_runs(client)[0].info.run_id
    assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "2"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        left = checkpoint_models(client, run_id)
        assert {step: m.status.name for step, m in left.items()} == {2: "READY", 4: "PENDING"}
        assert {m.key for m in left[4].metrics} >= {"train/loss", "lr"}  # linked when they were stored

        resumed = subprocess.run(
            [PYTHON, "-m", "pipeline.stages.train_adapter", f"resume_run={run_id}"],
            cwd=tmp_path,
            env=env_for(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        run = client.get_run(run_id)
        found = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
        assert sorted((int(m.tags.get("checkpoint.step")), m.model_type, m.status.name) for m in found) == [
            (2, "checkpoint", "READY"),
            (4, "checkpoint", "READY"),
            (6, "checkpoint", "READY"),
        ]
        assert left[4].model_id not in {m.model_id for m in found}
