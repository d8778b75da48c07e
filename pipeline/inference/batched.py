"""Batched restoration: the chunks of many waves through the chain together, with the result of restoring
each wave on its own (``RestorationChain.restore_mono``), for corpus cleaning.

Every wave is planned as ``restore_mono`` plans it (``RestorationChain.plan_chunks``). All chunk windows of
all waves are sorted by length, so that each batch pads little, run ``max_batch`` at a time, zero-padded
with the padding masked (``encoder_features`` and ``Generator`` take ``lengths``), and assembled per wave
as ``restore_mono`` assembles them (``assemble``). What cannot be masked runs on equal-length windows only,
unpadded: a ``group_norm`` encoder front end, WavLM layers, a Conformer prenet in the generator.

A batched run differs from one-by-one runs only by the order of floating-point sums (other matrix shapes,
the attention mask): within ``BATCH_TOLERANCE`` in float32. Every wave's input and output, and the output of
all its chunks, are held in memory: give a corpus in groups of files.
"""

from __future__ import annotations

import logging

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline.inference.chain import Chunk, RestorationChain, assemble
from pipeline.models.encoder import by_length, window

log = logging.getLogger(__name__)

# The largest difference of a sample (in [-1, 1]) between restore_many and restore_mono in float32 on the
# CPU; tests/unit/inference/test_batched_restore.py measures about 1e-6 on randomised tiny chains.
BATCH_TOLERANCE = 1e-4


def restore_many(chain: RestorationChain, waves: list[torch.Tensor], max_batch: int = 8) -> list[torch.Tensor]:
    """Mono waves at ``chain.rate_in`` -> their restorations at ``chain.rate_out``, each equal to
    ``chain.restore_mono(wave)`` within ``BATCH_TOLERANCE``, with up to ``max_batch`` chunk windows (of any
    waves) per run of the chain."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    plans = [chain.plan_chunks(wave.numel()) for wave in waves]
    jobs = sorted(
        ((i, j) for i, plan in enumerate(plans) for j in range(len(plan))), key=lambda job: plans[job[0]][job[1]].length
    )
    pieces: list[list[torch.Tensor | None]] = [[None] * len(plan) for plan in plans]
    batches = range(0, len(jobs), max_batch)
    log.debug("Restoring %d waves: %d chunks in %d batches", len(waves), len(jobs), len(batches))
    with torch.inference_mode():
        for first in batches:
            batch = jobs[first : first + max_batch]
            chunks = [plans[i][j] for i, j in batch]
            windows = [window(waves[i].float(), chunk.start, chunk.length) for (i, _), chunk in zip(batch, chunks)]
            for (i, j), piece in zip(batch, run_windows(chain, windows, chunks)):
                pieces[i][j] = piece
    return [
        assemble(wave_pieces, plan, chain.output_length(wave.numel()))
        for wave_pieces, plan, wave in zip(pieces, plans, waves)
    ]


def run_windows(chain: RestorationChain, windows: list[torch.Tensor], chunks: list[Chunk]) -> list[torch.Tensor]:
    """The chain's output for each of ``chunks``' input ``windows`` (any lengths) in one padded batch: what
    ``RestorationChain._piece`` gives for each on its own, within ``BATCH_TOLERANCE``."""
    device = chain.device
    lengths = torch.tensor([w.numel() for w in windows], device=device)
    frames = torch.tensor([chunk.frames for chunk in chunks], device=device)
    with chain.precision.autocast():
        features = chain.features(pad_sequence(windows, batch_first=True).to(device), lengths)
        if bool((frames == features.shape[1]).all()):  # nothing padded: no masks (they cost 8-15 % on CPU)
            out = chain.generator(features)
        elif chain.generator.masks_padding:
            out = chain.generator(features, frames)
        else:
            # torchaudio's Conformer convolution module is not masked: padded frames would reach the valid
            # ones. Windows of equal frame counts share a generator run, unpadded (exact).
            out, _ = by_length(chain.generator, features, frames)
    return [o[: chunk.frames * chain.hop_out].float().cpu() for o, chunk in zip(out, chunks)]
