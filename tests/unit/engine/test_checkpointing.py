"""Checkpoint files: atomic write, sha256 verification, safe loading, retention, RNG state."""

import os
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import HISTORY, POLICY, REPO, committed_run, resume_and_commit

from pipeline.common import faults
from pipeline.engine.checkpoint_files import (
    CheckpointError,
    load_state,
    verify,
    write_local,
)
from pipeline.engine.checkpointing import RetentionPolicy, steps_to_keep
from pipeline.engine.rng import capture_rng, restore_rng


def test_write_verify_load_roundtrip(tmp_path):
    state = {"step": 3, "modules": {"a": {"w": torch.arange(4.0)}}, "rng": capture_rng()}
    path = write_local(tmp_path, 3, state, {"format_version": 1, "stage": "x", "step": 3})
    assert path.name == "step-00000003" and not list(tmp_path.glob(".tmp-*"))
    meta = verify(path)
    assert meta["size"] == (path / "state.pt").stat().st_size
    loaded = load_state(path)
    assert torch.equal(loaded["modules"]["a"]["w"], torch.arange(4.0))


def test_corruption_is_detected(tmp_path):
    path = write_local(tmp_path, 1, {"x": torch.zeros(100)}, {"format_version": 1})
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        verify(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    torch.save({"x": Payload()}, ckpt / "state.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_retention_keeps_last_n_best_k_and_latest():
    rows = [{"step": s, "val/loss": v} for s, v in [(10, 0.5), (20, 0.1), (30, 0.4), (40, 0.3), (50, 0.9)]]
    assert steps_to_keep(rows, RetentionPolicy(2, 1, "val/loss", "min"), latest=50) == {40, 50, 20}
    assert steps_to_keep(rows, RetentionPolicy(1, 0, "val/loss", "min"), latest=50) == {50}
    assert steps_to_keep(rows, RetentionPolicy(0, 1, "val/loss", "max"), latest=50) == {50}
    assert steps_to_keep(rows, RetentionPolicy(0, 2, "val/loss", "max"), latest=30) == {50, 10, 30}


def test_rng_state_roundtrips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = write_local(tmp_path, 1, {"rng": capture_rng()}, {"format_version": 1})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_state(path)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_no_unsafe_torch_load_anywhere():
    offenders = []
    for path in list((REPO / "pipeline").rglob("*.py")) + list((REPO / "scripts").rglob("*.py")):
        text = path.read_text()
        if re.search(r"weights_only\s*=\s*False", text):
            offenders.append(str(path))
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
    assert offenders == []


def test_a_checkpoint_is_committed_only_after_the_metrics_of_its_steps_are_stored(store):
    """A crash right after a commit must not leave the charts with a gap before the checkpoint step."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipeline.engine.checkpointing import CheckpointStore

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("commit-order")).info.run_id

    class SlowSend:  # an in-flight metric batch that reaches the store only when waited on
        def wait(self):
            time.sleep(0.3)
            client.log_batch(run_id, metrics=[Metric("train/loss", 1.0 / s, 0, s) for s in range(1, 6)])

    seen_at_commit = []
    ckpts = CheckpointStore(
        client,
        run_id,
        store / "staging",
        RetentionPolicy(2, 0, "val/loss", "min"),
        on_commit=lambda step, row, metrics: seen_at_commit.append(
            [m.step for m in client.get_metric_history(run_id, "train/loss")]
        ),
    )
    ckpts.save(
        5,
        {"x": torch.zeros(3)},
        {"format_version": 1, "stage": "x", "step": 5},
        {"name": "step-00000005", "step": 5},
        flush_metrics=lambda link=None: [SlowSend()],
    )
    ckpts.close()
    assert seen_at_commit == [[1, 2, 3, 4, 5]]
    assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "5"


def test_the_training_thread_does_not_wait_for_serialization_and_the_checkpoint_holds_the_saved_state(
    store, monkeypatch
):
    """save() returns while the writer is still held inside serialization; training then changes its
    tensors, and the committed checkpoint still holds them as they were when save() was called."""
    import threading

    from mlflow import MlflowClient

    from pipeline.engine import checkpointing
    from pipeline.engine.checkpointing import CheckpointStore, download_checkpoint

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("snapshot")).info.run_id
    entered, release = threading.Event(), threading.Event()
    real_write = checkpointing.write_local

    def held_write(*args, **kwargs):  # a writer as slow as we like: it waits until released
        entered.set()
        assert release.wait(30), "the test never released the writer"
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "write_local", held_write)
    weights = torch.arange(6.0)
    optimizer_state = {"exp_avg": torch.ones(6), "step": torch.tensor(3.0), "lr": 1e-3}
    ckpts = CheckpointStore(client, run_id, store / "staging", RetentionPolicy(2, 0, "val/loss", "min"))
    ckpts.save(
        7,
        {"w": weights, "opt": optimizer_state},
        {"format_version": 1, "stage": "x", "step": 7},
        {"name": "step-00000007", "step": 7},
    )
    assert entered.wait(30)  # the write runs in the background ...
    assert not ckpts._pending.done()  # ... and save() returned before it finished
    weights.add_(100.0)  # training goes on changing the live tensors in place
    optimizer_state["exp_avg"].mul_(0.0)
    optimizer_state["lr"] = 5.0
    release.set()
    ckpts.close()
    assert client.get_run(run_id).data.tags["checkpoint.latest_step"] == "7"
    saved = load_state(download_checkpoint(client, run_id, 7, store / "check"))
    assert torch.equal(saved["w"], torch.arange(6.0))
    assert torch.equal(saved["opt"]["exp_avg"], torch.ones(6)) and saved["opt"]["lr"] == 1e-3


def test_a_snapshot_copies_every_tensor_and_rebuilds_every_container():
    from pipeline.engine.checkpoint_files import Snapshotter

    state = {
        "m": {"w": torch.randn(3, 4)},
        "groups": [{"params": [0, 1], "betas": (0.9, 0.98)}],
        "rng": {"python": (3, tuple(range(625)), None), "torch": torch.get_rng_state()},
        "step": 5,
    }
    snap = Snapshotter().take(state)
    assert snap == {**snap} and snap["step"] == 5 and snap["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(snap["m"]["w"], state["m"]["w"]) and snap["m"]["w"].data_ptr() != state["m"]["w"].data_ptr()
    assert snap["groups"] is not state["groups"] and snap["groups"][0] is not state["groups"][0]
    state["groups"][0]["params"].append(2)
    assert snap["groups"][0]["params"] == [0, 1]


# --------------------------------------------------------------------------------------------
# The index a run's retention reads back (a real tracking store)
# --------------------------------------------------------------------------------------------


def test_a_transient_failure_reading_the_index_on_resume_keeps_the_best_checkpoints(store, monkeypatch):
    from mlflow import MlflowClient

    client, run_id = committed_run(HISTORY, POLICY)
    real = MlflowClient.download_artifacts
    failures = []

    def flaky(self, run, path, dst=None):
        if path.endswith("index.csv") and not failures:
            failures.append(path)
            raise OSError("connection reset by peer")
        return real(self, run, path, dst)

    monkeypatch.setattr(MlflowClient, "download_artifacts", flaky)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert resume_and_commit(client, run_id, POLICY, 30) == [20, 25, 30]  # last 1 + best 2, not just [30]
    assert failures


def test_an_index_that_cannot_be_read_at_all_stops_the_resume_instead_of_reading_as_empty(store, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.engine.checkpointing import list_checkpoints, read_index

    client, run_id = committed_run(HISTORY, POLICY)

    def down(self, run, path, dst=None):
        raise OSError("tracking server unavailable")

    monkeypatch.setattr(MlflowClient, "download_artifacts", down)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(CheckpointError, match="cannot read checkpoints/index.csv .*nothing was changed"):
        read_index(client, run_id)
    monkeypatch.undo()
    assert list_checkpoints(client, run_id) == [20, 25]


def test_junk_in_the_index_is_rebuilt_from_meta_and_retention_keeps_the_best(store):
    from pipeline.engine.checkpointing import read_index

    client, run_id = committed_run(HISTORY, POLICY)
    junk = Path("index.csv")
    junk.write_bytes(bytes(range(256)) * 4)
    client.log_artifact(run_id, str(junk), "checkpoints")
    rows = read_index(client, run_id)
    assert [(int(r["step"]), r["val/loss"]) for r in rows] == [(20, 0.1), (25, 0.2)]
    assert resume_and_commit(client, run_id, POLICY, 30) == [20, 25, 30]


def test_retention_never_deletes_a_checkpoint_missing_from_the_index(store):
    from pipeline.engine.checkpointing import CheckpointStore, list_checkpoints

    client, run_id = committed_run(HISTORY, POLICY)
    # an index that lost its rows (as after an outage): only the new checkpoint is known
    store_ = CheckpointStore(client, run_id, Path(".checkpoints"), POLICY, index_rows=[])
    store_.save(30, {"w": torch.zeros(4)}, {"format_version": 1, "step": 30}, {"name": "step-00000030", "step": 30})
    store_.close()
    assert list_checkpoints(client, run_id) == [20, 25, 30]


def test_an_index_row_of_a_step_no_longer_stored_never_ranks_and_is_dropped(store):
    from pipeline.engine.checkpointing import read_index
    from pipeline.engine.resume import RunCheckpoints

    client, run_id = committed_run(HISTORY, POLICY)  # stored 20 (0.1) and 25 (0.2)
    stale = Path("index.csv")  # a row for step 15, deleted long ago, with the best value of all
    stale.write_text("name,step,val/loss\nstep-00000015,15,0.05\nstep-00000020,20,0.1\nstep-00000025,25,0.2\n")
    client.log_artifact(run_id, str(stale), "checkpoints")
    client.set_tag(run_id, "stage", "x")
    assert RunCheckpoints(client, run_id, ("x",)).best_step() == 20  # not 15: it is not stored
    assert resume_and_commit(client, run_id, POLICY, 30) == [20, 25, 30]  # the stale row pushed 25 out before
    assert [int(r["step"]) for r in read_index(client, run_id)] == [20, 25, 30]  # and it is gone for good


def test_a_failed_retention_delete_still_writes_the_index_and_the_next_commit_deletes_it(store, caplog):
    from pipeline.engine.checkpointing import list_checkpoints, read_index

    policy = RetentionPolicy(keep_last_n=1, keep_best_k=1, monitor="val/loss", mode="min")
    faults.arm("checkpoint.retention@1=raise:EIO")  # deleting step 10 at the commit of 30
    try:
        client, run_id = committed_run([(10, 0.1), (20, 0.5), (30, 0.05)], policy)  # 30 drops 10 and 20
    finally:
        faults.disarm()
    assert list_checkpoints(client, run_id) == [10, 30]
    # 30 is indexed (the best now) although a delete failed; 10 keeps its row, so it is deleted later
    assert [(int(r["step"]), r["val/loss"]) for r in read_index(client, run_id)] == [(10, "0.1"), (30, "0.05")]
    assert "Retention could not delete checkpoint step-00000010" in caplog.text
    assert resume_and_commit(client, run_id, policy, 40) == [30, 40]
    assert [int(r["step"]) for r in read_index(client, run_id)] == [30, 40]


def test_a_delete_that_keeps_failing_is_reported_as_an_error_and_indexing_goes_on(store, caplog):
    from pipeline.engine.checkpointing import list_checkpoints, read_index

    policy = RetentionPolicy(keep_last_n=1, keep_best_k=0, monitor="val/loss", mode="min")
    faults.arm("checkpoint.retention=raise:EACCES")
    try:
        client, run_id = committed_run([(step, 1.0) for step in (10, 20, 30, 40)], policy)
    finally:
        faults.disarm()
    assert list_checkpoints(client, run_id) == [10, 20, 30, 40]
    assert [int(r["step"]) for r in read_index(client, run_id)] == [10, 20, 30, 40]  # the latest indexed every time
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("step-00000010" in m and "3 time(s) in a row" in m and "permissions" in m for m in errors), errors


def test_malformed_meta_json_is_a_checkpoint_error_naming_the_file(tmp_path):
    from pipeline.engine.checkpoint_files import CheckpointError, check_resumable, read_meta

    for text, message in {"[1, 2]": "holds a list, not an object", "\\xff": "not valid JSON"}.items():
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            read_meta(tmp_path)
    for meta, message in [
        ({"step": 3}, "lacks stage, config"),
        ({"stage": "s", "step": "ten", "config": {}}, "malformed"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            check_resumable(meta, tmp_path)


def test_a_nan_or_unreadable_monitored_value_never_ranks_best():
    from pipeline.engine.checkpointing import RetentionPolicy, steps_to_keep

    rows = [
        {"step": "10", "val/loss": "nan"},
        {"step": "20", "val/loss": "0.5"},
        {"step": "30", "val/loss": "ten"},
        {"step": "40", "val/loss": "0.7"},
        {"step": "50", "val/loss": ""},
    ]
    assert steps_to_keep(rows, RetentionPolicy(1, 2, "val/loss", "min"), latest=50) == {20, 40, 50}
    assert steps_to_keep(rows, RetentionPolicy(0, 1, "val/loss", "max"), latest=50) == {40, 50}


def test_index_csv_has_a_fixed_column_order_and_times_the_table_view_shows(store):
    from helpers import artifact_dir
    from mlflow import MlflowClient

    from pipeline.engine.checkpointing import CheckpointStore

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("index")).info.run_id
    checkpoints = CheckpointStore(client, run_id, Path(".checkpoints"), RetentionPolicy(3, 1, "val/loss", "min"))
    rows = [
        {
            "val/mel": 0.4,
            "name": "step-00000001",
            "created": "2026-11-27T12:08:19+00:00",
            "step": 1,
            "dataset": "demo",
            "model": "m",
            "epoch": 0.5,
            "val/loss": 0.3,
        },
        {
            "step": 2,
            "name": "step-00000002",
            "val/loss": 0.2,
            "model": "m",
            "epoch": 1.0,
            "dataset": "demo",
            "created": "2026-11-27T12:09:00+00:00",
            "val/mel": 0.3,
        },
    ]
    for row in rows:
        checkpoints.save(row["step"], {"w": torch.zeros(2)}, {"format_version": 1, "step": row["step"]}, row)
    checkpoints.close()
    text = (artifact_dir(client, run_id) / "checkpoints" / "index.csv").read_text().splitlines()
    assert text[0] == "name,step,epoch,created,size,model,dataset,val/loss,val/mel"
    assert text[1].split(",")[3] == "2026-11-27 12:08:19 UTC" and text[2].split(",")[3] == "2026-11-27 12:09:00 UTC"
