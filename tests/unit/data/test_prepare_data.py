"""prepare_data: shards on disk and on S3 (moto over HTTP), determinism, manifests, the streaming reader."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import PREPARE_SMALL, all_runs
from mlflow import MlflowClient
from torch.utils.data import default_collate

from pipeline.data.shards import MANIFEST, ShardError, ShardPairs, StreamingPairs, read_manifest
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.prepare_data import run_prepare


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_prepare_writes_shards_a_manifest_and_an_mlflow_run(shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    train = manifest["splits"]["train"]
    assert train["samples"] == 32 * 2 and manifest["splits"]["val"]["samples"] == 4
    assert [s["name"] for s in train["shards"]] == [f"train-{i:06d}.tar" for i in range(7)]
    assert sum(s["samples"] for s in train["shards"]) == 64 and train["shards"][-1]["samples"] == 4
    first = members(shards / "train-000000.tar")
    assert sorted(first)[:3] == ["DEMO-0001__v0.clean.wav", "DEMO-0001__v0.json", "DEMO-0001__v0.noisy.wav"]
    meta = json.loads(first["DEMO-0001__v0.json"])
    assert meta["utterance"] == "DEMO-0001" and meta["sample_rate"] == 16000 and "degradation" in meta
    assert first["DEMO-0001__v0.clean.wav"] == first["DEMO-0001__v1.clean.wav"]
    assert first["DEMO-0001__v0.noisy.wav"] != first["DEMO-0001__v1.noisy.wav"]
    client = MlflowClient()
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "prepare_data"
    assert run.data.metrics["samples/train"] == 64 and run.data.metrics["hours"] > 0
    assert run.data.metrics["skipped"] == 0
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "demo-shards"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "samples")
    }
    assert {"manifest.json", "samples/index.html"} <= arts


def test_same_seed_same_bytes_other_seed_other_degradations(store, shards):
    assert run_prepare([f"output={store}/again", *PREPARE_SMALL]) == EXIT_OK
    assert run_prepare([f"output={store}/other", *PREPARE_SMALL, "seed=99"]) == EXIT_OK
    for shard in ("train-000000.tar", "train-000006.tar", "val-000000.tar"):
        assert (shards / shard).read_bytes() == (store / "again" / shard).read_bytes()
    same, other = members(shards / "train-000000.tar"), members(store / "other" / "train-000000.tar")
    assert same["DEMO-0001__v0.clean.wav"] == other["DEMO-0001__v0.clean.wav"]
    assert same["DEMO-0001__v0.noisy.wav"] != other["DEMO-0001__v0.noisy.wav"]


def test_s3_and_local_manifests_agree(store, s3, shards):
    assert run_prepare(["output=s3://test-bucket/demo/shards", *PREPARE_SMALL]) == EXIT_OK
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="test-bucket", Prefix="demo/shards/")["Contents"])
    assert "demo/shards/manifest.json" in keys and "demo/shards/train-000000.tar" in keys
    remote, local = read_manifest("s3://test-bucket/demo/shards"), read_manifest(str(shards))
    assert remote["splits"] == local["splits"] and remote["samples"] == local["samples"]
    body = s3.get_object(Bucket="test-bucket", Key="demo/shards/train-000003.tar")["Body"].read()
    assert body == (shards / "train-000003.tar").read_bytes()
    # and the reader streams from S3 exactly what it streams from disk
    a = ShardPairs("s3://test-bucket/demo/shards", remote, "val", 8000)
    b = ShardPairs(str(shards), local, "val", 8000)
    assert all(torch.equal(a[i]["noisy"], b[i]["noisy"]) for i in range(len(a)))


def _batches(data: StreamingPairs, epoch: int, start: int, workers: int) -> list[torch.Tensor]:
    return [b["index"] for b in data.loader(epoch, start, 4, workers, default_collate)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_epochs_resume_exactly_mid_epoch(shards, workers):
    data = StreamingPairs(str(shards), read_manifest(str(shards)), segment_samples=8000, seed=5)
    full = _batches(data, epoch=1, start=0, workers=workers)
    assert len(full) == data.num_batches(4, workers)
    seen = torch.cat(full).tolist()
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    for start in (1, 3, len(full) - 1):
        resumed = _batches(data, epoch=1, start=start, workers=workers)
        assert [t.tolist() for t in resumed] == [t.tolist() for t in full[start:]]
    other_epoch = _batches(data, epoch=2, start=0, workers=workers)
    assert [t.tolist() for t in other_epoch] != [t.tolist() for t in full]
    # the content is the same whatever the position: crops are seeded per (seed, epoch, sample)
    again = next(iter(data.loader(1, 2, 4, workers, default_collate)))
    first = list(data.loader(1, 0, 4, workers, default_collate))[2]
    assert torch.equal(again["noisy"], first["noisy"])


@pytest.mark.parametrize("workers", [0, 1])
def test_two_ranks_read_together_what_one_process_with_all_their_workers_reads(shards, workers):
    """Under torchrun each rank plays every world-th of the workers x world logical workers: step k of the
    two ranks is batches 2k and 2k+1 of one process streaming with two workers, from any position."""
    data = StreamingPairs(str(shards), read_manifest(str(shards)), segment_samples=8000, seed=5)
    single = [t.tolist() for t in _batches(data, epoch=1, start=0, workers=2)]
    assert data.num_batches(4, workers, world=2) == len(single) // 2
    for start in (0, 1, 3):
        ranks = [
            [b["index"].tolist() for b in data.loader(1, start, 4, workers, default_collate, rank=r, world=2)]
            for r in (0, 1)
        ]
        assert [a + b for a, b in zip(*ranks)] == [
            single[2 * k] + single[2 * k + 1] for k in range(start, len(single) // 2)
        ]


def test_corrupted_or_missing_shards_are_named(shards):
    manifest = read_manifest(str(shards))
    path = shards / "train-000002.tar"
    original = path.read_bytes()
    data = bytearray(original)
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    stream = StreamingPairs(str(shards), manifest, 8000, seed=1)
    with pytest.raises(ShardError, match="train-000002.tar is corrupted"):
        list(stream.worker_batches(0, 0, 0, 10**6, 4, 1, default_collate))
    path.write_bytes(original)
    (shards / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(stream.worker_batches(0, 0, 0, 10**6, 4, 1, default_collate))
    with pytest.raises(ShardError, match="no usable manifest.json"):
        read_manifest(str(shards / "nowhere"))


def test_bad_input_is_refused_before_a_run_exists(store, capfd):
    assert run_prepare(["output=ftp://host/x"]) == EXIT_BAD_INPUT
    assert "unsupported shard location" in capfd.readouterr().err
    assert run_prepare([f"output={store}/s", "data.root=/no/such/corpus"]) == EXIT_BAD_INPUT
    assert "/no/such/corpus" in capfd.readouterr().err
    assert all_runs(MlflowClient()) == []


def _train(*args: str) -> int:
    from helpers import TINY

    from pipeline.engine.session import run_stage
    from pipeline.stages.train_adapter import TrainAdapter

    return run_stage(TrainAdapter, [*TINY, "data=shards", "data.segment_seconds=0.5", *args])


def test_train_adapter_trains_from_local_and_s3_shards_and_logs_the_dataset(store, s3, shards):
    assert run_prepare(["output=s3://test-bucket/demo", *PREPARE_SMALL]) == EXIT_OK
    for root in (str(shards), "s3://test-bucket/demo"):
        assert (
            _train(f"data.root={root}", "trainer.max_steps=4", "validation.interval=2", "checkpoint.save_interval=4")
            == EXIT_OK
        )
    client = MlflowClient()
    prepared = [r for r in all_runs(client) if r.data.tags.get("stage") == "prepare_data"]
    trained = [r for r in all_runs(client) if r.data.tags.get("stage") == "train_adapter"]
    assert len(prepared) == 2 and len(trained) == 2
    digests = {r.inputs.dataset_inputs[0].dataset.digest for r in prepared}
    assert len(digests) == 1  # local and S3 shards are the same data
    for run in trained:
        assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "demo"
        (dataset_input,) = run.inputs.dataset_inputs
        assert dataset_input.dataset.digest in digests
        assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [2, 4]


def test_changing_the_number_of_workers_mid_epoch_on_resume_is_warned_about(store, shards, capfd):
    from helpers import stage_runs

    args = ["data.root=" + str(shards), "data.num_workers=2", "validation.interval=100", "checkpoint.save_interval=3"]
    assert _train(*args, "trainer.max_steps=3") == EXIT_OK  # stops mid-epoch (12 batches per epoch)
    (run,) = stage_runs(MlflowClient())
    capfd.readouterr()
    assert _train(*args, f"resume_run={run.info.run_id}", "trainer.max_steps=4", "data.num_workers=0") == EXIT_OK
    assert "data.num_workers changed from 2 to 0 in the middle of epoch 0" in capfd.readouterr().err
    assert _train(*args, f"resume_run={run.info.run_id}", "trainer.max_steps=5", "data.num_workers=0") == EXIT_OK
    assert "data.num_workers changed" not in capfd.readouterr().err  # the new number is now the saved one
