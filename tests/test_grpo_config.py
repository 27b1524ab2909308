"""GRPOConfig: TRL 1.16's names and defaults, and a clear ValueError for every unknown, unsupported or
invalid option (never a silently ignored setting)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest

from fastppo import GRPOConfig

# Our documented deviations from TRL's defaults (see fastppo/grpo_config.py's docstring).
DEVIATIONS = {"bf16", "gradient_checkpointing", "optim"}


def make(**kwargs) -> GRPOConfig:
    return GRPOConfig(output_dir="unused", **kwargs)


def test_has_every_trl_field_with_trls_default():
    trl = pytest.importorskip("trl")
    ours = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for field in dataclasses.fields(trl.GRPOConfig):
        assert field.name in ours, f"TRL field {field.name!r} missing"
        if field.name in DEVIATIONS:
            continue
        mine = ours[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        our_default = mine.default if mine.default is not dataclasses.MISSING else mine.default_factory()
        assert our_default == default, f"{field.name}: {our_default!r} != TRL's {default!r}"


def test_trl_defaults_that_matter_and_derived_sizes():
    c = make()
    assert (c.loss_type, c.beta, c.epsilon, c.num_generations, c.max_completion_length, c.scale_rewards) == (
        "dapo",
        0.0,
        0.2,
        8,
        512,
        "group",
    )
    assert (c.learning_rate, c.logging_steps, c.temperature, c.use_fused_kernels) == (1e-6, 10, 1.0, True)
    assert c.steps_per_generation == c.gradient_accumulation_steps == 1
    assert c.generation_batch_size == c.per_device_train_batch_size == 8
    assert not c.records_old_logprobs
    assert (
        c.loss_settings().clip_high is None and c.loss_settings().upper_clip == 0.2
    )  # epsilon_high -> epsilon
    c = make(per_device_train_batch_size=4, gradient_accumulation_steps=4, num_generations=4)
    assert (c.steps_per_generation, c.generation_batch_size) == (4, 16)
    c = make(per_device_train_batch_size=4, generation_batch_size=32, num_generations=4)
    assert c.steps_per_generation == 8 and c.records_old_logprobs


def test_builds_on_cpu_with_bf16_requested():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = make(bf16=True)
    assert c.bf16 is False  # no bf16 GPU here: fp32, said out loud
    assert any("bf16=True" in str(w.message) for w in caught)
    assert make().gradient_checkpointing is False  # CPU: off unless asked
    assert make(gradient_checkpointing=True).gradient_checkpointing is True


def test_trl_boolean_scale_rewards_and_inert_fields():
    assert make(scale_rewards=True).scale_rewards == "group"
    assert make(scale_rewards=False).scale_rewards == "none"
    make(vllm_mode="server", run_name="x", do_train=True)  # only meaningful with switches we reject


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_generationz": 4}, r"unknown option.*'num_generationz'.*did you mean 'num_generations'"),
        ({"learning_rat": 1e-5}, r"did you mean 'learning_rate'"),
        ({"use_vllm": True}, r"not supported by fastppo: use_vllm=True"),
        ({"torch_compile": True}, r"not supported by fastppo: torch_compile=True"),
        ({"push_to_hub": True}, r"push_to_hub=True"),
        ({"fp16_full_eval": True}, r"fp16_full_eval=True"),
        ({"loss_type": "ppo"}, r"loss_type must be one of \('grpo', .*'vespo'\), got 'ppo'"),
        ({"sapo_temperature_neg": 0.0}, r"sapo_temperature_neg must be a finite number in \(0.0, inf\)"),
        ({"vespo_lambda_pos": math.inf}, r"vespo_lambda_pos must be a finite number"),
        ({"entropy_coef": math.nan}, r"entropy_coef must be a finite number"),
        ({"use_bias_correction_kl": "yes"}, r"use_bias_correction_kl must be True or False, got 'yes'"),
        ({"top_entropy_quantile": 1.5}, r"top_entropy_quantile must be a finite number in \[0.0, 1.0\]"),
        ({"off_policy_mask_threshold": -0.1}, r"off_policy_mask_threshold must be a finite number in \[0.0"),
        ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, r"entropy_coef_min \(0.5\) must be <= "),
        ({"entropy_coef_delta": -0.01}, r"entropy_coef_delta must be a finite number in \[0.0, inf\)"),
        ({"entropy_target": -1.0}, r"entropy_target must be"),
        ({"num_generations": 1}, r"num_generations must be an integer >= 2, got 1"),
        (
            {"per_device_train_batch_size": 6},
            r"generation_batch_size \(6 .*divisible by num_generations \(8\)",
        ),
        (
            {"generation_batch_size": 12, "num_generations": 4},
            r"generation_batch_size \(12\) must be divisible",
        ),
        ({"generation_batch_size": 16, "steps_per_generation": 2}, r"can not both be set"),
        ({"epsilon": 0.0}, r"epsilon must be a finite number in \(0.0, 1.0\), got 0.0"),
        ({"epsilon": 1.0}, r"epsilon must be"),
        ({"epsilon_high": -0.1}, r"epsilon_high must be"),
        ({"delta": 1.0}, r"delta must be a finite number in \(1.0, inf\)"),
        ({"temperature": 0.0}, r"temperature must be a finite number in \(0.0, inf\), got 0.0"),
        ({"temperature": math.nan}, r"temperature must be"),
        ({"top_p": 0.0}, r"top_p must be"),
        ({"top_k": -1}, r"top_k must be an integer >= 0"),
        ({"beta": -0.1}, r"beta must be"),
        ({"num_iterations": 0}, r"num_iterations must be an integer >= 1"),
        ({"max_completion_length": 0}, r"max_completion_length must be an integer >= 1"),
        ({"max_prompt_length": 0}, r"max_prompt_length must be an integer >= 1"),
        ({"scale_rewards": "global"}, r"scale_rewards must be one of"),
        ({"importance_sampling_level": "group"}, r"importance_sampling_level must be one of"),
        ({"multi_objective_aggregation": "max"}, r"multi_objective_aggregation must be one of"),
        ({"reward_weights": [1.0, math.inf]}, r"reward_weights\[1\] must be"),
        ({"ref_model_mixup_alpha": 1.5}, r"ref_model_mixup_alpha must be"),
        ({"sync_ref_model": True}, r"sync_ref_model=True needs beta > 0"),
        (
            {"report_to": "tensorbord"},
            r"report_to got unknown option\(s\): 'tensorbord' \(did you mean 'tensorboard'",
        ),
        ({"report_to": ["clearml"]}, r"report_to=\['clearml'\]: \['clearml'\] not installed"),
        ({"optim": "adam"}, r"optim must be one of transformers. OptimizerNames .*got .adam."),
        ({"logging_strategy": "epoch"}, r"logging_strategy must be one of"),
        (
            {"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps", "eval_steps": 1},
            r"lr_scheduler_type='reduce_lr_on_plateau'",
        ),
        ({"pad_to_multiple_of": 0}, r"pad_to_multiple_of must be an integer >= 1, got 0"),
        ({"kernel_chunk_bytes": 0}, r"kernel_chunk_bytes must be an integer >= 1"),
        # sampling at another temperature than the log-probs are taken at would be silently off-policy
        ({"generation_kwargs": {"temperature": 0.3, "max_time": 5}}, r"must not set \['temperature'\]"),
        ({"generation_kwargs": {"do_sample": False, "min_p": 0.1}}, r"must not set \['do_sample', 'min_p'\]"),
    ],
)
def test_bad_options_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_every_loss_option_reaches_the_kernel_settings():
    """Each of TRL's loss fields lands on its PolicyLossSettings field (non-default values, so a
    field dropped on the way would show)."""
    c = make(
        loss_type="sapo",
        epsilon=0.1,
        epsilon_high=0.3,
        delta=None,
        beta=0.05,
        use_bias_correction_kl=False,
        importance_sampling_level="sequence",
        temperature=0.7,
        max_completion_length=64,
        sapo_temperature_pos=0.9,
        sapo_temperature_neg=1.2,
        vespo_k_pos=1.5,
        vespo_lambda_pos=2.5,
        vespo_k_neg=3.5,
        vespo_lambda_neg=1.5,
        entropy_coef=0.01,
        top_entropy_quantile=0.2,
        off_policy_mask_threshold=0.4,
    )
    assert dataclasses.asdict(c.loss_settings()) == {
        "clip_low": 0.1,
        "clip_high": 0.3,
        "delta": None,
        "beta": 0.05,
        "kl_estimator": "k3",
        "kl_bias_correction": False,
        "loss_type": "sapo",
        "importance_sampling_level": "sequence",
        "max_completion_length": 64,
        "num_items_in_batch": None,  # the trainer's, per rollout
        "temperature": 0.7,
        "sapo_temperature_pos": 0.9,
        "sapo_temperature_neg": 1.2,
        "vespo_k_pos": 1.5,
        "vespo_lambda_pos": 2.5,
        "vespo_k_neg": 3.5,
        "vespo_lambda_neg": 1.5,
        "entropy_coef": 0.01,
        "top_entropy_quantile": 0.2,
        "off_policy_mask_threshold": 0.4,
    }
    # TRL's default: the KL term times the ratio; False still works
    assert make(beta=0.1).loss_settings().kl_bias_correction is True
    assert make(beta=0.1, use_bias_correction_kl=False).loss_settings().kl_bias_correction is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"loss_type": "luspo"},
            r"`'luspo'` loss, `importance_sampling_level` should be set to `'sequence'`",
        ),
        (
            {"loss_type": "vespo", "importance_sampling_level": "sequence"},
            r"VESPO computes sequence-level importance weights internally",
        ),
        *(
            ({"loss_type": t, "importance_sampling_level": "sequence"}, rf"the `'{t}'` loss sums per-token")
            for t in ("bnpo", "dr_grpo", "dapo", "cispo")
        ),
        ({"loss_type": "cispo"}, r"caps the importance ratio at epsilon_high, which is unset"),
        ({"loss_type": "sapo", "delta": 2.0}, r"delta=2.0 has no effect with loss_type='sapo'"),
        ({"off_policy_mask_threshold": 0.5}, r"off_policy_mask_threshold=0.5 has no effect here"),
    ],
)
def test_trls_warnings_and_ours_for_settings_that_do_little(kwargs, message):
    with pytest.warns(UserWarning, match=message):
        make(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        {"loss_type": "grpo", "importance_sampling_level": "sequence"},
        {"loss_type": "vespo"},
        {"loss_type": "cispo", "epsilon_high": 5.0},
        {"loss_type": "dapo", "delta": 2.0},
        {"off_policy_mask_threshold": 0.5, "num_iterations": 2},
        {"use_adaptive_entropy": True, "entropy_coef": 0.01, "entropy_target": 2.0},
    ],
)
def test_the_recommended_setups_build_quietly(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make(**kwargs)


def test_unsupported_options_are_listed_together():
    with pytest.raises(ValueError) as info:
        make(use_vllm=True, torch_compile=True)
    assert "use_vllm=True" in str(info.value) and "torch_compile=True" in str(info.value)


def test_hf_argument_parser_reads_it():
    from transformers import HfArgumentParser

    (c,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--beta",
            "0.05",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "8",
        ]
    )
    assert (c.beta, c.num_generations) == (0.05, 4)


@pytest.mark.parametrize(
    ("fp16", "fused", "refused"), [(True, True, True), (True, False, False), (False, True, False)]
)
def test_fp16_is_refused_for_the_fused_kernels_only(fp16, fused, refused):
    """The fused path forms the logits' gradient in the forward, before fp16 loss scaling: it would
    underflow. (On CPU fp16 is switched off before this check runs, hence the check on its own.)"""
    from types import SimpleNamespace

    from fastppo.config import check_fused_precision

    config = SimpleNamespace(fp16=fp16, use_fused_kernels=fused)
    if refused:
        with pytest.raises(ValueError, match="fp16 with use_fused_kernels=True is not supported"):
            check_fused_precision(config)
    else:
        check_fused_precision(config)


def test_kernel_chunk_bytes_defaults_to_the_devices_size():
    """None (the default) reaches the kernels, which size the chunk for the device they run on
    (128 MiB on CPU, 1 GiB on a GPU: chunked.default_chunk_bytes); a number is used as given."""
    assert make().kernel_chunk_bytes is None and make().forward_plan().chunk_bytes is None
    assert make(kernel_chunk_bytes=2**20).forward_plan().chunk_bytes == 2**20
