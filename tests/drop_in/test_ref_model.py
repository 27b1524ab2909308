"""``trainer.ref_model``: TRL's name for the frozen reference model, read-only, over fastppo's
``reference`` role: the model it holds, or None where TRL has none too (no KL term; a PEFT policy,
whose reference is the policy with its adapters off)."""

from __future__ import annotations

import pytest
from peft import LoraConfig

from fastppo import GRPOTrainer, PPOTrainer
from fastppo.demo import build_dataset, build_policy, build_tokenizer, says_word
from fastppo.reference import SharedTrunkReference


def test_grpo_ref_model_is_the_frozen_reference_copy(grpo_trainer):
    assert grpo_trainer(beta=0.0).ref_model is None  # no KL term: no reference built
    trainer = grpo_trainer(beta=0.04)
    ref = trainer.ref_model
    assert ref is trainer.reference.model and ref is not trainer.model
    assert type(ref) is type(trainer.model) and not any(p.requires_grad for p in ref.parameters())
    with pytest.raises(AttributeError):
        trainer.ref_model = trainer.model  # the role's attribute is `reference`


def test_a_shared_trunk_reference_is_its_own_top_layers(grpo_trainer):
    trainer = grpo_trainer(beta=0.04, num_frozen_layers=1)
    assert isinstance(trainer.ref_model, SharedTrunkReference) and trainer.ref_model is trainer.reference


def test_a_peft_policy_has_no_separate_reference_model(model_dir, grpo_config, id_reward):
    import datasets

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=grpo_config(
            per_device_train_batch_size=4, num_generations=4, max_completion_length=4, beta=0.04
        ),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["say : cat"]}),
        peft_config=lora,
    )
    assert trainer.reference is not None and trainer.ref_model is None  # as TRL: adapters off instead


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_ppo_ref_model_is_the_given_reference(ppo_config, kl_coef):
    tokenizer = build_tokenizer()
    given = build_policy(tokenizer, seed=4)
    trainer = PPOTrainer(
        ppo_config(per_device_train_batch_size=4, response_length=4, max_steps=1, kl_coef=kl_coef),
        tokenizer,
        build_policy(tokenizer, seed=1),
        ref_model=given,
        reward_model=says_word,
        train_dataset=build_dataset(size=8, seed=2),
    )
    assert trainer.ref_model is (given if kl_coef else None)
