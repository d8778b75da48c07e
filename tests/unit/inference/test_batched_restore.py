"""restore_many: chunks of many waves batched through the chain equal restore_mono wave by wave."""

from __future__ import annotations

import functools

import pytest
import torch

from pipeline.config import compose_config
from pipeline.inference.batched import BATCH_TOLERANCE, restore_many
from pipeline.inference.chain import RestorationChain, assemble
from pipeline.models.hifigan import Generator

CHUNKS = dict(chunk_seconds=0.2, context_seconds=0.1, fade_seconds=0.04)  # 10 frames, 5 of context, fade 2
CONFORMER = [
    "vocoder.conformer_layers=1",
    "vocoder.conformer_dim=32",
    "vocoder.conformer_heads=2",
    "vocoder.conformer_ffn_dim=64",
    "vocoder.conformer_kernel=5",
]
CASES = {
    "group_norm": ((), (), CHUNKS),
    "layer_norm": (("ssl.extractor_mode=layer_norm",), (), CHUNKS),
    "conformer_prenet": ((), CONFORMER, CHUNKS),
    "whole_files": ((), (), dict(chunk_seconds=0)),
    "logmel_vocos": (
        ("ssl=logmel", "adapter.cleaner_blocks=2", "adapter.cleaner_dim=32"),
        ("vocoder=vocos_tiny",),
        CHUNKS,
    ),
}


@functools.cache
def configs(ssl: tuple[str, ...], vocoder: tuple[str, ...]):
    """(ssl, adapter, vocoder) configs: the tiny presets unless ``ssl`` and ``vocoder`` name others."""
    presets = [] if any(o.startswith("ssl=") for o in ssl) else ["ssl=tiny"]
    stage = compose_config("train_adapter", [*presets, *ssl])
    vocoder_presets = [] if any(o.startswith("vocoder=") for o in vocoder) else ["vocoder=tiny"]
    ssl_preset = [o for o in [*presets, *ssl] if o.startswith("ssl=")]
    return (
        stage.ssl,
        stage.adapter,
        compose_config("pretrain_vocoder", [*ssl_preset, *vocoder_presets, *vocoder]).vocoder,
    )


def randomised_chain(ssl=(), vocoder=(), **chunking) -> RestorationChain:
    """A tiny chain with every parameter drawn anew (the default inits start adapters near zero, weight norms at
    their weights' norms), scaled so the output depends on the input and tanh does not saturate."""
    chain = RestorationChain(*configs(tuple(ssl), tuple(vocoder)), **chunking)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in [*chain.adapted.named_parameters(), *chain.generator.named_parameters()]:
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("original0"):  # weight_norm's magnitude
                p.copy_(1.0 + 0.3 * noise)
            elif p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # LayerNorm, GroupNorm, BatchNorm scales
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)
        for name, b in chain.generator.named_buffers():  # the Conformer's BatchNorm statistics
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return chain


@pytest.fixture(scope="module")
def waves() -> list[torch.Tensor]:
    """Shorter than a chunk, one hop (320), a last chunk joining the one before, several chunks, a length that
    is not a multiple of the hop."""
    gen = torch.Generator().manual_seed(1)
    return [0.3 * torch.randn(n, generator=gen) for n in (100, 320, 3205, 4800, 8077, 16000)]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_restore_many_equals_restore_mono_per_wave(case, waves):
    ssl, vocoder, chunking = CASES[case]
    chain = randomised_chain(ssl, vocoder, **chunking)
    one_by_one = [chain.restore_mono(w) for w in waves]
    batched = restore_many(chain, waves, max_batch=4)
    assert [r.numel() for r in batched] == [chain.output_length(w.numel()) for w in waves]
    assert max_difference(batched, one_by_one) < BATCH_TOLERANCE
    assert min(float(r.std()) for r in one_by_one[2:]) > 0.03 and max(float(r.abs().max()) for r in one_by_one) < 0.99
    if chunking["chunk_seconds"]:
        assert [len(chain.plan_chunks(w.numel())) for w in waves] == [1, 1, 1, 2, 3, 5]
    assert (
        max_difference(restore_many(chain, waves, max_batch=1), restore_many(chain, waves, max_batch=64))
        < BATCH_TOLERANCE
    )


def test_the_plan_overlap_adds_to_one_everywhere():
    chain = RestorationChain(*configs((), ()), **CHUNKS)
    for samples in (0, 1, 320, 3205, 8077, 16000):
        plan = chain.plan_chunks(samples)
        ones = assemble([torch.ones(c.frames * chain.hop_out) for c in plan], plan, chain.output_length(samples))
        assert torch.allclose(ones, torch.ones(chain.output_length(samples)), atol=1e-6)
        assert plan[0].start == -chain.context[0] and plan[0].fade_in == plan[-1].fade_out == 0


def test_a_conformer_prenet_refuses_a_padded_batch():
    generator = Generator(64, configs((), tuple(CONFORMER))[2]).eval()
    with pytest.raises(ValueError, match="equal length"):
        generator(torch.randn(2, 7, 64), torch.tensor([7, 5]))
