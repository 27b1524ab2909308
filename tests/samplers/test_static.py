"""The static-cache sampler: prompt widths snap to few buckets, and the decode step compiles once
per (batch, bucket) instead of at every new prompt width. Transformers compiles only on
accelerators; here a counting backend forces the compile on CPU (``CompileConfig``'s
``_compile_all_devices``), so the count is what a GPU run would compile."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from fastppo.rollout import GenerateSampler, SamplingSettings, left_pad
from fastppo.samplers.static import StaticCacheSampler, bucket_width, pad_left

from .conftest import EOS, PAD


@pytest.mark.parametrize(
    ("width", "cap", "bucket"),
    [
        (1, None, 16),
        (16, None, 16),
        (17, None, 32),
        (100, None, 128),
        (40, 48, 48),
        (20, 24, 24),
        (100, 64, 128),
    ],
)
def test_bucket_widths(width, cap, bucket):
    """Powers of two from 16, capped at max_prompt_length when the prompts fit in it (a wider
    prompt was not truncated, so it keeps its power of two)."""
    assert bucket_width(width, cap) == bucket


def test_pad_left_adds_padding_in_front():
    ids, mask = left_pad([[5, 6], [7]], PAD)
    padded, padded_mask = pad_left(ids, mask, 4, PAD)
    assert padded.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]]
    assert padded_mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def counting_compile() -> tuple[CompileConfig, list]:
    """A CompileConfig whose backend counts the graphs it is given (and runs them eagerly)."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    config = CompileConfig(backend=backend, mode=None, dynamic=False)
    config._compile_all_devices = True  # transformers' switch for compiling on CPU
    return config, graphs


def rollouts(sampler, widths, settings) -> list[torch.Tensor]:
    out = []
    for width in widths:
        prompts = [[3 + (i + j) % 9 for j in range(width - i)] for i in range(2)]  # ragged rows
        out.append(sampler.generate(*left_pad(prompts, PAD), 2, settings))
    return out


@pytest.mark.slow  # compiles (dynamo, an eager backend)
def test_decode_compiles_once_per_bucket_while_a_plain_static_cache_recompiles(peaked_model):
    """Prompt widths 3..12 share bucket 16: one graph; width 20 opens bucket 32 (a second), and a
    later narrow batch reuses it. generate with a static cache of each call's own length (the
    control) compiles again as the widths change: the count does see recompiles."""
    settings = SamplingSettings(max_new_tokens=4, temperature=0.8)
    torch._dynamo.reset()
    config, graphs = counting_compile()
    sampler = StaticCacheSampler(peaked_model(), PAD, [EOS], compile_config=config)
    rollouts(sampler, [3, 5, 9, 12], settings)
    assert len(graphs) == 1
    rollouts(sampler, [20, 4], settings)
    assert len(graphs) == 2

    torch._dynamo.reset()
    config, graphs = counting_compile()
    control = GenerateSampler(peaked_model(), PAD, [EOS])
    static = SamplingSettings(max_new_tokens=4, temperature=0.8, cache_implementation="static")
    for width in (3, 5, 9, 12):
        prompts = [[3 + j % 9 for j in range(width)]] * 2
        control.run(*left_pad(prompts, PAD), control.generation_config(2, static, compile_config=config))
    assert len(graphs) >= 3  # dynamic=False: a new graph for each new cache length
    torch._dynamo.reset()


def test_compiled_decode_samples_what_the_eager_one_does(peaked_model):
    """Same seed, same draws: the compiled decode (and the padding to a bucket) changes no token."""
    settings = SamplingSettings(max_new_tokens=6, temperature=0.8)
    torch._dynamo.reset()
    config, _ = counting_compile()
    model = peaked_model()
    torch.manual_seed(1)
    compiled = rollouts(StaticCacheSampler(model, PAD, [EOS], compile_config=config), [3, 7], settings)
    torch.manual_seed(1)
    eager = rollouts(GenerateSampler(model, PAD, [EOS]), [3, 7], settings)
    torch._dynamo.reset()
    assert [c.tolist() for c in compiled] == [e.tolist() for e in eager]
