"""fsdp options and the pieces of sharded training that run without a process group.

Sharded training itself (FSDP2 over two gloo processes, equal to unsharded data parallelism, and its
exact resume) is in tests/test_multiprocess.py.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from fastppo import PPOConfig, PPOTrainer
from fastppo.batch import PolicyBatch
from fastppo.config import ForwardPlan
from fastppo.demo import build_dataset, build_policy, build_tokenizer, says_word
from fastppo.policy_forward import PolicyForward
from fastppo.sharding import ShardingSettings, sharding_settings


def launch(processes: int = 2, kind: DistributedType = DistributedType.MULTI_GPU, plugin=None):
    state = SimpleNamespace(fsdp_plugin=plugin)
    return SimpleNamespace(distributed_type=kind, num_processes=processes, state=state)


def args(fsdp=True, fsdp_config=None, **others):
    return SimpleNamespace(fsdp=fsdp, fsdp_config=fsdp_config, fp16=False, num_frozen_layers=None, **others)


def test_fsdp_off_means_no_sharding():
    assert sharding_settings(args(fsdp=False), launch()) is None
    assert sharding_settings(args(fsdp=[]), launch()) is None  # older transformers' "off"


@pytest.mark.parametrize(
    ("fsdp", "fsdp_config", "reshard"),
    [
        (True, None, True),
        (True, {"reshard_after_forward": False}, False),
        (True, {"fsdp_reshard_after_forward": "false"}, False),  # accelerate's prefixed spelling
        ("full_shard auto_wrap", None, True),
        ("shard_grad_op", None, False),  # ZeRO-2: gathered layers kept until backward
        (True, {"reshard_after_forward": "SHARD_GRAD_OP"}, False),  # FSDP1's strategy name
    ],
)
def test_fsdp_options_give_the_layer_resharding(fsdp, fsdp_config, reshard):
    assert sharding_settings(args(fsdp, fsdp_config), launch()) == ShardingSettings(reshard)


def test_accelerate_fsdp_plugin_is_read():
    plugin = SimpleNamespace(fsdp_version=2, cpu_offload=False, reshard_after_forward=False)
    settings = sharding_settings(args(fsdp=False), launch(kind=DistributedType.FSDP, plugin=plugin))
    assert settings == ShardingSettings(reshard_after_forward=False)
    plugin = SimpleNamespace(fsdp_version=1, cpu_offload=False, reshard_after_forward="FULL_SHARD")
    with pytest.raises(ValueError, match="fsdp version 1 is not supported: fastppo shards with FSDP2"):
        sharding_settings(args(fsdp=False), launch(kind=DistributedType.FSDP, plugin=plugin))


@pytest.mark.parametrize(
    ("fsdp", "fsdp_config", "others", "message"),
    [
        (True, {"version": 1}, {}, "fsdp version 1 is not supported"),
        (True, {"cpu_offload": True}, {}, "cpu_offload is not supported"),
        ("full_shard offload", None, {}, "cpu_offload is not supported"),
        ("hybrid_shard", None, {}, "'hybrid_shard' is not supported"),
        (True, {"xla": True}, {}, "xla=True"),
        (True, {"activation_checkpointing": "true"}, {}, "use gradient_checkpointing=True"),
        (True, None, {"fp16": True}, "fp16 with fsdp is not supported"),
        (True, None, {"num_frozen_layers": 1}, "num_frozen_layers .* cannot be combined with fsdp"),
    ],
)
def test_unsupported_fsdp_options_are_value_errors(fsdp, fsdp_config, others, message):
    config = args(fsdp, fsdp_config)
    for name, value in others.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        sharding_settings(config, launch())


def test_one_process_has_nothing_to_shard_over():
    with pytest.warns(UserWarning, match="one process: nothing to shard over"):
        assert sharding_settings(args(), launch(processes=1)) is None


def test_fsdp_config_defaults_the_optimizer_to_unsharded_8bit_free_adamw(tmp_path):
    from fastppo import GRPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = GRPOConfig(output_dir=str(tmp_path), fsdp=True, report_to="none")
    assert str(getattr(config.optim, "value", config.optim)) == "adamw_torch"


def test_sharded_ppo_gives_its_value_and_reward_models_the_policys_pad_id(monkeypatch, tmp_path):
    """A sharded sequence-classification model runs its own forward, whose pooled output needs a pad
    id; one the user left unset is taken from the tokenizer all of PPO's models read."""
    from transformers import LlamaForSequenceClassification

    monkeypatch.setattr("fastppo.sharding.sharding_settings", lambda args, accelerator: ShardingSettings())
    sharded = []
    monkeypatch.setattr("fastppo.sharding.shard", lambda module, settings: sharded.append(module))
    tokenizer = build_tokenizer()
    policy = build_policy(tokenizer, seed=0)
    scorer_config = policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1})
    scorer_config.pad_token_id = None
    value_model, reward_model = (LlamaForSequenceClassification(scorer_config) for _ in range(2))
    config = PPOConfig(output_dir=str(tmp_path), report_to="none", disable_tqdm=True, response_length=3)
    trainer = PPOTrainer(
        config,
        tokenizer,
        policy,
        reward_model=reward_model,
        train_dataset=build_dataset(size=8, seed=0),
        value_model=value_model,
    )
    assert tokenizer.pad_token_id is not None
    assert value_model.config.pad_token_id == reward_model.config.pad_token_id == tokenizer.pad_token_id
    expected = (trainer.model, trainer.reference.model, value_model, reward_model)  # policy, its frozen copy
    assert [id(m) for m in sharded] == [id(m) for m in expected]


def test_sharded_hidden_states_path_equals_the_decoder_path(monkeypatch):
    """A sharded model's fused path takes the final hidden states from the model's own forward (no
    logits kept) instead of calling its decoder: the two must be the same tensors, padded and packed."""
    tokenizer = build_tokenizer()
    model = build_policy(tokenizer, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    batch = PolicyBatch(
        prompt_ids=torch.randint(1, len(tokenizer), (3, 4), generator=g),
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(1, len(tokenizer), (3, 3), generator=g),
        completion_mask=completion_mask,
        loss_mask=completion_mask,
        rows=torch.arange(3),
    )
    for padding_free in (False, True):
        forward = PolicyForward(ForwardPlan(padding_free=padding_free))
        with torch.no_grad():
            expected = forward.run(model, batch).hidden
            monkeypatch.setattr("fastppo.policy_forward.is_sharded", lambda m: True)
            model.unshard = lambda: None  # what FSDPModule adds; the root stays whole here
            got = forward.run(model, batch).hidden
            monkeypatch.undo()
            del model.unshard
        mask = completion_mask.bool()
        torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=0)


def test_accelerate_fsdp_launch_on_cpu_processes_is_honoured(monkeypatch):
    """accelerate ignores ``--use_fsdp`` without GPUs (MULTI_CPU); its environment still asks for it."""
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    cpu = launch(kind=DistributedType.MULTI_CPU)
    assert sharding_settings(args(fsdp=False), cpu) == ShardingSettings(reshard_after_forward=False)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp version '1' is not supported"):
        sharding_settings(args(fsdp=False), cpu)


def test_a_prebuilt_optimizer_is_refused_when_sharded(monkeypatch, tmp_path):
    """An optimizer built before sharding holds the parameters fully_shard replaces: it would step
    tensors the model no longer uses."""
    from fastppo import GRPOConfig, GRPOTrainer

    monkeypatch.setattr("fastppo.sharding.sharding_settings", lambda args, accelerator: ShardingSettings())
    tokenizer = build_tokenizer()
    policy = build_policy(tokenizer, seed=0)
    with pytest.raises(ValueError, match="cannot be combined with fsdp: the optimizer must be built"):
        GRPOTrainer(
            model=policy,
            reward_funcs=says_word,
            args=GRPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=8),
            train_dataset=build_dataset(size=8, seed=0),
            processing_class=tokenizer,
            optimizers=(torch.optim.SGD(policy.parameters(), lr=0.1), None),
        )
