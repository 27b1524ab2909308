"""The memory switches in GRPO: ``num_frozen_layers`` (reference sharing the policy's frozen trunk,
one trunk pass for old and reference log-probs, frozen parameters without grad or optimizer state,
parameter bytes as the formula says), ``padding_free`` (packed forwards give the padded path's
log-probs, loss and gradients), ``optim`` (8-bit default resolved per machine, one warning on
fallback) and the default ``attn_implementation``. The demo's tiny Llama, fp32, CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import datasets
import pytest
import torch

from fastppo import GRPOConfig, GRPOTrainer, optim
from fastppo.batch import PolicyBatch
from fastppo.config import ForwardPlan
from fastppo.demo import build_policy, build_tokenizer
from fastppo.memory.accounting import (
    measured_optimizer_state_bytes,
    optimizer_state_bytes,
    trainable_parameters,
    unique_parameter_bytes,
)
from fastppo.memory.packing import VARLEN_ATTENTION, register_varlen_attention
from fastppo.modeling import load_causal_lm
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
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model(layers=LAYERS)


def config(tmp_path, **overrides) -> GRPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        learning_rate=5e-2,  # large: the policy must move away from the reference
        beta=0.1,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    values.update(overrides)
    return GRPOConfig(**values)


def id_reward(completion_ids, **kwargs):
    return [float(len(ids) + ids[0] % 3) if ids else 0.0 for ids in completion_ids]


def trainer_for(model_dir, tmp_path, **overrides) -> GRPOTrainer:
    return GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
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
def test_shared_trunk_reference_in_a_grpo_run(model_dir, tmp_path, frozen):
    """Two rollouts of two optimizer steps each (num_iterations=2: old log-probs recorded, so one
    trunk pass scores old and reference): the reference stays the initial policy; frozen parameters
    get no gradient and no optimizer state; parameter and optimizer bytes are the formulas'."""
    trainer = trainer_for(model_dir, tmp_path, num_frozen_layers=frozen, num_iterations=2, max_steps=4)
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


def test_sync_ref_model_touches_only_the_reference_own_layers(model_dir, tmp_path):
    trainer = trainer_for(
        model_dir, tmp_path, num_frozen_layers=2, sync_ref_model=True, ref_model_sync_steps=1, max_steps=1
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


def test_frozen_trunk_with_gradient_checkpointing_trains(model_dir, tmp_path):
    trainer = trainer_for(model_dir, tmp_path, num_frozen_layers=2, gradient_checkpointing=True, max_steps=1)
    assert trainer.model.is_gradient_checkpointing  # the name transformers 5.17 has too
    trainer.train()
    frozen = [*trainer.model.model.embed_tokens.parameters(), *trainer.model.model.layers[:2].parameters()]
    assert all(p.grad is None for p in frozen)
    assert all(p in trainer.optimizer.state for p in trainer.model.parameters() if p.requires_grad)


def test_lora_with_gradient_checkpointing_trains_the_adapters(model_dir, tmp_path):
    from peft import LoraConfig

    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=config(tmp_path, gradient_checkpointing=True, max_steps=1),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert any("lora_B" in n for n in moved)  # B starts at zero: it moves only with a real gradient


def test_bad_num_frozen_layers_are_value_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="num_frozen_layers must be an integer >= 0, got -1"):
        config(tmp_path, num_frozen_layers=-1)
    with pytest.raises(ValueError, match=rf"num_frozen_layers must be an int in \[0, {LAYERS}\].*got 5"):
        trainer_for(model_dir, tmp_path, num_frozen_layers=5)
    from peft import LoraConfig

    with pytest.raises(ValueError, match="num_frozen_layers=1 with a PEFT/LoRA policy"):
        GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            args=config(tmp_path, num_frozen_layers=1),
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        )


def test_without_frozen_layers_the_reference_is_a_frozen_copy(model_dir, tmp_path):
    trainer = trainer_for(model_dir, tmp_path)
    assert isinstance(trainer.reference, FrozenCopyReference)
    assert all(p.requires_grad for p in trainer.model.parameters())


# --- padding-free -------------------------------------------------------------------------------------


def ragged_batch(vocab: int, seed: int = 0) -> PolicyBatch:
    """Left-padded prompts, right-padded completions of different lengths (one row without padding)."""
    g = torch.Generator().manual_seed(seed)
    rows, lp, lc = 4, 5, 7
    prompt_mask = torch.ones(rows, lp, dtype=torch.long)
    prompt_mask[0, :3] = 0
    prompt_mask[2, :1] = 0
    completion_mask = torch.ones(rows, lc, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[1, 2:] = 0
    completion_mask[3, 6:] = 0
    return PolicyBatch(
        prompt_ids=torch.randint(1, vocab, (rows, lp), generator=g),
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(1, vocab, (rows, lc), generator=g),
        completion_mask=completion_mask,
        loss_mask=completion_mask.clone(),
        rows=torch.arange(rows),
        advantages=torch.randn(rows, generator=g),
        old_logprobs=None,
        ref_logprobs=-torch.rand(rows, lc, generator=g),
    )


@pytest.fixture
def pack_calls(monkeypatch) -> list[int]:
    """Rows of every batch packed by the scoring forwards (so a padded path cannot pass for packed)."""
    import fastppo.policy_forward as policy_forward

    calls, original = [], policy_forward.pack

    def spy(input_ids, attention_mask):
        calls.append(input_ids.shape[0])
        return original(input_ids, attention_mask)

    monkeypatch.setattr(policy_forward, "pack", spy)
    return calls


def policy_with_attention(tokenizer, attention: str):
    policy = build_policy(tokenizer, seed=1, hidden_size=32, layers=3)
    if attention == VARLEN_ATTENTION:
        register_varlen_attention()
    policy.set_attn_implementation(attention)
    return policy.train()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("attention", ["sdpa", VARLEN_ATTENTION])
def test_padding_free_loss_logprobs_and_grads_equal_padded(tokenizer, attention, fused, pack_calls):
    policy = policy_with_attention(tokenizer, attention)
    batch = ragged_batch(len(tokenizer))
    settings = dataclasses.replace(
        GRPOConfig(output_dir="unused", beta=0.1, loss_type="grpo").loss_settings(), max_completion_length=7
    )
    results = {}
    for padding_free in (False, True):
        policy.zero_grad(set_to_none=True)
        forward = PolicyForward(ForwardPlan(fused=fused, chunk_bytes=1 << 20, padding_free=padding_free))
        loss, stats = forward.policy_loss(policy, batch, settings)
        loss.backward()
        logp = forward.score(policy, batch, 0.7)
        grads = [p.grad.clone() for p in policy.parameters()]
        results[padding_free] = (loss.detach(), stats.entropy_mean, logp, grads)
    assert pack_calls == [4, 4]  # the padding-free loss and scoring forwards, not the padded ones
    (loss0, ent0, logp0, grads0), (loss1, ent1, logp1, grads1) = results[False], results[True]
    assert torch.isfinite(loss0) and logp0.abs().sum() > 0
    torch.testing.assert_close(loss1, loss0, **PACKED_LOGP_TOL)
    torch.testing.assert_close(ent1, ent0, **PACKED_LOGP_TOL)
    torch.testing.assert_close(logp1, logp0, **PACKED_LOGP_TOL)
    assert (logp1[batch.completion_mask == 0] == 0).all()
    for g1, g0 in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(g1, g0, **PACKED_GRAD_TOL)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("attention", ["sdpa", VARLEN_ATTENTION])
def test_padding_free_shared_trunk_scoring_equals_padded(tokenizer, attention, fused, pack_calls):
    from fastppo.memory.trunk import freeze_trunk

    policy = policy_with_attention(tokenizer, attention)
    freeze_trunk(policy, 1)
    batch = ragged_batch(len(tokenizer), seed=3)
    scored = {}
    for padding_free in (False, True):
        plan = ForwardPlan(fused=fused, chunk_bytes=1 << 20, padding_free=padding_free, num_frozen_layers=1)
        forward = PolicyForward(plan)
        ref = SharedTrunkReference(policy, 1, forward)
        with forward.scoring(policy):  # old log-probs and the reference's from one trunk pass
            policy_pass = forward.run(policy, batch)
            old = forward.logprobs(policy_pass, batch, 1.0)
        scored[padding_free] = (old, ref.logprobs(batch, 1.0, policy_pass.trunk), ref.logprobs(batch, 1.0))
        # A trunk pass run once for more tops (PPO: the critic too) gives the very same log-probs.
        shared = forward.trunk_pass(policy, batch)
        with forward.scoring(policy):
            given = (
                forward.logprobs(forward.top(policy, shared), batch, 1.0),
                ref.logprobs(batch, 1.0, shared),
            )
        for got, want in zip(given, scored[padding_free], strict=False):
            torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)
    assert pack_calls == [4, 4, 4]
    expected = PolicyForward(ForwardPlan(fused=fused, chunk_bytes=1 << 20)).score(policy, batch, 1.0)
    for padding_free, (old, ref_joint, ref_alone) in scored.items():
        tol = PACKED_LOGP_TOL if padding_free else LOGP_TOL
        torch.testing.assert_close(old, expected, **tol)
        torch.testing.assert_close(ref_joint, expected, **tol)  # an untrained copy of the same weights
        torch.testing.assert_close(ref_alone, ref_joint, rtol=0.0, atol=0.0)


def test_padding_free_grpo_run_matches_padded_first_step(model_dir, tmp_path, pack_calls):
    """Same seed, same rollouts: the first step's loss and kl agree packed and padded."""
    logs = {}
    for padding_free in (False, True):
        trainer = trainer_for(model_dir, tmp_path / str(padding_free), padding_free=padding_free, max_steps=1)
        trainer.train()
        logs[padding_free] = trainer.state.log_history[0]
        assert bool(pack_calls) == padding_free  # reference scoring and the loss ran packed
    for key in ("loss", "kl", "entropy", "reward"):
        assert logs[True][key] == pytest.approx(logs[False][key], rel=1e-4, abs=1e-6), key


# --- optimizer and attention defaults -----------------------------------------------------------------


def test_optim_defaults_and_8bit_fallback_warns_once_on_cpu(tmp_path):
    optim.warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert config(tmp_path).optim == "adamw_torch"  # None -> adamw_torch on CPU, quietly
    assert not [w for w in caught if "falls back" in str(w.message)]
    with pytest.warns(UserWarning, match="'adamw_8bit' falls back to 'adamw_torch'.*CUDA only"):
        assert config(tmp_path, optim="adamw_8bit").optim == "adamw_torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert config(tmp_path, optim="adamw_8bit").optim == "adamw_torch"
        assert config(tmp_path, optim="adamw_torch_fused").optim == "adamw_torch_fused"
    assert not [w for w in caught if "falls back" in str(w.message)]
    with pytest.raises(ValueError, match="optim must be one of"):
        config(tmp_path, optim="adafactor")


def test_default_attention_and_model_init_kwargs(model_dir):
    assert load_causal_lm(model_dir, None, False).config._attn_implementation == "sdpa"  # CPU default
    eager = load_causal_lm(model_dir, {"attn_implementation": "eager"}, False)
    assert eager.config._attn_implementation == "eager"
    varlen = load_causal_lm(model_dir, {"attn_implementation": VARLEN_ATTENTION}, False)
    assert varlen.config._attn_implementation == VARLEN_ATTENTION


def test_memory_benchmark_accounting_rows_are_the_formula():
    """bench_memory's CPU rows: a deep-copied reference doubles the parameters; a shared trunk adds
    only the reference's own layers; 8-bit state is smaller than torch AdamW's."""
    from fastppo.benchmarks import bench_memory

    rows = {
        (r["algo"], r["num_frozen_layers"], r["optim"]): r for r in bench_memory.account(["qwen2.5-0.5b"])
    }
    policy, _ = bench_memory.accounting_modules("qwen2.5-0.5b", "grpo", None)
    _, shared = bench_memory.accounting_modules("qwen2.5-0.5b", "grpo", 12)
    assert rows["grpo", None, "adamw_torch"]["parameter_bytes"] == 2 * unique_parameter_bytes(policy)
    own = sum(p.numel() * p.element_size() for p in shared.parameters())  # layers [12, 24) + norm
    assert rows["grpo", 12, "adamw_torch"]["parameter_bytes"] == unique_parameter_bytes(policy) + own
    for algo in ("grpo", "ppo"):
        for k in (None, 12):
            assert rows[algo, k, "adamw_8bit"]["static_bytes"] < rows[algo, k, "adamw_torch"]["static_bytes"]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_policy_loss_on_a_shared_trunk_pass_equals_the_whole_forward(tokenizer, fused, padding_free):
    """What PPO calls to feed the policy loss and a TrunkValueModel critic from one trunk pass."""
    from fastppo.critic import TrunkValueModel
    from fastppo.memory.trunk import freeze_trunk

    policy = policy_with_attention(tokenizer, "sdpa")
    freeze_trunk(policy, 2)
    critic = TrunkValueModel(policy, 2)
    batch = ragged_batch(len(tokenizer), seed=5)
    settings = dataclasses.replace(
        GRPOConfig(output_dir="unused", beta=0.1).loss_settings(), num_items_in_batch=20.0
    )
    plan = ForwardPlan(fused=fused, chunk_bytes=1 << 20, padding_free=padding_free)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    loss, _ = PolicyForward(plan).policy_loss(policy, batch, settings)
    expected = torch.autograd.grad(loss, trainable)
    trunked = PolicyForward(dataclasses.replace(plan, num_frozen_layers=2))
    shared = trunked.trunk_pass(policy, batch)
    assert not shared.trunk.hidden.requires_grad  # the frozen trunk records nothing for backward
    shared_loss, _ = trunked.loss(trunked.top(policy, shared), batch, settings)
    values = shared.inputs.completion_positions(critic(shared.trunk))  # [b, Lc]
    assert values.shape == batch.completion_ids.shape and values.dtype == torch.float32
    grads = torch.autograd.grad(shared_loss + 0.0 * values.sum(), trainable)
    torch.testing.assert_close(shared_loss, loss, **PACKED_LOGP_TOL)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **PACKED_GRAD_TOL)


@pytest.mark.gpu
def test_cuda_defaults_train_with_8bit_state_varlen_packing_and_a_shared_trunk(model_dir, tmp_path):
    """On CUDA: optim None -> bitsandbytes 8-bit AdamW; padding_free picks fastppo_varlen (or
    flash_attention_2); bf16 autocast; the shared trunk. Then the trained policy's packed loss equals
    its padded loss within bf16 rounding."""
    import bitsandbytes as bnb

    trainer = trainer_for(model_dir, tmp_path, num_frozen_layers=2, padding_free=True, max_steps=1)
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
