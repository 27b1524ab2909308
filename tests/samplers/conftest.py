"""What the sampler tests share: every sampler by name, built over one model, and a tiny float64
policy whose next-token distribution is far from uniform (so a wrong temperature or truncation
shows in a few thousand samples)."""

from __future__ import annotations

import pytest
import torch

from fastppo.rollout import GenerateSampler
from fastppo.samplers import ContinuousBatchingSampler, StaticCacheSampler

SAMPLERS = ("generate", "continuous_batching", "static")
PAD, EOS = 0, 1


def build_sampler(kind: str, model, pad: int = PAD, eos=(EOS,), **options):
    """The sampler called ``kind`` over ``model`` (its options as keywords)."""
    if kind == "generate":
        return GenerateSampler(model, pad, eos)
    if kind == "continuous_batching":
        return ContinuousBatchingSampler(model, pad, eos, **options)
    if kind == "static":
        return StaticCacheSampler(model, pad, eos, **options)
    raise ValueError(kind)


@pytest.fixture(name="build_sampler", scope="session")
def build_sampler_fixture():
    """``build_sampler(kind, model, pad=0, eos=(1,), **options)``: a sampler of ``SAMPLERS``."""
    return build_sampler


@pytest.fixture(scope="session")
def peaked_model(tiny_model):
    """``peaked_model(vocab=24, scale=10.0, seed=0)``: a float64 Llama of ``TINY_SHAPE`` with an
    untied lm_head scaled by ``scale``: the most likely next token has about 0.3 of the mass
    and the rest spreads over a dozen (a uniform-looking distribution would hide a wrong T)."""

    def build(vocab: int = 24, scale: float = 10.0, seed: int = 0):
        torch.manual_seed(seed)
        model = tiny_model(vocab_size=vocab, tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.generation_config.eos_token_id = EOS
        model.generation_config.pad_token_id = PAD
        return model.double().eval()

    return build
