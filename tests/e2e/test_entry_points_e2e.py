"""The MLproject's entry points started with `mlflow run`."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import FAKE_RUN_ID, REPO, VENV_BIN, env_for

pytestmark = pytest.mark.slow


def test_mlflow_run_of_evaluate_with_run_id_alone_looks_for_the_run(tmp_path):
    """The shortest documented form, through a real `mlflow run`: it gets as far as looking the run up."""
    done = subprocess.run(
        [
            os.path.join(VENV_BIN, "mlflow"),
            "run",
            str(REPO),
            "-e",
            "evaluate",
            "--env-manager",
            "local",
            "--experiment-name",
            "evaluate",
            "-P",
            f"run_id={FAKE_RUN_ID}",
        ],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"Run {FAKE_RUN_ID} not found in the tracking store" in done.stderr, done.stderr[-3000:]
    assert "Expected key=value" not in done.stderr and "Add type hints" not in done.stderr
