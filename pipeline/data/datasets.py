"""Datasets addressed by (epoch, index) and a resumable batch order.

A training example is a pure function of (seed, epoch, index): the crop and the degradation are
drawn from a generator seeded by those three numbers. With the batch order also a pure function of
(seed, epoch), the data position is just (epoch, batches done in the epoch), which is all a
checkpoint needs to store for an exact resume, with any number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.common import faults
from pipeline.config import DegradationConfig
from pipeline.data.degrade import OtherUtterances, check_degradation, degrade, sample_rng

TRAIN_STREAM, VAL_STREAM, ORDER_STREAM = 0, 1, 2


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of one epoch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, ORDER_STREAM]))
    return rng.permutation(num_items)


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0):
    """Batches of (epoch, index) keys for one epoch, from ``start_batch`` on (last partial dropped)."""
    order = epoch_order(num_items, seed, epoch)
    num_batches = num_items // batch_size
    return [
        [(epoch, int(i)) for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(start_batch, num_batches)
    ]


class TrainSource(Protocol):
    """What the engine asks of a training set: how many batches an epoch has, and the batches of an
    epoch from a position on. The position (epoch, batches done) is all a checkpoint stores.

    Under torchrun, a step trains one global batch of ``batch_size`` x ``world`` examples: rank ``rank``
    reads its own ``batch_size`` of them, so the ranks together read what one process would, and the
    position (epoch, global batches done) is the same on every rank."""

    order_depends_on_workers: bool  # True when the number of DataLoader workers changes how an epoch is dealt

    def num_batches(self, batch_size: int, workers: int, world: int = 1) -> int: ...

    def loader(
        self,
        epoch: int,
        start_batch: int,
        batch_size: int,
        workers: int,
        collate: Callable[[list[Any]], Any],
        rank: int = 0,
        world: int = 1,
    ) -> Iterable[Any]: ...


class ShuffledBatches:
    """A map-style training set addressed by (epoch, index), dealt each epoch in the order seeded by
    (seed, epoch) (``epoch_batches``); the last partial batch is dropped."""

    order_depends_on_workers = False

    def __init__(self, dataset: Dataset, seed: int, pin_memory: bool = False):
        self.dataset, self.seed, self.pin_memory = dataset, int(seed), pin_memory

    def num_batches(self, batch_size: int, workers: int, world: int = 1) -> int:
        n = len(self.dataset) // (batch_size * world)
        if n == 0:
            per_rank = f" x {world} ranks" if world > 1 else ""
            raise ValueError(
                f"batch_size={batch_size}{per_rank} is larger than the training set ({len(self.dataset)} "
                "examples); lower batch_size"
            )
        return n

    def loader(
        self, epoch: int, start_batch: int, batch_size: int, workers: int, collate, rank: int = 0, world: int = 1
    ) -> DataLoader:
        """The global batches of the epoch from ``start_batch`` on (``batch_size`` x ``world`` examples, in the
        order one process with that batch size reads), this rank's slice of each."""
        batches = epoch_batches(len(self.dataset), batch_size * world, self.seed, epoch, start_batch)
        mine = [batch[rank * batch_size : (rank + 1) * batch_size] for batch in batches]
        return seeded_loader(self.dataset, mine, workers, collate, self.seed + rank, self.pin_memory)


def seeded_loader(dataset: Dataset, batches: list, workers: int, collate, seed: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over fixed batches whose workers draw their base seed from a private generator, not
    from the global torch RNG (which a resume, opening an extra iterator mid-epoch, would shift)."""
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=with_fault_point(collate),
        pin_memory=pin_memory,
        generator=generator,
    )


def with_fault_point(collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """``collate`` behind the ``data.batch`` fault point, which runs where the batch is made (in a
    DataLoader worker when there are workers: tests kill one there)."""
    return partial(_collate_at_fault_point, collate)


def _collate_at_fault_point(collate: Callable[[list[Any]], Any], items: list[Any]) -> Any:
    faults.point("data.batch")
    return collate(items)


def crop_or_pad(wave: torch.Tensor, length: int, start: int) -> torch.Tensor:
    if wave.numel() >= length:
        return wave[start : start + length]
    return torch.nn.functional.pad(wave, (0, length - wave.numel()))


class DegradedPairs(Dataset):
    """(clean, degraded) crops of in-memory utterances, keyed by (epoch, index).

    Training crops start at a seeded random offset; validation crops start at 0 and use a fixed
    degradation per utterance, so validation numbers are comparable across steps and attempts.
    Babble noise mixes the set's other utterances (never the utterance itself).
    """

    def __init__(
        self,
        waves: list[torch.Tensor],
        sample_rate: int,
        segment_samples: int,
        degradation: DegradationConfig,
        seed: int,
        train: bool,
    ):
        self.waves = waves
        self.sample_rate = sample_rate
        self.segment_samples = segment_samples
        self.degradation = degradation
        self.seed = seed
        self.train = train
        check_degradation(degradation)

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not self.train:
            epoch = 0
        rng = sample_rng(self.seed, epoch, index, TRAIN_STREAM if self.train else VAL_STREAM)
        wave = self.waves[index]
        spare = max(wave.numel() - self.segment_samples, 0)
        start = int(rng.integers(spare + 1)) if self.train else 0
        clean = crop_or_pad(wave, self.segment_samples, start)
        noisy, _ = degrade(clean, self.sample_rate, self.degradation, rng, others=OtherUtterances(self.waves, index))
        return {"clean": clean, "noisy": noisy, "index": torch.tensor(index)}


class TranscribedSpeech(Dataset):
    """Whole utterances with their target token ids, read from disk when asked for.

    Keyed by (epoch, index) like every training set; there is no random augmentation, so an item
    depends on its index only.
    """

    def __init__(self, paths: list, targets: list[list[int]], sample_rate: int):
        self.paths = paths
        self.targets = targets
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        from pipeline.data.audio import load_audio

        index = key[1] if isinstance(key, tuple) else key
        return {
            "audio": load_audio(self.paths[index], self.sample_rate),
            "targets": torch.tensor(self.targets[index], dtype=torch.long),
            "index": torch.tensor(index),
        }


def collate_padded(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Variable-length utterances: zero-padded audio and targets plus their true lengths."""

    def pad(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [item[key] for item in items]
        lengths = torch.tensor([len(x) for x in seqs])
        return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), lengths

    audio, audio_lengths = pad("audio")
    targets, target_lengths = pad("targets")
    return {
        "audio": audio,
        "audio_lengths": audio_lengths,
        "targets": targets,
        "target_lengths": target_lengths,
        "index": torch.stack([item["index"] for item in items]),
    }
