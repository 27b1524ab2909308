"""What only a GPU shows: the static sampler's decode compiled for real (inductor, CUDA graphs)
once per bucket and picking the eager tokens, and continuous batching decoding a bf16 copy of an
fp32 policy that follows it when synced. Run with ``pytest -m gpu`` (``benchmarks/gpu_session.sh``'s
tests stage); skipped on CPU."""

from __future__ import annotations

import pytest
import torch

from fastppo.rollout import GenerateSampler, SamplingSettings, left_pad
from fastppo.samplers import ContinuousBatchingSampler, StaticCacheSampler

from .conftest import EOS, PAD

PROMPTS = {width: [[3 + (i + j) % 9 for j in range(width - i)] for i in range(2)] for width in (3, 5, 9, 12)}


@pytest.mark.gpu
def test_static_sampler_compiles_once_on_cuda_and_decodes_the_eager_tokens(peaked_model):
    from torch._dynamo.utils import counters

    model = peaked_model().float().cuda()
    greedy = SamplingSettings(max_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    sampler = StaticCacheSampler(model, PAD, [EOS])  # transformers' compile: inductor, CUDA graphs
    compiled = [sampler.generate(*(t.cuda() for t in left_pad(p, PAD)), 1, greedy) for p in PROMPTS.values()]
    assert counters["stats"]["unique_graphs"] - before == 1  # one bucket (16): one graph
    eager = GenerateSampler(model, PAD, [EOS])
    for prompts, got in zip(PROMPTS.values(), compiled, strict=True):
        assert got.tolist() == eager.generate(*(t.cuda() for t in left_pad(prompts, PAD)), 1, greedy).tolist()
    torch._dynamo.reset()


@pytest.mark.gpu
def test_continuous_batching_decodes_a_bf16_copy_that_follows_the_policy(peaked_model):
    policy = peaked_model().float().cuda()
    sampler = ContinuousBatchingSampler(policy, PAD, [EOS], dtype=torch.bfloat16)
    assert sampler.weights.model.dtype == torch.bfloat16 and sampler.weights.model is not policy
    ids, mask = (t.cuda() for t in left_pad(PROMPTS[5], PAD))
    settings = SamplingSettings(max_new_tokens=6, temperature=0.9)
    sampled = sampler.generate(ids, mask, 4, settings)
    assert sampled.ids.shape[0] == 8 and sampled.untruncated and sampled.logprobs.is_cuda
    with torch.no_grad():
        policy.lm_head.weight.mul_(0.5)  # an "optimizer step"
    sampler.sync_weights()
    torch.testing.assert_close(
        sampler.weights.model.lm_head.weight, policy.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0
    )
