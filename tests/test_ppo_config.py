"""PPOConfig: legacy TRL PPOConfig names and defaults; a clear ValueError for every unknown, unsupported
or invalid option. (TRL 1.16 no longer ships PPOConfig, so the defaults are pinned here by hand.)"""

from __future__ import annotations

import pytest

from fastppo import PPOConfig


def make(**kwargs) -> PPOConfig:
    return PPOConfig(output_dir="unused", **kwargs)


def test_legacy_trl_defaults():
    c = make()
    got = {
        name: getattr(c, name)
        for name in (
            "num_ppo_epochs num_mini_batches response_length temperature kl_coef kl_estimator cliprange "
            "vf_coef cliprange_value gamma lam whiten_rewards missing_eos_penalty stop_token stop_token_id "
            "local_rollout_forward_batch_size total_episodes"
        ).split()
    }
    assert got == {
        "num_ppo_epochs": 4,
        "num_mini_batches": 1,
        "response_length": 53,
        "temperature": 0.7,
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "cliprange": 0.2,
        "vf_coef": 0.1,
        "cliprange_value": 0.2,
        "gamma": 1.0,
        "lam": 0.95,
        "whiten_rewards": False,
        "missing_eos_penalty": None,
        "stop_token": None,
        "stop_token_id": None,
        "local_rollout_forward_batch_size": 64,
        "total_episodes": None,
    }


def test_derived_batch_sizes_and_stop_id():
    c = make(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_mini_batches=2)
    assert (c.local_batch_size, c.local_mini_batch_size, c.batch_size, c.micro_batches_per_step) == (
        8,
        4,
        8,
        2,
    )
    assert (
        c.num_updates(dataset_rows=30) == 12
    )  # ceil(num_train_epochs=3 (default) x 30 rows / 8 per rollout)
    c = make(total_episodes=100, per_device_train_batch_size=4, gradient_accumulation_steps=8)
    assert c.num_updates(dataset_rows=7) == 4  # total_episodes wins: ceil(100 / 32 rows per rollout)
    assert make(stop_token="eos").stop_id(eos_token_id=5) == 5
    assert make(stop_token_id=9).stop_id(eos_token_id=5) == 9
    assert make().stop_id(eos_token_id=5) is None


def test_unknown_option_suggests_close_match():
    with pytest.raises(ValueError, match=r"'kl_coeff'.*did you mean 'kl_coef'"):
        make(kl_coeff=0.1)


def test_unsupported_training_argument_is_rejected():
    with pytest.raises(ValueError, match="deepspeed"):
        make(deepspeed={"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"kl_estimator": "k2"}, "kl_estimator"),
        ({"num_mini_batches": 0}, "num_mini_batches"),
        ({"num_ppo_epochs": 0}, "num_ppo_epochs"),
        ({"cliprange": 0.0}, "cliprange"),
        ({"cliprange_value": -1.0}, "cliprange_value"),
        ({"gamma": 1.5}, "gamma"),
        ({"lam": float("nan")}, "lam"),
        ({"temperature": 0.0}, "temperature"),
        ({"stop_token": "eot"}, "stop_token"),
        ({"response_length": 0}, "response_length"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
    ],
)
def test_bad_values_name_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(**kwargs)


@pytest.mark.parametrize(
    "per_device, accum, num_mini_batches, local_mini_batch_size, micro_batches",
    [
        (8, 1, 2, 4, 1),  # a mini-batch smaller than per_device_train_batch_size: one micro-batch
        (4, 3, 2, 6, 2),  # 6 rows in slices of 4: 4 + 2
        (2, 4, 2, 4, 2),
        (4, 2, 8, 1, 1),
    ],
)
def test_mini_batches_need_only_divide_the_rollout(
    per_device, accum, num_mini_batches, local_mini_batch_size, micro_batches
):
    """Legacy TRL only asks num_mini_batches to divide local_batch_size (its exact_div), not
    gradient_accumulation_steps: every such config is accepted, with its micro-batch loop's count."""
    c = make(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        num_mini_batches=num_mini_batches,
    )
    assert (c.local_mini_batch_size, c.micro_batches_per_step) == (local_mini_batch_size, micro_batches)


def test_num_mini_batches_not_dividing_the_rollout_is_refused_as_legacy_trl_does():
    with pytest.raises(
        ValueError,
        match=r"`local_batch_size` must be a multiple of `num_mini_batches`, inexact division: 8 / 3 = 2\.66",
    ):
        make(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=3)
