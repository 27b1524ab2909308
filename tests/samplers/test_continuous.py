"""The continuous-batching sampler's own rules: TRL's config handling, the logits processors it
refuses (the engine would drop them), a cache sized to the rollout on CPU, engine failures
surfaced, the model left as found, and a copy in another dtype kept in step only by syncing."""

from __future__ import annotations

import pytest
import torch

from fastppo.rollout import SamplingSettings, left_pad
from fastppo.samplers.continuous import (
    ContinuousBatchingSampler,
    cpu_cache_sizes,
    engine_kwargs,
    page_size_key,
)
from fastppo.samplers.weights import SamplingWeights

from .conftest import EOS, PAD

SETTINGS = SamplingSettings(max_new_tokens=4, temperature=0.8)
PAGE = page_size_key()  # "page_size" (transformers >= 5.18) or "block_size"


def test_engine_keywords_follow_trl_and_are_checked_now():
    assert engine_kwargs(None) == {"max_memory_percent": 0.5, "return_logprobs": True}  # TRL's 0.5
    assert engine_kwargs({"max_memory_percent": 0.8, "return_logprobs": False, PAGE: 64}) == {
        "max_memory_percent": 0.8,
        "return_logprobs": False,
        PAGE: 64,
    }
    typo = PAGE.replace("size", "sise")
    with pytest.raises(ValueError, match=rf"'{typo}' \(did you mean '{PAGE}'"):
        engine_kwargs({typo: 64})
    with pytest.raises(ValueError, match="transformers_continuous_batching_config="):
        engine_kwargs({"varlen_compile_config": {"not_an_option": 1}})


@pytest.mark.parametrize(
    ("settings", "dropped"),
    [
        (SamplingSettings(max_new_tokens=4, repetition_penalty=1.2), "RepetitionPenaltyLogitsProcessor"),
        (
            SamplingSettings(max_new_tokens=4, extra=(("min_new_tokens", 2),)),
            "MinNewTokensLengthLogitsProcessor",
        ),
    ],
)
def test_processors_the_engine_would_drop_are_refused(settings, dropped, peaked_model):
    sampler = ContinuousBatchingSampler(peaked_model(), PAD, [EOS])
    with pytest.raises(ValueError, match=dropped):
        sampler.check(settings)
    with pytest.raises(ValueError, match=dropped):
        sampler.generate(torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long), 2, settings)


def test_the_cache_is_sized_to_the_rollout_on_cpu_unless_configured(peaked_model):
    def engine_config(sampler) -> dict:
        model, seen = sampler.weights.model, []
        run = model.generate_batch

        def spy(inputs, **kwargs):
            seen.append(kwargs["continuous_batching_config"])
            return run(inputs, **kwargs)

        model.generate_batch = spy
        sampler.generate(ids, mask, 3, SETTINGS)
        config = seen[0]
        keys = ("max_memory_percent", "return_logprobs", PAGE, "num_blocks", "max_batch_tokens")
        return {k: getattr(config, k) for k in keys}

    ids, mask = left_pad([[3, 4, 5], [6]], PAD)
    assert cpu_cache_sizes(6, 3, 4) == {PAGE: 8, "num_blocks": 12, "max_batch_tokens": 24}
    sized = engine_config(ContinuousBatchingSampler(peaked_model(), PAD, [EOS]))
    assert sized == {"max_memory_percent": 0.5, "return_logprobs": True, **cpu_cache_sizes(6, 3, 4)}
    own = {PAGE: 16, "num_blocks": 3, "max_batch_tokens": 64}  # any of them: the user sizes it
    configured = engine_config(ContinuousBatchingSampler(peaked_model(), PAD, [EOS], own))
    assert configured == {"max_memory_percent": 0.5, "return_logprobs": True, **own}


def test_engine_failures_are_raised_not_returned_short(peaked_model, monkeypatch):
    """generate_batch logs an engine error and returns what it has: the sampler refuses to go on."""
    from transformers.generation.continuous_batching import requests

    model = peaked_model()
    result = requests.GenerationOutput("req_0", generated_tokens=[5], error="out of blocks")
    monkeypatch.setattr(model, "generate_batch", lambda inputs, **kwargs: {"req_0": result})
    sampler = ContinuousBatchingSampler(model, PAD, [EOS])
    with pytest.raises(RuntimeError, match=r"returned 0 of 2 completions; first error: out of blocks"):
        sampler.generate(torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long), 2, SETTINGS)


def test_the_model_is_left_as_found(peaked_model):
    """The engine switches attention to a paged implementation and the model to eval mode; both
    are back afterwards. The checkpoint's generation_config (top_k=20 ...) never reaches it."""
    model = peaked_model().train()
    model.generation_config.update(top_k=2, temperature=0.1)
    attention = model.config._attn_implementation
    processors = []
    build = model._get_logits_processor

    def spy(config, *args, **kwargs):
        processors.append([type(p).__name__ for p in build(config, *args, **kwargs)])
        return build(config, *args, **kwargs)

    model._get_logits_processor = spy
    ContinuousBatchingSampler(model, PAD, [EOS]).generate(
        torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long), 2, SETTINGS
    )
    assert model.training and model.config._attn_implementation == attention
    assert processors and all(found == ["TemperatureLogitsWarper"] for found in processors)
    assert model.generation_config.top_k == 2


def test_a_copy_in_another_dtype_follows_the_policy_only_when_synced(peaked_model):
    policy = peaked_model().float()
    assert SamplingWeights(policy).model is policy and SamplingWeights(policy, torch.float32).shared
    weights = SamplingWeights(policy, torch.float64)
    assert weights.model is not policy and not weights.shared
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in weights.model.parameters())
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)
    assert not torch.equal(weights.model.lm_head.weight, policy.lm_head.weight.double())
    weights.sync()
    for (name, a), b in zip(policy.state_dict().items(), weights.model.state_dict().values(), strict=True):
        assert torch.equal(a.double(), b), name
