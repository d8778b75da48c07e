"""main: the restoration chain as MLflow Project runs, chained by run IDs, finished steps reused."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, all_runs, env_for, stage_runs
from mlflow import MlflowClient

from pipeline.config import ConfigError
from pipeline.main import load_main_config, main, step_overrides
from pipeline.ops.chain_steps import STEPS

SHORT = [
    "trainer.max_steps=3",
    "validation.interval=3",
    "checkpoint.save_interval=3",
    "validation.num_samples=1",
    "tracking.flush_seconds=0.2",
]


def test_overrides_go_to_the_steps_that_have_the_key(store):
    cfg, words = load_main_config(
        ["main.reuse=false", "adapter.bottleneck=8", "pretrain_vocoder.optim.lr=0.01", "trainer.max_steps=7"]
    )
    assert cfg.reuse is False and words == [
        "adapter.bottleneck=8",
        "pretrain_vocoder.optim.lr=0.01",
        "trainer.max_steps=7",
    ]
    out = step_overrides(cfg, words)
    assert "adapter.bottleneck=8" in out["train_adapter"] and "adapter.bottleneck=8" not in out["pretrain_vocoder"]
    assert out["pretrain_vocoder"][-2:] == ["optim.lr=0.01", "trainer.max_steps=7"]
    assert all(o[-1] == "trainer.max_steps=7" for s, o in out.items() if s != "pretrain_vocoder")
    assert "ssl=tiny" in out["pretrain_vocoder"] and "ssl=tiny" not in out["finetune_vocoder"]  # from the runs


def test_presets_give_the_steps_settings_and_an_unknown_one_is_refused():
    quality, _ = load_main_config(["main.preset=quality"])
    assert (
        "loss.gan_start_step=2000" in quality.pretrain_vocoder and "trainer.max_steps=200" not in quality.train_adapter
    )
    tiny, _ = load_main_config([])
    assert tiny.preset == "tiny" and "trainer.max_steps=200" in tiny.train_adapter
    with pytest.raises(ConfigError, match="main.preset='nope': no such preset; choose one of quality, tiny"):
        load_main_config(["main.preset=nope"])


def test_an_override_no_step_knows_is_refused_before_anything_runs(store, capfd):
    assert main(["trainer.max_stepz=3"]) == 2
    assert "'trainer.max_stepz=3' fits no step of the chain" in capfd.readouterr().err
    assert all_runs(MlflowClient()) == []
    # main in a long-lived process (this test's) leaves its environment as it was: the staging directory of the
    # stages this process runs later stays theirs
    assert "PIPELINE_LAUNCH_DIR" not in os.environ


def test_a_step_is_started_with_the_directory_main_runs_in_and_nothing_stays(store, monkeypatch):
    from pipeline.engine.checkpoint_files import staging_here

    monkeypatch.delenv("PIPELINE_LAUNCH_DIR", raising=False)
    with staging_here():
        assert os.environ["PIPELINE_LAUNCH_DIR"] == str(store)
    assert "PIPELINE_LAUNCH_DIR" not in os.environ
    monkeypatch.setenv("PIPELINE_LAUNCH_DIR", "/outer")  # a main started by another keeps the outer one
    with staging_here():
        assert os.environ["PIPELINE_LAUNCH_DIR"] == "/outer"
    assert os.environ["PIPELINE_LAUNCH_DIR"] == "/outer"


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


@pytest.mark.slow
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
    assert main_run.info.run_name == f"{main_id[:6]}-restoration-chain-tiny-demo"
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


def test_a_known_key_with_a_wrong_value_is_refused_with_the_schemas_reason(store, capfd):
    assert main(["trainer.max_steps=abc"]) == 2
    err = capfd.readouterr().err
    assert "trainer.max_steps=abc" in err and "could not be converted to Integer" in err and "fits no step" not in err
    assert all_runs(MlflowClient()) == []
