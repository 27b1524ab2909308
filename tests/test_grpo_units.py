"""The small pieces under GRPOTrainer, alone: completion masks, prompt encoding, batch trimming,
the reward convention (None / NaN / wrong length / reward models) and the metrics buffer."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo.batch import PolicyBatch
from fastppo.demo import build_tokenizer
from fastppo.metrics import MetricsBuffer, plot_reward_curve
from fastppo.rewards import check_reward_output, combine_rewards, load_rewards, score_completions
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


def test_policy_batch_select_trims_padding_columns():
    prompt_ids, prompt_mask = left_pad([[4, 5, 6], [7], [8, 9]], PAD)
    completion_ids = torch.tensor([[5, 1, 0, 0], [6, 6, 6, 1], [7, 1, 0, 0]])
    cmask, _ = completion_mask(completion_ids, [EOS])
    batch = PolicyBatch(
        prompt_ids,
        prompt_mask,
        completion_ids,
        cmask,
        cmask.clone(),
        torch.arange(3),
        advantages=torch.tensor([1.0, 2.0, 3.0]),
    )
    picked = batch.select(torch.tensor([2, 1]))
    assert picked.prompt_ids.tolist() == [[8, 9], [0, 7]]  # leading all-pad column dropped
    assert picked.completion_ids.shape == (2, 4) and picked.advantages.tolist() == [3.0, 2.0]
    picked = batch.select(torch.tensor([0, 2]))
    assert picked.completion_ids.tolist() == [[5, 1], [7, 1]]  # trailing all-masked columns dropped
    assert picked.rows.tolist() == [0, 2]
    parts = batch.split(2, torch.Generator().manual_seed(0))
    assert sorted(r for p in parts for r in p.rows.tolist()) == [0, 1, 2]


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


def test_reward_model_scores_prompt_plus_completion_text():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=1,
            pad_token_id=PAD,
        )
    )
    rewards = load_rewards(model, weights=None, reward_processing_classes=tokenizer)
    scores = score_completions(rewards, ["say : ", "say : "], ["cat", "dog dog"], [[4], [5, 5]], {}, {})
    with torch.no_grad():
        expected = [
            model(**tokenizer([t], return_tensors="pt")).logits[0, 0].item()
            for t in ("say : cat", "say : dog dog")
        ]
    torch.testing.assert_close(scores[:, 0], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_metrics_buffer_weights_by_count_and_skips_nan():
    buffer = MetricsBuffer()
    buffer.add("entropy", 1.0, weight=30)  # a minibatch of 30 tokens
    buffer.add("entropy", 4.0, weight=10)  # a minibatch of 10 tokens
    buffer.add("reward", float("nan"))
    assert buffer.flush() == {"entropy": (30 * 1.0 + 10 * 4.0) / 40}
    assert buffer.flush() == {}


def test_reward_plot_needs_rewards(tmp_path):
    assert plot_reward_curve([{"step": 1, "loss": 0.1}], str(tmp_path / "a.png")) is None
    path = plot_reward_curve(
        [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.3, "kl": 0.01}], str(tmp_path / "b.png")
    )
    assert path and (tmp_path / "b.png").stat().st_size > 0


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
