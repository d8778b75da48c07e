"""train_adapter end to end: tracking, checkpoints, resume, branching and bad input.

Jobs run in-process where nothing needs a process boundary (fast), and as real subprocesses
(`mlflow run`, `python -m`) where signals or MLflow's own run handling are under test.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from helpers import (
    TINY,
    all_runs,
    artifact_dir,
    copied_store,
    loss_history,
    snapshot,
    stage_runs,
    wait_for,
)
from mlflow import MlflowClient

from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from pipeline.engine.session import TrainingHooks, run_stage
from pipeline.stages.train_adapter import TrainAdapter


def train(*args: str, hooks: TrainingHooks | None = None) -> int:
    return run_stage(TrainAdapter, [*TINY, *args], hooks=hooks)


FINISHED = ["trainer.max_steps=20", "checkpoint.save_interval=10", "validation.interval=10"]


def train_finished_run() -> dict:
    assert train(*FINISHED) == EXIT_OK
    (run,) = stage_runs(MlflowClient())
    return {"run_id": run.info.run_id}


@pytest.fixture
def finished_run(store, tmp_path_factory):
    """A finished 20-step run with checkpoints at steps 10 and 20: trained once per test session, copied into each
    test's store."""
    return copied_store(tmp_path_factory, store, "adapter-finished", [*TINY, *FINISHED], train_finished_run)["run_id"]


# --------------------------------------------------------------------------------------------
# A run as the dashboard shows it
# --------------------------------------------------------------------------------------------


def test_while_it_trains_the_description_shows_the_progress_tag_in_its_first_line(store):
    """The description is sent with the progress tag (one batch), so its first lines (what the UI shows
    before "Show more") never lag behind; the run's default name starts with its ID."""
    seen: dict = {}
    client = MlflowClient()

    class Look(TrainingHooks):
        def on_run_started(self, run_id):
            seen["run"] = run_id

        def on_validation(self, step, metrics):  # the loop waits here: progress stays at step 6
            if step == 6:
                seen["tags"] = wait_for(
                    lambda: (lambda t: t.get("progress", "").startswith("step 6/12") and t)(
                        client.get_run(seen["run"]).data.tags
                    ),
                    15,
                    what="the progress tag at step 6",
                )
            return None

    assert train("trainer.max_steps=12", "checkpoint.save_interval=4", "validation.interval=6", hooks=Look()) == EXIT_OK
    first_line = seen["tags"]["mlflow.note.content"].splitlines()[0]
    assert first_line.startswith(f"**RUNNING** · {seen['tags']['progress']} · latest checkpoint "), first_line
    run = client.get_run(seen["run"])
    assert run.info.run_name == f"{seen['run'][:6]}-tiny-demo"
    assert run.data.tags["mlflow.note.content"].startswith("**FINISHED** · step 12/12")
    assert (
        f"/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey="
        in run.data.tags["mlflow.note.content"]
    )


def test_each_kept_checkpoint_is_a_logged_model_with_the_metrics_of_its_step(store):
    """The experiment's Models tab lists the run's checkpoints (MLflow 3 logged models pointing at the
    run's checkpoint folders, no second copy), with their step's metrics linked by model_id; retention
    deletes the models of the checkpoints it deletes; the run's charts keep one value per step."""
    assert (
        train(
            "trainer.max_steps=12",
            "checkpoint.save_interval=4",
            "validation.interval=4",
            "checkpoint.keep_last_n=2",
            "checkpoint.keep_best_k=0",
        )
        == EXIT_OK
    )
    client = MlflowClient()
    (run,) = stage_runs(client)
    run_id = run.info.run_id
    models = client.search_logged_models(
        [run.info.experiment_id], order_by=[{"field_name": "metrics.val/loss", "ascending": True}]
    )
    assert sorted(m.name for m in models) == [
        f"step-00000008-{run.info.run_name}",
        f"step-00000012-{run.info.run_name}",
    ]
    val = dict(loss_history(client, run_id, "val/loss"))
    assert [float(m.params["step"]) for m in models] == sorted((8.0, 12.0), key=lambda s: val[int(s)])  # sorted
    for model in models:
        step = int(model.tags["checkpoint.step"])
        assert model.source_run_id == run_id and model.status.name == "READY" and model.model_type == "checkpoint"
        assert model.tags["checkpoint.uri"] == f"runs:/{run_id}/checkpoints/step-{step:08d}"
        assert {k: model.params[k] for k in ("model", "dataset", "stage")} == {
            "model": "tiny",
            "dataset": "demo",
            "stage": "train_adapter",
        }
        linked = {m.key: m.value for m in model.metrics}
        assert linked["train/loss"] == dict(loss_history(client, run_id))[step] and linked["val/loss"] == val[step]
        assert client.list_logged_model_artifacts(model.model_id) == []  # the bytes stay in the run's checkpoints/
    assert [s for s, _ in loss_history(client, run_id)] == list(range(1, 13))  # linking logged no second point
    assert [s for s, _ in loss_history(client, run_id, "val/loss")] == [4, 8, 12]


def test_checkpoint_table_filters_by_model_and_dataset(finished_run, capsys):
    from pipeline.checkpoint_table import main as table_main

    assert table_main(["--model", "tiny", "--dataset", "demo", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["run_id"], r["model"], r["dataset"]) for r in rows] == [
        ("step-00000020", finished_run, "tiny", "demo"),
        ("step-00000010", finished_run, "tiny", "demo"),
    ]
    assert rows[0]["val/loss"] > 0 and rows[0]["size"] > 0
    assert table_main(["--model", "hubert_base"]) == 0
    assert "no checkpoints found" in capsys.readouterr().out
    assert table_main(["--dataset", "demo", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("name,model,dataset,epoch,step,size,created,run_id")


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def test_existing_checkpoints_do_not_trigger_a_resume(finished_run, capfd):
    assert train("trainer.max_steps=5", "checkpoint.save_interval=5") == EXIT_OK
    assert "Starting fresh training (no checkpoint specified)" in capfd.readouterr().err
    client = MlflowClient()
    runs = stage_runs(client)
    assert len(runs) == 2
    assert [s for s, _ in loss_history(client, runs[1].info.run_id)] == [1, 2, 3, 4, 5]


def test_resume_continues_the_same_run_and_records_the_attempt(finished_run, capfd):
    client = MlflowClient()
    before = loss_history(client, finished_run)
    assert train(f"resume_run={finished_run}", "trainer.max_steps=30", "batch_size=8") == EXIT_OK
    err = capfd.readouterr().err
    assert f"Resuming from run {finished_run} checkpoint step-00000020" in err
    assert "Resuming from step 20" in err and "Restored model, optimizer, and scheduler states" in err
    assert "Configuration changes detected:\n  - batch_size: 4 -> 8\n  - trainer.max_steps: 20 -> 30" in err
    runs = stage_runs(client)
    assert len(runs) == 1
    run = client.get_run(finished_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume.count"] == "1" and run.data.tags["resume.from"] == "step 20"
    history = loss_history(client, finished_run)
    assert [s for s, _ in history] == list(range(1, 31)) and history[:20] == before
    attempt = (artifact_dir(client, finished_run) / "config" / "attempt-2.yaml").read_text()
    assert "batch_size" in attempt and "old: 4" in attempt and "new: 8" in attempt
    assert "| 2 |" in run.data.tags["mlflow.note.content"]


def test_optimizer_overrides_on_resume_take_effect(store, capfd):
    """A restored optimizer carries the settings it was saved with; the resumed config must still win."""
    from pipeline.engine.checkpoint_files import load_state

    assert (
        train("optim.schedule=constant", "trainer.max_steps=6", "checkpoint.save_interval=6", "validation.interval=6")
        == EXIT_OK
    )
    client = MlflowClient()
    (run,) = stage_runs(client)
    run_id = run.info.run_id
    assert train(f"resume_run={run_id}", "optim.lr=5e-4", "optim.weight_decay=0.01", "trainer.max_steps=10") == EXIT_OK
    assert (
        "Optimizer adapters: the resumed config changes initial_lr 0.001 -> 0.0005, weight_decay 0.0 -> 0.01"
        in capfd.readouterr().err
    )
    lrs = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert lrs == [1e-3] * 6 + [5e-4] * 4
    (group,) = load_state(artifact_dir(client, run_id) / "checkpoints" / "step-00000010")["optimizers"]["adapters"][
        "param_groups"
    ]
    assert (group["initial_lr"], group["weight_decay"]) == (5e-4, 0.01)

    # A new schedule shape continues from the current LR: cosine from step 10 down to half of it at step 20.
    assert (
        train(f"resume_run={run_id}", "optim.schedule=cosine", "optim.min_lr_ratio=0.5", "trainer.max_steps=20")
        == EXIT_OK
    )
    lrs = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert lrs[:10] == [1e-3] * 6 + [5e-4] * 4
    assert all(a > b for a, b in zip(lrs[9:], lrs[10:])) and lrs[10] > 0.98 * 5e-4
    assert lrs[-1] == pytest.approx(2.5e-4)


def test_resume_from_an_older_step_branches_into_a_nested_run(finished_run, capfd):
    client = MlflowClient()
    original = loss_history(client, finished_run)
    assert train(f"resume_run={finished_run}", "resume_step=10") == EXIT_OK
    runs = stage_runs(client)
    assert len(runs) == 2
    branch = runs[1]
    assert branch.data.tags["mlflow.parentRunId"] == finished_run
    assert branch.data.tags["resume.branch_of"] == finished_run
    assert loss_history(client, finished_run) == original  # the original history is untouched
    history = loss_history(client, branch.info.run_id)
    assert [s for s, _ in history] == list(range(1, 21))
    assert history[:10] == original[:10]
    assert history[10:] == original[10:]  # same data, same state: the branch retraces exactly


def test_losses_do_not_depend_on_the_number_of_data_workers(store):
    assert train("trainer.max_steps=6", "checkpoint.save_interval=6", "validation.interval=0") == EXIT_OK
    assert (
        train("trainer.max_steps=6", "checkpoint.save_interval=6", "validation.interval=0", "data.num_workers=2")
        == EXIT_OK
    )
    client = MlflowClient()
    first, second = stage_runs(client)
    assert loss_history(client, first.info.run_id) == loss_history(client, second.info.run_id)


@pytest.mark.parametrize("kind", ["runs_uri", "local_path"])
def test_resume_from_a_checkpoint_uri_or_path_branches(finished_run, capfd, kind):
    client = MlflowClient()
    if kind == "runs_uri":
        source = f"runs:/{finished_run}/checkpoints/step-00000010"
    else:
        source = artifact_dir(client, finished_run) / "checkpoints" / "step-00000010"
    assert train(f"checkpoint.resume_from={source}", "trainer.max_steps=12") == EXIT_OK
    assert "Resuming from step 10" in capfd.readouterr().err
    branch = [r for r in stage_runs(client) if r.info.run_id != finished_run][0]
    assert branch.data.tags["mlflow.parentRunId"] == finished_run
    assert [s for s, _ in loss_history(client, branch.info.run_id)] == list(range(1, 13))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(finished_run, capfd):
    client = MlflowClient()
    state = artifact_dir(client, finished_run) / "checkpoints" / "step-00000020" / "state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # truncated upload
    assert train(f"resume_run={finished_run}", "trainer.max_steps=22") == EXIT_OK
    err = capfd.readouterr().err
    assert "step-00000020: state.pt is corrupted or truncated" in err
    assert "Falling back to the previous checkpoint" in err
    assert "Resuming from step 10" in err
    assert [s for s, _ in loss_history(client, finished_run)][-1] == 22


# --------------------------------------------------------------------------------------------
# Bad input: one clear message, non-zero exit, nothing written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["resume_run=0123456789abcdef0123456789abcdef"], "Run 0123456789abcdef0123456789abcdef not found"),
        (
            ["checkpoint.resume_from=/no/such/checkpoint"],
            "Checkpoint specified in resume_from not found: /no/such/checkpoint",
        ),
        (["trainer.max_steps=[1,"], "Malformed override"),
        (["trainer.max_stepz=5"], "max_stepz"),
        (["RESUME:adapter.bottleneck=4"], "Refusing to resume: these overrides change the model architecture"),
        (["RESUME:ssl.layer=1"], "ssl.layer"),
        (["RESUME:resume_step=15"], "no checkpoint at step 15; available steps: 10, 20"),
        (["resume_step=10"], "resume_step needs resume_run"),
        (["RESUME:batch_size=4"], "Nothing to train: the checkpoint is at step 20 and trainer.max_steps=20"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(finished_run, capfd, args, message):
    args = [a.replace("RESUME:", "") for a in args] + (
        [f"resume_run={finished_run}"] if args[0].startswith("RESUME:") else []
    )
    client = MlflowClient()
    before = snapshot(client)
    capfd.readouterr()
    assert train(*args) == EXIT_BAD_INPUT
    assert message in capfd.readouterr().err
    assert snapshot(client) == before


def test_a_store_that_cannot_read_the_index_stops_the_resume_and_changes_nothing(finished_run, capfd, monkeypatch):
    """An outage while reading checkpoints/index.csv must not read as "no checkpoints" (retention would
    then delete the best ones): the resume stops before writing anything."""
    import pipeline.engine.checkpointing as checkpointing

    client = MlflowClient()
    before = snapshot(client)
    real = MlflowClient.download_artifacts

    def index_unavailable(self, run_id, path, dst_path=None):
        if path.endswith("index.csv"):
            raise OSError("tracking server unavailable")
        return real(self, run_id, path, dst_path)

    monkeypatch.setattr(MlflowClient, "download_artifacts", index_unavailable)
    monkeypatch.setattr(checkpointing.time, "sleep", lambda seconds: None)
    capfd.readouterr()
    assert train(f"resume_run={finished_run}", "trainer.max_steps=30") == EXIT_FAILED
    assert "cannot read checkpoints/index.csv" in capfd.readouterr().err
    monkeypatch.undo()
    assert snapshot(client) == before


def test_runs_that_cannot_be_resumed(store, capfd):
    client = MlflowClient()
    experiment = client.create_experiment("other")
    asr = client.create_run(experiment, tags={"stage": "train_asr"}).info.run_id
    empty = client.create_run(experiment, tags={"stage": "train_adapter"}).info.run_id
    deleted = client.create_run(experiment, tags={"stage": "train_adapter"}).info.run_id
    client.delete_run(deleted)
    before = snapshot(client)
    for run_id, message in [
        (asr, f"Run {asr} is a train_asr run, not a train_adapter run"),
        (empty, f"Run {empty} has no checkpoints to resume from"),
        (deleted, f"Run {deleted} is deleted"),
    ]:
        capfd.readouterr()
        assert train(f"resume_run={run_id}") == EXIT_BAD_INPUT
        assert message in capfd.readouterr().err
    after = snapshot(client)
    # the RUNNING run with nothing to resume and no live job is ended, and says so (docs/reliability.md, row 87)
    assert after.pop(empty)[0] == "FAILED" and before.pop(empty)[0] == "RUNNING"
    assert after == before  # the others are untouched


def test_checkpoint_with_pickled_code_is_refused(store, capfd):
    ckpt = store / "evil" / "step-00000001"
    ckpt.mkdir(parents=True)
    payload = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x0btouch pwned\x85R."
    import zipfile

    with zipfile.ZipFile(ckpt / "state.pt", "w") as z:  # torch's zip layout around a hostile pickle
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    digest = hashlib.sha256((ckpt / "state.pt").read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(
        json.dumps({"format_version": 1, "stage": "train_adapter", "step": 1, "sha256": digest, "config": {}})
    )
    assert train(f"checkpoint.resume_from={ckpt}") == EXIT_BAD_INPUT
    assert "refusing to load" in capfd.readouterr().err
    assert not (store / "pwned").exists()
    assert all_runs(MlflowClient()) == []


# --------------------------------------------------------------------------------------------
# Stop and exact resume, with real signals and real `mlflow run` subprocesses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.mode=maximize", "checkpoint.mode='maximize'; choose one of min, max"),
        ("checkpoint.monitor=val/accuracy", "checkpoint.monitor='val/accuracy' is never logged by train_adapter"),
        ("optim.schedule=linear", "optim.schedule='linear'; choose one of cosine, constant"),
        ("batch_size=0", "batch_size=0 must be positive"),
        ("batch_size=-2", "batch_size=-2 must be positive"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be positive"),
        ("checkpoint.save_interval=-1", "checkpoint.save_interval=-1 must be positive"),
        ("trainer.log_interval=0", "trainer.log_interval=0 must be positive"),
        ("checkpoint.keep_last_n=-1", "checkpoint.keep_last_n=-1 must be zero or more"),
    ],
)
def test_settings_that_would_act_silently_are_refused_at_start_up(store, capfd, override, message):
    client = MlflowClient()
    assert train(override) == EXIT_BAD_INPUT
    assert message in capfd.readouterr().err
    assert not all_runs(client)


def test_bf16_autocast_trains_on_the_cpu(store):
    assert (
        train("trainer.precision=bf16", "trainer.device=cpu", "trainer.max_steps=3", "validation.interval=3") == EXIT_OK
    )
    client = MlflowClient()
    (run,) = stage_runs(client)
    losses = [v for _, v in loss_history(client, run.info.run_id)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(client.get_run(run.info.run_id).data.metrics["val/loss"])
