"""Versioned checkpoints (engine/checkpoint_migrate.py): a state.pt of an older format version is migrated once
where it is read, so a checkpoint of an earlier release resumes; a newer or unknown version is refused."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO, TINY, artifact_dir, loss_history
from mlflow import MlflowClient

from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import FORMAT_VERSION, CheckpointError, load_state, verify
from pipeline.engine.checkpoint_migrate import MIGRATIONS, STATE_KEYS, migrate, read_state
from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter

FIXTURE = REPO / "tests/fixtures/checkpoint-v1/step-00000004"  # tests/fixtures/checkpoint-v1/README.md

# The keys a version-1 writer may have left out, and the value migrate gives each (config: the fixture's own)
V1_DEFAULTS = {
    "batch_size": 4,
    "world_size": 1,
    "data_workers": 0,
    "nonfinite_steps": 0,
    "nonfinite_streak": 0,
    "metric_window": {"sums": {}, "last": {}, "count": 0},
    "scaler": {},
    "val_metrics": {},
    "seed": 1234,
}


def fixture_meta() -> dict:
    return json.loads((FIXTURE / "meta.json").read_text())


def full_state() -> dict:
    """A version-2 state: the fixture's, migrated."""
    return migrate(load_state(FIXTURE), fixture_meta())


@pytest.mark.parametrize("key", [*V1_DEFAULTS, "rank_rng"])
def test_a_version_1_state_without_a_key_gets_its_documented_default(key):
    state = full_state()
    del state[key]
    migrated = migrate(state, fixture_meta())
    assert set(migrated) == set(STATE_KEYS)
    expected = [state["rng"]] if key == "rank_rng" else V1_DEFAULTS[key]
    assert migrated[key] == expected


def test_a_version_1_state_keeps_every_key_it_has():
    state = full_state()
    state.update(batch_size=2, world_size=3, nonfinite_steps=5, val_metrics={"val/loss": 0.5})
    assert migrate(state, fixture_meta()) == state


def test_a_version_2_state_passes_unchanged():
    state = full_state()
    before = copy.deepcopy(state)
    assert migrate(state, {**fixture_meta(), "format_version": FORMAT_VERSION}) is state
    assert state.keys() == before.keys() and state["metric_window"] == before["metric_window"]


def test_a_version_2_state_that_lacks_a_key_is_refused_naming_it():
    state = full_state()
    del state["metric_window"]
    with pytest.raises(CheckpointError, match="lacks metric_window; it was not written by this pipeline"):
        migrate(state, {**fixture_meta(), "format_version": FORMAT_VERSION}, "here")


def test_a_newer_version_is_refused_saying_to_update_the_code():
    meta = {**fixture_meta(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(CheckpointError) as err:
        migrate(full_state(), meta, "ckpt")
    message = str(err.value)
    assert f"format version {FORMAT_VERSION + 1}" in message and f"versions 1 to {FORMAT_VERSION}" in message
    assert "written by a newer release" in message and "git pull" in message


@pytest.mark.parametrize("version", [None, 0, "1", 1.0, True])
def test_an_unknown_version_is_refused(version):
    meta = {**fixture_meta(), "format_version": version}
    with pytest.raises(CheckpointError, match=f"format version {version!r}, this code reads versions 1 to"):
        migrate(full_state(), meta, "ckpt")


def test_every_older_version_has_a_migration():
    assert sorted(MIGRATIONS) == list(range(1, FORMAT_VERSION))


def test_the_fixture_is_a_version_1_checkpoint_of_the_first_release():
    meta = verify(FIXTURE)
    assert meta["format_version"] == 1
    first_release = {"step", "epoch", "batch_in_epoch", "seed", "modules", "optimizers", "schedulers", "scaler", "rng"}
    assert set(load_state(FIXTURE)) == first_release | {"val_metrics"}
    assert set(read_state(FIXTURE, meta)) == set(STATE_KEYS)


def run_with_fixture(client: MlflowClient, staging: Path) -> str:
    """A train_adapter run whose one committed checkpoint is the fixture, as its uploads left it."""
    experiment = client.create_experiment("train_adapter")
    run_id = client.create_run(experiment, tags={tag.STAGE: "train_adapter"}).info.run_id
    shutil.copytree(FIXTURE, staging / FIXTURE.name)
    client.log_artifacts(run_id, str(staging / FIXTURE.name), f"checkpoints/{FIXTURE.name}")
    client.set_tag(run_id, tag.CHECKPOINT_LATEST, f"checkpoints/{FIXTURE.name}")
    client.set_tag(run_id, tag.CHECKPOINT_LATEST_STEP, "4")
    client.set_terminated(run_id, "KILLED")
    return run_id


def test_a_version_1_checkpoint_resumes_from_its_step_with_its_optimizer_state(store):
    """A run whose latest checkpoint is the version-1 fixture (written without the keys added since the first
    release) is resumed: training goes on at step 5 from the checkpoint's data position and optimizer state, and
    its new checkpoint is of the current version with every key."""
    client = MlflowClient()
    run_id = run_with_fixture(client, store / "fixture")
    old = load_state(FIXTURE)
    assert run_stage(TrainAdapter, [*TINY, f"resume_run={run_id}", "trainer.max_steps=6"]) == EXIT_OK
    assert [step for step, _ in loss_history(client, run_id)] == [5, 6]
    new_dir = artifact_dir(client, run_id) / "checkpoints/step-00000006"
    meta = verify(new_dir)
    new = load_state(new_dir)
    assert meta["format_version"] == FORMAT_VERSION and set(new) == set(STATE_KEYS)
    assert (new["step"], new["epoch"], new["batch_in_epoch"]) == (6, old["epoch"], old["batch_in_epoch"] + 2)
    adam_steps = {float(s["step"]) for s in old["optimizers"]["adapters"]["state"].values()}
    assert adam_steps == {4.0}  # every tensor's Adam step count goes on from the checkpoint's, not from 0
    assert {float(s["step"]) for s in new["optimizers"]["adapters"]["state"].values()} == {6.0}
    assert new["schedulers"]["adapters"]["last_epoch"] == old["schedulers"]["adapters"]["last_epoch"] + 2
    assert (new["world_size"], new["nonfinite_steps"], len(new["rank_rng"])) == (1, 0, 1)
    assert client.get_run(run_id).data.tags[tag.CHECKPOINT_LATEST_STEP] == "6"
