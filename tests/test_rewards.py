"""Reward functions with TRL's convention, alone: output checks naming the function and the sample,
weights ignoring None, async functions, and a text reward model scoring prompt + completion."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo.demo import build_tokenizer
from fastppo.rewards import check_reward_output, combine_rewards, load_rewards, score_completions

PAD = 0


def test_reward_output_checks_name_function_and_sample():
    values = check_reward_output("f", [1, None, 2.5], 3)
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 2.5  # None -> NaN
    with pytest.raises(ValueError, match=r"'f' returned inf for sample 1"):
        check_reward_output("f", [0.0, float("inf")], 2)
    with pytest.raises(ValueError, match=r"'f' returned 'yes' for sample 0"):
        check_reward_output("f", ["yes"], 1)
    with pytest.raises(ValueError, match=r"'f' returned 2 rewards for 3 completions"):
        check_reward_output("f", [0.0, 1.0], 3)
    with pytest.raises(ValueError, match=r"'f' returned float, expected a list"):
        check_reward_output("f", 1.0, 1)


def test_rewards_combine_with_weights_ignoring_none():
    def a(completions, **kwargs):
        return [1.0, None, None]

    async def b(completions, **kwargs):  # TRL accepts async reward functions
        return [2.0, 3.0, None]

    rewards = load_rewards([a, b], weights=[1.0, 0.5])
    assert rewards.names == ["a", "b"]
    per_func = score_completions(rewards, ["p"] * 3, ["x", "y", "z"], [[1], [2], [3]], {}, {})
    total = combine_rewards(per_func, rewards.weights)
    assert total[:2].tolist() == [2.0, 1.5] and math.isnan(total[2])  # all-None row stays NaN
    with pytest.raises(ValueError, match="reward_weights has 1 entries"):
        load_rewards([a, b], weights=[1.0])


def test_reward_model_scores_prompt_plus_completion_text(tiny_model):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(
        head="sequence_classification",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        pad_token_id=PAD,
    )
    rewards = load_rewards(model, weights=None, reward_processing_classes=tokenizer)
    scores = score_completions(rewards, ["say : ", "say : "], ["cat", "dog dog"], [[4], [5, 5]], {}, {})
    with torch.no_grad():
        expected = [
            model(**tokenizer([t], return_tensors="pt")).logits[0, 0].item()
            for t in ("say : cat", "say : dog dog")
        ]
    torch.testing.assert_close(scores[:, 0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
