"""The rollout engine alone: completion masks, prompt encoding and left padding, and the sampler's
generation settings (every knob reaches generate, none leaks in from the checkpoint)."""

from __future__ import annotations

import pytest
import torch

from fastppo.demo import build_tokenizer
from fastppo.rollout import completion_mask, encode_prompts, left_pad

EOS, PAD = 1, 0


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0], [5, 9, 6, 9]])
    mask, truncated = completion_mask(ids, [EOS, 9])  # two end tokens (e.g. EOS and end-of-turn)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_left_pad_and_prompt_encoding():
    ids, mask = left_pad([[4, 5, 6], [7]], PAD)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    tokenizer = build_tokenizer()
    ids, mask, truncated = encode_prompts(tokenizer, ["say : cat", "say : dog cat"], max_prompt_length=3)
    assert truncated == 1
    assert ids.tolist() == [[2, 3, 4], [3, 5, 4]]  # the longer prompt keeps its end
    chat = [[{"role": "user", "content": "say : cat"}]]
    ids, mask, _ = encode_prompts(tokenizer, chat)
    assert ids.tolist() == [[2, 3, 4]]  # rendered with the chat template, no extra specials
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_prompts(tokenizer, [""])


def test_generate_sampler_passes_every_sampling_knob(monkeypatch):
    """top_k=0 (TRL: off) must reach generate as 0; None would mean transformers' default of 50."""
    from fastppo.demo import build_policy
    from fastppo.rollout import GenerateSampler, SamplingSettings

    tokenizer = build_tokenizer()
    model = build_policy(tokenizer, hidden_size=16, layers=1)
    seen = {}

    def fake_generate(input_ids, attention_mask, generation_config):
        seen["config"] = generation_config
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 2), EOS)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    sampler = GenerateSampler(model, PAD, [EOS])
    settings = SamplingSettings(
        max_new_tokens=2, temperature=0.7, top_p=0.9, top_k=0, extra=(("min_new_tokens", 1),)
    )
    out = sampler.generate(torch.tensor([[2, 3]]), torch.ones(1, 2, dtype=torch.long), 3, settings)
    config = seen["config"]
    assert (config.top_k, config.top_p, config.temperature, config.num_return_sequences) == (0, 0.9, 0.7, 3)
    assert config.min_new_tokens == 1 and config.use_cache
    assert out.tolist() == [[EOS, EOS]]
    assert model.training  # the sampler restores the mode it found


def test_checkpoint_generation_defaults_do_not_leak_into_sampling():
    """A checkpoint's generation_config (top_k=20, min_p, typical_p, beams) must not change what is
    sampled: the log-probs are taken under the trainer's settings only."""
    from fastppo.demo import build_policy
    from fastppo.rollout import GenerateSampler, SamplingSettings

    tokenizer = build_tokenizer()
    model = build_policy(tokenizer, hidden_size=16, layers=1)
    model.generation_config.update(top_k=20, min_p=0.1, typical_p=0.5, num_beams=2, temperature=0.3)
    prepare = model._prepare_generation_config
    used = []

    def spy(*args, **kwargs):
        config, rest = prepare(*args, **kwargs)
        used.append(config)
        return config, rest

    model._prepare_generation_config = spy
    settings = SamplingSettings(max_new_tokens=2, temperature=0.9, top_p=1.0, top_k=0, min_p=None)
    GenerateSampler(model, PAD, [EOS]).generate(
        torch.tensor([[2, 3]]), torch.ones(1, 2, dtype=torch.long), 2, settings
    )
    config = used[0]
    assert (config.temperature, config.top_k, config.num_beams) == (0.9, 0, 1)
    assert config.min_p is None and config.typical_p in (None, 1.0)
    assert model.generation_config.top_k == 20  # the model's own config is back afterwards
