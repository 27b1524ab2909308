"""The memory switches in GRPO: ``num_frozen_layers`` (reference sharing the policy's frozen trunk,
one trunk pass for old and reference log-probs, frozen parameters without grad or optimizer state,
parameter bytes as the formula says), ``padding_free`` (packed forwards give the padded path's
log-probs, loss and gradients), ``optim`` (8-bit default resolved per machine, one warning on
fallback) and the default ``attn_implementation``. The demo's tiny Llama, fp32, CPU.
"""

from __future__ import annotations

import copy
import dataclasses

import datasets
import pytest
import torch

from fastppo import GRPOTrainer
from fastppo.batch import PolicyBatch
from fastppo.config import ForwardPlan
from fastppo.memory.accounting import (
    measured_optimizer_state_bytes,
    optimizer_state_bytes,
    trainable_parameters,
    unique_parameter_bytes,
)
from fastppo.memory.packing import VARLEN_ATTENTION
from fastppo.policy_forward import PolicyForward
from fastppo.reference import FrozenCopyReference, SharedTrunkReference

LAYERS = 4
# The shared trunk reruns the model's own ops (bit for bit, tests/test_memory_trunk.py); what is left
# is fp32 rounding of the chunked log-softmax over a different summation order.
LOGP_TOL = dict(rtol=0.0, atol=1e-5)
# Packed vs padded forwards differ in which zeros the attention sums and in matmul shapes: fp32
# rounding. assert_close fails on NaN.
PACKED_LOGP_TOL = dict(rtol=0.0, atol=2e-5)
PACKED_GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
PROMPTS = ["say : cat", "say : dog", "say : red", "say : sun", "say : moon", "say : tree"]


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model(layers=LAYERS)


# The run every test here starts from (grpo_config adds a quiet short run around it).
SHAPE = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=6,
    max_steps=2,
    learning_rate=5e-2,  # large: the policy must move away from the reference
    beta=0.1,
)


def record_scored_minibatches(trainer: GRPOTrainer) -> list[tuple[PolicyBatch, torch.Tensor]]:
    """Wrap step 2: keep each scored minibatch with the old log-probs the policy gives it right then."""
    seen = []
    original = trainer._score

    def score(rollout):
        scores = original(rollout)
        for mb in scores.minibatches:
            expected_old = PolicyForward(ForwardPlan(chunk_bytes=1 << 20)).score(trainer.model, mb, 1.0)
            seen.append((dataclasses.replace(mb), expected_old))
        return scores

    trainer._score = score
    return seen


# --- shared frozen trunk ------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [0, 2, LAYERS - 1], ids=lambda k: f"K{k}")
def test_shared_trunk_reference_in_a_grpo_run(model_dir, frozen, grpo_trainer):
    """Two rollouts of two optimizer steps each (num_iterations=2: old log-probs recorded, so one
    trunk pass scores old and reference): the reference stays the initial policy; frozen parameters
    get no gradient and no optimizer state; parameter and optimizer bytes are the formulas'."""
    trainer = grpo_trainer(
        SHAPE, model=model_dir, prompts=PROMPTS, num_frozen_layers=frozen, num_iterations=2, max_steps=4
    )
    policy = trainer.model
    assert isinstance(trainer.reference, SharedTrunkReference)
    initial = FrozenCopyReference(copy.deepcopy(policy), PolicyForward(ForwardPlan(chunk_bytes=1 << 20)))
    frozen_params = [*policy.model.embed_tokens.parameters()]
    for layer in policy.model.layers[:frozen]:
        frozen_params.extend(layer.parameters())
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in frozen_params) and trainable
    assert policy.lm_head.weight is policy.model.embed_tokens.weight  # tied: frozen with the embedding

    seen = record_scored_minibatches(trainer)
    reads_policy_trunk, reference_logprobs = [], trainer.reference.logprobs
    trainer.reference.logprobs = lambda batch, temperature, trunk=None: (
        reads_policy_trunk.append(trunk is not None) or reference_logprobs(batch, temperature, trunk)
    )
    start = [p.detach().clone() for p in trainable]
    trainer.train()

    # one trunk pass each: the reference reads the pass that scored the old log-probs
    assert trainer.state.global_step == 4 and len(seen) == len(reads_policy_trunk) == 2
    assert all(reads_policy_trunk)
    for mb, expected_old in seen:
        torch.testing.assert_close(mb.ref_logprobs, initial.logprobs(mb, 1.0), **LOGP_TOL)
        torch.testing.assert_close(mb.old_logprobs, expected_old, **LOGP_TOL)
    # The policy moved, so a reference reading the policy's top would have shown it.
    assert any(not torch.equal(p, s) for p, s in zip(trainable, start, strict=True))
    # ... and the shared reference still equals the initial policy after training.
    mb = seen[-1][0]
    torch.testing.assert_close(trainer.reference.logprobs(mb, 1.0), initial.logprobs(mb, 1.0), **LOGP_TOL)
    assert all(p.grad is None for p in frozen_params)
    state = trainer.optimizer.state
    assert not any(p in state for p in frozen_params)
    assert all(p in state for p in trainable)
    assert measured_optimizer_state_bytes(trainer.optimizer) == optimizer_state_bytes(
        trainable, "adamw_torch"
    )

    # Bytes: the policy once, plus the reference's own layers [K, L) and final norm (tied head: no copy).
    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    layer_bytes = nbytes(policy.model.layers[0])
    expected = nbytes(policy) + (LAYERS - frozen) * layer_bytes + nbytes(policy.model.norm)
    assert unique_parameter_bytes(policy, trainer.reference) == expected
    assert expected < 2 * nbytes(policy)  # vs a deep-copied reference
    assert trainable_parameters(policy, trainer.reference) == trainable


def test_sync_ref_model_touches_only_the_reference_own_layers(model_dir, grpo_trainer):
    trainer = grpo_trainer(
        SHAPE,
        model=model_dir,
        prompts=PROMPTS,
        num_frozen_layers=2,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        max_steps=1,
    )
    ref = trainer.reference
    before = copy.deepcopy(ref.state_dict())
    trunk = [p.detach().clone() for p in trainer.model.model.layers[:2].parameters()]
    trainer.train()
    after = ref.state_dict()
    assert set(after) == set(before) and all(name.startswith(("layers.", "norm.")) for name in after)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # mixed towards the trained policy
    top = dict(trainer.model.model.layers[2:].named_parameters())
    alpha = trainer.args.ref_model_mixup_alpha
    for name, value in after.items():
        if name.startswith("layers."):
            source = top[name.removeprefix("layers.")]
            torch.testing.assert_close(value, torch.lerp(before[name], source.detach(), alpha))
    for p, s in zip(trainer.model.model.layers[:2].parameters(), trunk, strict=True):
        assert torch.equal(p, s)  # the shared trunk is frozen: nothing to sync there


def test_frozen_trunk_with_gradient_checkpointing_trains(model_dir, grpo_trainer):
    trainer = grpo_trainer(
        SHAPE, model=model_dir, prompts=PROMPTS, num_frozen_layers=2, gradient_checkpointing=True, max_steps=1
    )
    assert trainer.model.is_gradient_checkpointing  # the name transformers 5.17 has too
    trainer.train()
    frozen = [*trainer.model.model.embed_tokens.parameters(), *trainer.model.model.layers[:2].parameters()]
    assert all(p.grad is None for p in frozen)
    assert all(p in trainer.optimizer.state for p in trainer.model.parameters() if p.requires_grad)


def test_lora_with_gradient_checkpointing_trains_the_adapters(model_dir, grpo_config, id_reward):
    from peft import LoraConfig

    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=grpo_config(SHAPE, gradient_checkpointing=True, max_steps=1),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert any("lora_B" in n for n in moved)  # B starts at zero: it moves only with a real gradient


def test_bad_num_frozen_layers_are_value_errors(model_dir, grpo_config, grpo_trainer, id_reward):
    with pytest.raises(ValueError, match="num_frozen_layers must be an integer >= 0, got -1"):
        grpo_config(SHAPE, num_frozen_layers=-1)
    with pytest.raises(ValueError, match=rf"num_frozen_layers must be an int in \[0, {LAYERS}\].*got 5"):
        grpo_trainer(SHAPE, model=model_dir, prompts=PROMPTS, num_frozen_layers=5)
    from peft import LoraConfig

    with pytest.raises(ValueError, match="num_frozen_layers=1 with a PEFT/LoRA policy"):
        GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            args=grpo_config(SHAPE, num_frozen_layers=1),
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )


def test_without_frozen_layers_the_reference_is_a_frozen_copy(model_dir, grpo_trainer):
    trainer = grpo_trainer(SHAPE, model=model_dir, prompts=PROMPTS)
    assert isinstance(trainer.reference, FrozenCopyReference)
    assert all(p.requires_grad for p in trainer.model.parameters())


# --- padding-free -------------------------------------------------------------------------------------


def test_padding_free_grpo_run_matches_padded_first_step(model_dir, tmp_path, pack_calls, grpo_trainer):
    """Same seed, same rollouts: the first step's loss and kl agree packed and padded."""
    logs = {}
    for padding_free in (False, True):
        trainer = grpo_trainer(
            SHAPE,
            model=model_dir,
            prompts=PROMPTS,
            output_dir=str(tmp_path / str(padding_free) / "out"),
            padding_free=padding_free,
            max_steps=1,
        )
        trainer.train()
        logs[padding_free] = trainer.state.log_history[0]
        assert bool(pack_calls) == padding_free  # reference scoring and the loss ran packed
    for key in ("loss", "kl", "entropy", "reward"):
        assert logs[True][key] == pytest.approx(logs[False][key], rel=1e-4, abs=1e-6), key


@pytest.mark.gpu
def test_cuda_defaults_train_with_8bit_state_varlen_packing_and_a_shared_trunk(
    model_dir, grpo_trainer, ragged_batch
):
    """On CUDA: optim None -> bitsandbytes 8-bit AdamW; padding_free picks fastppo_varlen (or
    flash_attention_2); bf16 autocast; the shared trunk. Then the trained policy's packed loss equals
    its padded loss within bf16 rounding."""
    import bitsandbytes as bnb

    trainer = grpo_trainer(
        SHAPE, model=model_dir, prompts=PROMPTS, num_frozen_layers=2, padding_free=True, max_steps=1
    )
    assert trainer.args.optim == "adamw_8bit" and trainer.args.bf16
    assert trainer.model.config._attn_implementation in (VARLEN_ATTENTION, "flash_attention_2")
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    batch = ragged_batch(trainer.model.config.vocab_size)
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    batch = PolicyBatch(**{name: v if v is None else v.cuda() for name, v in fields.items()})
    settings = dataclasses.replace(trainer.args.loss_settings(), num_items_in_batch=20.0)
    losses = []
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        for padding_free in (False, True):
            forward = PolicyForward(ForwardPlan(chunk_bytes=1 << 20, padding_free=padding_free))
            loss, _ = forward.policy_loss(trainer.model, batch, settings)
            losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=2e-2, abs=1e-3)
