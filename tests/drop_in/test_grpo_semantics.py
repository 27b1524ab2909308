"""Drop-in semantics of GRPO against TRL 1.16 where a difference would change training silently: the
MoE load-balancing loss, reward processing classes, all-None rewards, the reward kwargs, the lm_head
in fp32, use_liger_kernel, models without SDPA, and the refused rollout kinds."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from fastppo import GRPOTrainer
from fastppo.demo import build_policy, build_tokenizer
from fastppo.rewards import load_rewards, score_completions

RUN = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=1)


def tiny_moe(vocab_size: int, seed: int = 0) -> Qwen3MoeForCausalLM:
    """A two-layer Qwen3-MoE (4 experts, top 2) whose config declares router_aux_loss_coef=0.001."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config)


def router_weights(model) -> torch.Tensor:
    return torch.cat([m.mlp.gate.weight.detach().flatten() for m in model.model.layers])


# --- 2-4. rewards ---------------------------------------------------------------------------------


def reward_model(tiny_model, tokenizer):
    return tiny_model(head="sequence_classification", vocab_size=len(tokenizer), pad_token_id=0)


def test_one_reward_processing_class_for_two_reward_models_is_refused(tiny_model):
    tokenizer = build_tokenizer()
    models = [reward_model(tiny_model, tokenizer), reward_model(tiny_model, tokenizer)]
    with pytest.raises(ValueError, match=r"processing classes \(1\) must match .* reward functions \(2\)"):
        load_rewards(models, weights=None, reward_processing_classes=tokenizer)


def test_trainer_exposes_reward_processing_classes(grpo_config, tiny_model, id_reward):
    tokenizer = build_tokenizer()
    model = reward_model(tiny_model, tokenizer)
    with pytest.raises(ValueError, match="was not loaded from a path, so its tokenizer cannot be found"):
        load_rewards(model, weights=None)
    trainer = GRPOTrainer(
        model=build_policy(tokenizer, hidden_size=32),
        reward_funcs=[id_reward, model],
        args=grpo_config(RUN),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"]}),
        processing_class=tokenizer,
        reward_processing_classes=[None, tokenizer],
    )
    assert trainer.reward_processing_classes == [None, tokenizer]


def test_all_none_rewards_warn_as_trl(caplog):
    def sometimes(completions, **kwargs):
        return [None, 1.0]

    def never(completions, **kwargs):
        return [None, None]

    rewards = load_rewards([sometimes, never], weights=None)
    with caplog.at_level(logging.WARNING, logger="fastppo.rewards"):
        per_func = score_completions(
            rewards, ["p0", "p1"], ["c0", "c1"], [[1], [2]], {"answer": ["a0", "a1"]}, {}
        )
    assert torch.isnan(per_func[0]).all() and per_func[1, 0] == 1.0
    assert "All reward functions returned None for the following kwargs:\n" in caplog.text
    assert "{'answer': 'a0', 'prompt': 'p0', 'completion': 'c0'}" in caplog.text  # the first such sample


def test_reward_functions_read_trainer_state_and_log_extras_and_metrics(grpo_trainer):
    seen_steps = []

    def logging_reward(completions, trainer_state, log_extra, log_metric, **kwargs):
        seen_steps.append(trainer_state.global_step)
        log_extra("note", [f"n{i}" for i in range(len(completions))])
        log_metric("custom/score", 0.5)
        return [float(len(c)) for c in completions]

    trainer = grpo_trainer(RUN, reward=logging_reward, log_completions=True, max_steps=2)
    trainer.train()
    assert seen_steps == [0, 1]
    assert all(r["custom/score"] == 0.5 for r in trainer.state.log_history if "loss" in r)
    assert [row["note"] for row in trainer._samples] == [f"n{i}" for i in range(8)]  # this rollout's only
