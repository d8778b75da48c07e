"""Planning a job (engine/session.py plan_job): everything is decided and checked before anything is written."""

import pytest
from helpers import TINY, artifact_dir, snapshot, stage_runs
from mlflow import MlflowClient

from pipeline.config import ConfigError
from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import plan_job, run_stage
from pipeline.stages.train_adapter import TrainAdapter


def test_a_plan_resolves_launch_arguments_and_config_and_writes_nothing(store):
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", "checkpoint.save_interval=1"]) == EXIT_OK
    client = MlflowClient()
    run_id = stage_runs(client)[0].info.run_id
    before, experiments = snapshot(client), len(client.search_experiments())

    plan = plan_job(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=4", "optim.lr=2e-4"], client)
    assert (plan.resume.run_id, plan.resume.step, plan.launch.explicit_step) == (run_id, 2, False)
    assert plan.changes == {"optim.lr": (1e-3, 2e-4), "trainer.max_steps": (2, 4)}
    assert plan.cfg.ssl.name == "tiny" and plan.overrides == ["trainer.max_steps=4", "optim.lr=2e-4"]

    older = plan_job(TrainAdapter, [f"resume_run={run_id}", "resume_step=1", "trainer.max_steps=4"], client)
    assert (older.resume.step, older.launch.explicit_step) == (1, True)

    fresh = plan_job(TrainAdapter, [*TINY, "seed=7"], client)
    assert fresh.resume is None and fresh.changes == {} and fresh.cfg.seed == 7

    with pytest.raises(ConfigError, match="change the model architecture"):
        plan_job(TrainAdapter, [f"resume_run={run_id}", "ssl.layer=1", "trainer.max_steps=4"], client)
    with pytest.raises(ConfigError, match="Nothing to train"):
        plan_job(TrainAdapter, [f"resume_run={run_id}"], client)
    assert snapshot(client) == before and len(client.search_experiments()) == experiments


def test_a_latest_checkpoint_with_malformed_meta_falls_back_to_the_previous_one(store, capfd):
    import json

    from helpers import artifact_dir

    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=4", "checkpoint.save_interval=2"]) == EXIT_OK
    client = MlflowClient()
    run_id = stage_runs(client)[0].info.run_id
    meta_path = artifact_dir(client, run_id) / "checkpoints" / "step-00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]  # state.pt still matches its sha256: only the meta is broken
    meta_path.write_text(json.dumps(meta))
    capfd.readouterr()
    plan = plan_job(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=6"], client)
    assert plan.resume.step == 2
    assert "meta.json lacks config" in capfd.readouterr().err


def test_a_diverging_job_stops_failed_with_its_checkpoints_finite(store, capfd, monkeypatch):
    import torch
    from helpers import artifact_dir

    from pipeline.engine.cli import EXIT_FAILED

    original = TrainAdapter.compute_loss

    def nan_loss(self, batch, model=None):
        loss, parts = original(self, batch, model)
        return loss * float("nan"), parts

    monkeypatch.setattr(TrainAdapter, "compute_loss", nan_loss)
    code = run_stage(
        TrainAdapter,
        [
            *TINY,
            "trainer.max_steps=10",
            "checkpoint.save_interval=2",
            "validation.interval=0",
            "trainer.max_nonfinite_steps=3",
        ],
    )
    assert code == EXIT_FAILED
    assert "3 steps in a row (up to step 3) had a non-finite loss or gradient" in capfd.readouterr().err
    client = MlflowClient()
    run = stage_runs(client)[0]
    assert run.info.status == "FAILED" and run.data.tags["checkpoint.latest_step"] == "2"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/nonfinite_steps")] == [1, 2, 3]
    state = torch.load(artifact_dir(client, run.info.run_id) / "checkpoints/step-00000002/state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for module in state["modules"].values() for t in module.values())


def test_attempts_are_numbered_from_their_records_when_the_count_tag_is_garbage(store, capfd):
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", "checkpoint.save_interval=2"]) == EXIT_OK
    client = MlflowClient()
    run_id = stage_runs(client)[0].info.run_id
    client.set_tag(run_id, "resume.count", "two")
    assert run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=4"]) == EXIT_OK
    assert "Tag resume.count='two' is not a number; attempts are counted from their records" in capfd.readouterr().err
    assert client.get_run(run_id).data.tags["resume.count"] == "1"
    assert sorted(a.path for a in client.list_artifacts(run_id, "config") if "attempt-" in a.path) == [
        "config/attempt-1.yaml",
        "config/attempt-2.yaml",
    ]


def test_a_stored_checkpoint_missing_from_the_index_is_indexed_again_on_resume_and_retention_deletes_it(store, capfd):
    """The 200-kill soak's finding: a job killed between a commit and the index write, whose successor
    committed a newer checkpoint before it too was killed there, left a checkpoint no index names, which
    retention then kept for ever."""
    import csv
    import io

    from helpers import artifact_dir

    from pipeline.engine.checkpointing import list_checkpoints

    assert (
        run_stage(
            TrainAdapter,
            [
                *TINY,
                "trainer.max_steps=6",
                "checkpoint.save_interval=2",
                "validation.interval=0",
                "checkpoint.keep_last_n=5",
            ],
        )
        == EXIT_OK
    )
    client = MlflowClient()
    run_id = stage_runs(client)[0].info.run_id
    index = artifact_dir(client, run_id) / "checkpoints" / "index.csv"
    rows = list(csv.DictReader(io.StringIO(index.read_text())))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(row for row in rows if row["step"] != "4")
    index.write_text(out.getvalue())

    assert (
        run_stage(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=8", "checkpoint.keep_last_n=1"]) == EXIT_OK
    )
    assert "Checkpoints at steps 4 are stored but missing from checkpoints/index.csv" in capfd.readouterr().err
    assert list_checkpoints(client, run_id) == [8]


def test_credentials_given_as_overrides_appear_in_no_param_tag_description_or_artifact(store):
    """A password in a URL, in a tag or under a key named like a secret is logged as ***, everywhere."""
    secret = "hunter2-secret-pw"
    assert (
        run_stage(
            TrainAdapter,
            [
                *TINY,
                "trainer.max_steps=2",
                "validation.interval=0",
                f"+tracking.tags.source=postgresql://bob:{secret}@db/x",
                f"+tracking.tags.api_token={secret}",
            ],
        )
        == EXIT_OK
    )
    client = MlflowClient()
    run = stage_runs(client)[0]
    assert run.data.tags["source"] == "postgresql://***@db/x" and run.data.tags["api_token"] == "***"
    texts = [str(run.data.params), str(run.data.tags)]
    texts += [p.read_bytes().decode("latin-1") for p in artifact_dir(client, run.info.run_id).rglob("*") if p.is_file()]
    assert all(secret not in text for text in texts)
