"""torchrun's pieces without torchrun: each rank's slice of the batch, the launcher's command line."""

from __future__ import annotations

import subprocess

import pytest
from helpers import PYTHON

from pipeline.data.datasets import ShuffledBatches
from pipeline.launcher import command


def test_each_rank_reads_its_slice_of_the_global_batch_one_process_would_read():
    source = ShuffledBatches(list(range(50)), seed=3)
    keys = lambda batches: [[index for _, index in batch] for batch in batches]  # noqa: E731
    single = keys(source.loader(2, 0, 8, 0, collate=lambda items: items).batch_sampler)
    assert source.num_batches(4, 0, world=2) == source.num_batches(8, 0) == 6
    for start in (0, 4):
        ranks = [keys(source.loader(2, start, 4, 0, collate=list, rank=r, world=2).batch_sampler) for r in (0, 1)]
        assert [a + b for a, b in zip(*ranks)] == single[start:]
        assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))  # disjoint shares
    with pytest.raises(ValueError, match=r"batch_size=30 x 2 ranks is larger than the training set"):
        source.num_batches(30, 0, world=2)


def test_the_launcher_keeps_one_process_plain_and_adds_standalone_only_without_a_rendezvous():
    assert command("train_adapter", 1, "", ["a=1"])[1:] == ["-m", "pipeline.stages.train_adapter", "a=1"]
    two = command("train_asr", 2, "--max-restarts=1", ["a=1"])
    assert two[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "--max-restarts=1",
        "-m",
        "pipeline.stages.train_asr",
        "a=1",
    ]
    nodes = command("train_asr", 4, "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=h:29400", [])
    assert "--standalone" not in nodes and "--rdzv-endpoint=h:29400" in nodes
    bad = subprocess.run(
        [PYTHON, "-m", "pipeline.launcher", "--nproc=0", "train_adapter"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "nproc='0' must be a whole number of processes, 1 or more" in bad.stderr
