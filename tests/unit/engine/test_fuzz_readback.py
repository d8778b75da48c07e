"""Everything a job reads back, damaged (docs/reliability.md): truncated, empty, bit-flipped, junk and
wrong-typed versions of state.pt, meta.json, index.csv, the attempt records, the run's tags, a shard
set's manifest and members, and audio files. A resume falls back to the newest verified checkpoint or
refuses with a message naming the file; never a raw traceback, an unverified load or a deletion."""

import io
import json
import logging
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import HISTORY, POLICY, TINY, artifact_dir, committed_run, private_store, resume_and_commit, stage_runs
from mlflow import MlflowClient

from pipeline.engine.checkpointing import read_index
from pipeline.engine.cli import EXIT_OK
from pipeline.engine.resume import ResumeError
from pipeline.engine.session import plan_job, run_stage
from pipeline.stages.train_adapter import TrainAdapter


def damaged(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "empty":
        return b""
    if how == "bit-flipped":  # the high bit of one byte: the sha256 no longer matches, text no longer decodes
        out = bytearray(data)
        out[len(out) // 3] ^= 0x80
        return bytes(out)
    assert how == "junk"
    return bytes(range(256)) * 8


DAMAGE = ["truncated", "empty", "bit-flipped", "junk"]


def damaged_wav(data: bytes, how: str) -> bytes:
    """As ``damaged``, but a bit flip in the header's format tag: a flipped sample is still audio."""
    if how != "bit-flipped":
        return damaged(data, how)
    out = bytearray(data)
    out[20] ^= 0x80
    return bytes(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One train_adapter run with checkpoints at steps 2 and 4; tests damage a file and put it back."""
    with private_store(tmp_path_factory.mktemp("trained")):
        assert (
            run_stage(
                TrainAdapter, [*TINY, "trainer.max_steps=4", "checkpoint.save_interval=2", "validation.interval=2"]
            )
            == EXIT_OK
        )
        client = MlflowClient()
        run_id = stage_runs(client)[0].info.run_id
        yield client, run_id, artifact_dir(client, run_id) / "checkpoints"


def plan_resume(client, run_id):
    return plan_job(TrainAdapter, [f"resume_run={run_id}", "trainer.max_steps=6"], client)


def plan_with(trained, caplog, path: Path, data: bytes):
    """The resume's plan while ``path`` holds ``data`` (put back afterwards), and the errors it logged."""
    client, run_id, _ = trained
    original = rewrite(path, data)
    try:
        with caplog.at_level(logging.WARNING):
            plan = plan_resume(client, run_id)
    finally:
        path.write_bytes(original)
    return plan, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def rewrite(path: Path, data: bytes):
    original = path.read_bytes()
    path.write_bytes(data)
    return original


# --- the checkpoint a resume loads --------------------------------------------------------------


@pytest.mark.parametrize("name", ["state.pt", "meta.json"])
@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_verified_one(trained, caplog, name, how):
    path = trained[2] / "step-00000004" / name
    plan, errors = plan_with(trained, caplog, path, damaged(path.read_bytes(), how))
    assert plan.resume.step == 2
    assert any("step-00000004" in m and name in m for m in errors), errors
    assert "Resuming from older checkpoint step-00000002" in caplog.text


WRONG_META = {
    "a JSON list": lambda meta: [meta],
    "step as text": lambda meta: {**meta, "step": "ten"},
    "config as a list": lambda meta: {**meta, "config": []},
    "no config": lambda meta: {k: v for k, v in meta.items() if k != "config"},
    "sha256 as a number": lambda meta: {**meta, "sha256": 1234},
    "format version as text": lambda meta: {**meta, "format_version": "1"},
    "another stage": lambda meta: {**meta, "stage": "train_asr"},
    "another step": lambda meta: {**meta, "step": 3},
}


@pytest.mark.parametrize("how", WRONG_META)
def test_a_wrong_typed_meta_json_falls_back_to_the_previous_verified_one(trained, caplog, how):
    path = trained[2] / "step-00000004" / "meta.json"
    plan, errors = plan_with(trained, caplog, path, json.dumps(WRONG_META[how](json.loads(path.read_text()))).encode())
    assert plan.resume.step == 2
    assert any("step-00000004" in m for m in errors), errors


def test_a_state_pt_that_matches_its_sha256_but_not_the_engine_is_refused_before_anything_is_written(trained):
    import hashlib

    import torch

    client, run_id, checkpoints = trained
    folder = checkpoints / "step-00000004"
    state_path, meta_path = folder / "state.pt", folder / "meta.json"
    buffer = io.BytesIO()
    torch.save({"step": 4, "weights": torch.zeros(3)}, buffer)  # a tensor file, but not the engine's state
    meta = json.loads(meta_path.read_text())
    originals = (
        rewrite(state_path, buffer.getvalue()),
        rewrite(
            meta_path,
            json.dumps(
                {**meta, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "size": len(buffer.getvalue())}
            ).encode(),
        ),
    )
    try:
        plan = plan_resume(client, run_id)
    finally:
        state_path.write_bytes(originals[0])
        meta_path.write_bytes(originals[1])
    assert plan.resume.step == 2


def test_every_checkpoint_damaged_is_refused_with_each_file_named(trained):
    client, run_id, checkpoints = trained
    paths = [checkpoints / f"step-0000000{step}" / "state.pt" for step in (2, 4)]
    originals = [rewrite(p, damaged(p.read_bytes(), "truncated")) for p in paths]
    try:
        with pytest.raises(ResumeError) as info:
            plan_resume(client, run_id)
    finally:
        for path, data in zip(paths, originals):
            path.write_bytes(data)
    message = str(info.value)
    assert f"No usable checkpoint in run {run_id}" in message
    assert "step-00000004" in message and "step-00000002" in message and "state.pt" in message


# --- index.csv: what retention reads ------------------------------------------------------------

WRONG_INDEX = {
    **{how: partial(damaged, how=how) for how in DAMAGE},
    "header only": lambda data: data.splitlines(keepends=True)[0],
    "a row without its last fields": lambda data: data.rstrip(b"\r\n").rsplit(b",", 2)[0] + b"\r\n",
    "step as text": lambda data: data.replace(b",25,", b",ten,", 1),
    "UTF-16": lambda data: data.decode().encode("utf-16"),
}


@pytest.mark.parametrize("how", WRONG_INDEX)
def test_a_damaged_index_never_makes_retention_delete_what_it_keeps(store, caplog, how):
    client, run_id = committed_run(HISTORY, POLICY)  # stored: 20 (best) and 25
    index = artifact_dir(client, run_id) / "checkpoints" / "index.csv"
    original = index.read_bytes()
    index.write_bytes(WRONG_INDEX[how](original))
    assert index.read_bytes() != original
    with caplog.at_level(logging.WARNING):
        rows = read_index(client, run_id)
    assert sorted(int(r["step"]) for r in rows) == [20, 25]
    assert "rebuilding it from the checkpoints' meta.json" in caplog.text
    assert resume_and_commit(client, run_id, POLICY, 30) == [20, 25, 30]  # last 1 + best 2


# --- the run's records and tags a resume reads ----------------------------------------------------

ATTEMPT_DAMAGE = {
    **{how: partial(damaged, how=how) for how in DAMAGE},
    "a YAML list": lambda data: b"- 1\n- 2\n",
    "attempt as text": lambda data: b"attempt: first\n",
}
TAG_DAMAGE = {
    "resume.count": "two",
    "lease.heartbeat": "yesterday",
    "lease.pid": "-",
    "lease.process_start": "?",
    "checkpoint.latest": "checkpoints/step-banana",
}


def test_damaged_attempt_records_and_tags_are_skipped_with_a_warning_and_the_resume_goes_on(store, capfd):
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", "validation.interval=0"]) == EXIT_OK
    client = MlflowClient()
    run_id = stage_runs(client)[0].info.run_id
    record = artifact_dir(client, run_id) / "config" / "attempt-1.yaml"
    for step, how in enumerate(ATTEMPT_DAMAGE, start=3):
        original = rewrite(record, ATTEMPT_DAMAGE[how](record.read_bytes()))
        assert run_stage(TrainAdapter, [f"resume_run={run_id}", f"trainer.max_steps={step}"]) == EXIT_OK, how
        record.write_bytes(original)
        err = capfd.readouterr().err
        assert "Traceback" not in err, how
        # (the first half of a record may still be a readable record)
        assert how == "truncated" or "config/attempt-1.yaml is unreadable" in err, how
    for tag_step, (key, value) in enumerate(TAG_DAMAGE.items(), start=step + 1):
        client.set_tag(run_id, key, value)
        assert run_stage(TrainAdapter, [f"resume_run={run_id}", f"trainer.max_steps={tag_step}"]) == EXIT_OK, key
        assert "Traceback" not in capfd.readouterr().err, key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint.latest_step"] == str(tag_step)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, tag_step + 1))


# --- prepared data and audio ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    from pipeline.prepare_data import run_prepare

    with private_store(tmp_path_factory.mktemp("shards")) as root:
        assert (
            run_prepare([f"output={root}/shards", "variants=1", "shard_size=10", "data.val_size=4", "examples=0"])
            == EXIT_OK
        )
    return root / "shards"


WRONG_MANIFEST = {
    **{how: partial(damaged, how=how) for how in DAMAGE},
    "a JSON list": lambda data: b"[]",
    "no splits": lambda data: json.dumps({k: v for k, v in json.loads(data).items() if k != "splits"}).encode(),
}


@pytest.mark.parametrize("how", WRONG_MANIFEST)
def test_a_damaged_shard_manifest_is_refused_naming_it(shard_set, how):
    from pipeline.data.shards import MANIFEST, ShardError, StreamingPairs, read_manifest

    path = shard_set / MANIFEST
    original = rewrite(path, WRONG_MANIFEST[how](path.read_bytes()))
    try:
        with pytest.raises(ShardError, match=MANIFEST):
            StreamingPairs(str(shard_set), read_manifest(str(shard_set)), 8000, seed=1)
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("member", ["clean.wav", "noisy.wav", "json"])
@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_shard_member_is_refused_naming_the_sample(shard_set, tmp_path, member, how):
    """The member is damaged inside a well-formed tar whose sha256 is in the manifest (as if the
    writer itself had been wrong): the sample is named, nothing is fed to training."""
    import hashlib

    from pipeline.data.shards import ShardError, ShardStore, read_manifest, read_shard

    source = shard_set / "train-000000.tar"
    out = io.BytesIO()
    with tarfile.open(source) as tar, tarfile.open(fileobj=out, mode="w") as new:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name.endswith(f".{member}") and info.name.startswith("DEMO-0001__v0"):
                data = (damaged_wav if member.endswith(".wav") else damaged)(data, how)
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))
    (tmp_path / "train-000000.tar").write_bytes(out.getvalue())
    entry = dict(read_manifest(str(shard_set))["splits"]["train"]["shards"][0])
    entry["sha256"] = hashlib.sha256(out.getvalue()).hexdigest()
    with pytest.raises(ShardError, match="sample DEMO-0001__v0 is incomplete or unreadable"):
        read_shard(ShardStore(str(tmp_path)), entry)


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_audio_file_is_refused_naming_it(tmp_path, how):
    from pipeline.data.audio import AudioError, load_audio

    path = tmp_path / "speech.wav"
    sf.write(path, 0.5 * np.sin(np.arange(3200) / 8.0), 16000)
    path.write_bytes(damaged_wav(path.read_bytes(), how))
    if how == "truncated":  # the header promises more samples than are there: what is there loads
        assert 0 < load_audio(path, 16000).numel() < 3200
        return
    with pytest.raises(AudioError) as info:
        load_audio(path, 16000)
    assert str(path) in str(info.value)
