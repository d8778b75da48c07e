"""`main` as a user starts it: the chain as MLflow Project runs, twice."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, env_for, stage_runs
from mlflow import MlflowClient

from pipeline.ops.chain_steps import STEPS

pytestmark = pytest.mark.slow


SHORT = [
    "trainer.max_steps=3",
    "validation.interval=3",
    "checkpoint.save_interval=3",
    "validation.num_samples=1",
    "tracking.flush_seconds=0.2",
]


def _project_copy(root: Path) -> Path:
    """The sources as they are now, outside git: immune to edits in the working tree during the test
    (the code version is then a hash of the package sources)."""
    project = root / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "configs"):
        shutil.copytree(REPO / name, project / name, ignore=ignore)
    for name in ("MLproject", "conda.yaml"):
        shutil.copy2(REPO / name, project / name)
    return project


def _main(project: Path, workdir: Path) -> subprocess.CompletedProcess:
    """``main`` started from ``workdir``, outside the project (its steps run inside it, as MLflow Projects do)."""
    env = {**env_for(workdir), "PYTHONPATH": str(project)}
    return subprocess.run(
        [PYTHON, "-m", "pipeline.main", *SHORT], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )


def test_main_twice_trains_the_chain_once_then_reuses_every_step(store):
    project = _project_copy(store)
    first = _main(project, store)
    assert first.returncode == 0, first.stderr[-4000:]
    client = MlflowClient()
    ids = {step: [r.info.run_id for r in stage_runs(client, step)] for step in STEPS}
    assert all(len(runs) == 1 for runs in ids.values()), ids
    adapter, vocoder, finetuned = (ids[s][0] for s in STEPS)
    for step in STEPS:
        assert f"{step:<18} {ids[step][0]}  (trained)" in first.stdout
    assert "mlflow ui --backend-store-uri" in first.stdout
    # main's run: named after what it trains, its steps nested under it and linked from its description
    (main_run,) = stage_runs(client, "main")
    main_id = main_run.info.run_id
    assert main_run.info.run_name == f"{main_id[:6]}-restoration-chain-logmel-demo"
    for step in STEPS:
        step_run = client.get_run(ids[step][0])
        assert step_run.data.tags["mlflow.parentRunId"] == main_id
        page = f"/#/experiments/{step_run.info.experiment_id}/runs/{ids[step][0]}?workflowType=machine_learning"
        link = f"[{step_run.info.run_name}]({page})"
        assert link in main_run.data.tags["mlflow.note.content"]
        assert f"/#/experiments/{step_run.info.experiment_id}/runs?workflowType=machine_learning" in first.stdout
    run = client.get_run(finetuned)
    assert run.info.status == "FINISHED"
    assert run.data.params["adapter_run"] == adapter and run.data.params["vocoder_run"] == vocoder
    assert run.data.tags["chain.adapter_run"] == adapter and run.data.tags["chain.vocoder_run"] == vocoder
    assert client.get_run(vocoder).data.tags["chain.previous_run"] == adapter
    assert run.data.tags["chain.code_version"].startswith("src-")  # no git in the copy: a source hash
    # the steps staged their checkpoints where main was started, never inside the project
    assert not (project / ".checkpoints").exists() and (store / ".checkpoints" / finetuned).is_dir()

    second = _main(project, store)
    assert second.returncode == 0, second.stderr[-4000:]
    for step in STEPS:
        assert f"{step:<18} {ids[step][0]}  (reused)" in second.stdout
        assert [r.info.run_id for r in stage_runs(client, step)] == ids[step]  # nothing trained again
    mains = stage_runs(client, "main")
    assert len(mains) == 2 and mains[1].data.tags["chain.reused"] == ",".join(STEPS)
    assert mains[1].data.tags["chain.finetune_vocoder"] == finetuned and mains[1].info.status == "FINISHED"
    assert "Starting fresh training" not in second.stderr
    # the chain is registered once: the reused chain keeps its version
    versions = client.search_model_versions("name='speech-restoration'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", finetuned)]
    assert [m.data.tags["chain.model"] for m in mains] == ["models:/speech-restoration/1"] * 2
    assert "models:/speech-restoration/1" in first.stdout
    # main ends with the chain scored (reused the second time) and a demo file restored
    evaluations = stage_runs(client, "evaluate")
    assert len(evaluations) == 1 and evaluations[0].data.tags["eval.vocoder_run"] == finetuned
    assert "eval/restored/pesq_wb" in evaluations[0].data.metrics and "eval/delta/stoi" in evaluations[0].data.metrics
    assert "Reusing finished evaluation run" in second.stderr
    assert client.get_run(finetuned).data.tags["evaluation.run"] == evaluations[0].info.run_id
    restored = store / "restored" / "DEMO-0036_degraded.wav"
    assert f"restored demo      {restored}" in second.stdout and restored.exists()
