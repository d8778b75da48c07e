"""`mlflow run` with the environment managers MLflow offers. `--env-manager local` (the project's .venv)
is what the rest of the suite runs; here `--env-manager uv` builds the environment from the project's
own files (conda.yaml's pip pins, the project itself) and trains in it, as a user without conda does.
The environment is built once per set of pins (~/.mlflow/envs) and uv's download cache is reused; the
first build took 77 s here (2 cores; downloads included)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers import REPO, TINY, VENV_BIN, env_for, loss_history
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_mlflow_run_with_uv_builds_the_environment_from_the_project_files_and_trains_in_it(store):
    env = env_for(store)
    if shutil.which("uv", path=env["PATH"]) is None:
        pytest.skip("uv is not installed (it comes with the test dependencies: pip install -e '.[test]')")
    overrides = " ".join([*TINY, "trainer.max_steps=4", "checkpoint.save_interval=2", "validation.interval=2"])
    proc = subprocess.run(
        [
            os.path.join(VENV_BIN, "mlflow"),
            "run",
            str(REPO),
            "-e",
            "train_adapter",
            "--env-manager",
            "uv",
            "--experiment-name",
            "train_adapter",
            "-P",
            f"overrides={overrides}",
        ],
        cwd=store,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    command = next(line for line in proc.stderr.splitlines() if "=== Running command" in line)
    assert "/.mlflow/envs/" in command, command
    assert "bin/activate && python -m pipeline.launcher --nproc=1 --torchrun='' train_adapter" in command, command
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("train_adapter").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.env"] == "uv"
    assert [step for step, _ in loss_history(client, run.info.run_id)] == [1, 2, 3, 4]
