"""PolicyForward, the one forward both trainers run: the fused path (hidden states -> chunked kernel)
and the plain path (full logits -> log_softmax -> policy_objective) give the same loss, statistics and
parameter gradients for every loss type (field note 2: Liger's fused GRPO loss drifted from the plain
one silently); packed rows (padding_free) give the padded rows' log-probs, loss and gradients; a pass
of the shared frozen trunk serves the policy, a shared-trunk reference and a trunk critic.

fp32 throughout. Fused vs plain differ only in summation order (chunked lm_head, fused backward), so
losses agree to 1e-5 relative and gradients to rtol 1e-4 / atol 1e-6. Packed vs padded forwards
differ in which zeros the attention sums and in matmul shapes: fp32 rounding. The shared trunk
reruns the model's own ops (bit for bit, tests/memory/test_trunk.py); what is left is fp32 rounding
of the chunked log-softmax over a different summation order. assert_close fails on NaN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fastppo.kernels.ppo_loss import PolicyLossSettings

from fastppo import GRPOConfig
from fastppo.batch import PolicyBatch
from fastppo.config import ForwardPlan
from fastppo.demo import build_policy, build_tokenizer
from fastppo.memory.packing import VARLEN_ATTENTION, register_varlen_attention
from fastppo.policy_forward import PolicyForward
from fastppo.reference import SharedTrunkReference
from fastppo.rollout import left_pad

LOGP_TOL = dict(rtol=0.0, atol=1e-5)
PACKED_LOGP_TOL = dict(rtol=0.0, atol=2e-5)
PACKED_GRAD_TOL = dict(rtol=1e-4, atol=1e-6)

CASES = {
    "grpo": PolicyLossSettings(loss_type="grpo", beta=0.04, temperature=0.7, clip_high=0.28),
    "bnpo": PolicyLossSettings(loss_type="bnpo", beta=0.04, temperature=1.0),
    "dr_grpo": PolicyLossSettings(loss_type="dr_grpo", beta=0.0, temperature=0.7, max_completion_length=9),
    "dapo": PolicyLossSettings(
        loss_type="dapo", beta=0.04, temperature=0.7, clip_high=0.28, delta=1.5, num_items_in_batch=40.0
    ),
    "dapo-sequence": PolicyLossSettings(loss_type="dapo", beta=0.04, importance_sampling_level="sequence"),
    # TRL 1.16's other loss types and loss options (issue 19): the plain path differentiates the
    # entropy from the logits, the fused one through its gradient pass
    "cispo": PolicyLossSettings(loss_type="cispo", beta=0.04, clip_high=1.2, num_items_in_batch=40.0),
    "sapo": PolicyLossSettings(loss_type="sapo", beta=0.04, temperature=0.7, kl_bias_correction=True),
    "luspo-sequence": PolicyLossSettings(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": PolicyLossSettings(loss_type="vespo", beta=0.04, kl_bias_correction=True, temperature=0.7),
    "grpo-kl-corrected": PolicyLossSettings(loss_type="grpo", beta=0.04, kl_bias_correction=True),
    "dapo-entropy-bonus": PolicyLossSettings(loss_type="dapo", entropy_coef=0.05, temperature=0.7),
    "dapo-top-entropy": PolicyLossSettings(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.05),
    "grpo-off-policy-mask": PolicyLossSettings(loss_type="grpo", beta=0.04, off_policy_mask_threshold=0.02),
}
# The stats only some settings produce: None on both paths or equal on both.
OPTIONAL_STATS = ("cispo_clip", "vespo_phi_mean", "entropy_kept", "off_policy_kept")


@pytest.fixture(scope="module")
def model():
    tokenizer = build_tokenizer()
    return build_policy(tokenizer, seed=1, hidden_size=32), tokenizer


def make_batch(model, vocab: int, seed: int = 0) -> PolicyBatch:
    """Left-padded prompts of different lengths, completions with masked tails, advantages of both
    signs, and old/ref log-probs perturbed away from the current ones so every clip branch fires."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id=0)
    completion_ids = torch.randint(2, vocab, (4, 7), generator=g)
    lengths = torch.tensor([7, 3, 5, 1])
    completion_mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    batch = PolicyBatch(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        completion_mask.clone(),
        torch.arange(4),
        advantages=torch.tensor([1.3, -0.7, 0.4, -1.9]),
    )
    current = PolicyForward(ForwardPlan(fused=False, chunk_bytes=2**20)).score(model, batch, 1.0)
    noise = 0.4 * torch.randn(current.shape, generator=g)
    batch.old_logprobs = (current + noise) * completion_mask
    batch.ref_logprobs = (current - noise.flip(0)) * completion_mask
    return batch


def loss_and_grads(model, batch, settings, fused: bool, chunk_bytes: int):
    model.zero_grad(set_to_none=True)
    loss, stats = PolicyForward(ForwardPlan(fused=fused, chunk_bytes=chunk_bytes)).policy_loss(
        model, batch, settings
    )
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), stats, grads


@pytest.mark.parametrize("case", list(CASES))
def test_fused_and_plain_paths_agree(model, case):
    policy, tokenizer = model
    settings = CASES[case]
    batch = make_batch(policy, len(tokenizer))
    # chunk_bytes small enough that the fused path really runs several chunks
    fused = loss_and_grads(policy, batch, settings, fused=True, chunk_bytes=4 * 1024)
    plain = loss_and_grads(policy, batch, settings, fused=False, chunk_bytes=4 * 1024)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-7)
    for name in (
        "ratio_mean",
        "clip_low",
        "clip_high",
        "clip_region",
        "kl_mean",
        "entropy_mean",
        "num_items",
    ):
        torch.testing.assert_close(
            getattr(fused[1], name),
            getattr(plain[1], name),
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    for name in OPTIONAL_STATS:
        got, want = getattr(fused[1], name), getattr(plain[1], name)
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(
                got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
    assert fused[2].keys() == plain[2].keys()
    for name, grad in plain[2].items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(
            fused[2][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    # the perturbed old log-probs really exercise clipping (else the test could not see a clip bug)
    if settings.importance_sampling_level == "token":
        assert 0 < float(plain[1].clip_region) < 1
    for mask in (plain[1].entropy_kept, plain[1].off_policy_kept):  # the masks drop some, not all
        assert mask is None or 0 < float(mask) < 1


def test_the_entropy_bonus_trains_through_both_paths(model):
    """The bonus's gradient reaches the parameters on both paths (the agreement above would also
    hold if both ignored it): the change it makes is -coef times the mean entropy's gradient."""
    policy, tokenizer = model
    batch = make_batch(policy, len(tokenizer))
    base = CASES["dapo-entropy-bonus"]
    plain_forward = PolicyForward(ForwardPlan(fused=False, chunk_bytes=4 * 1024))
    logits = plain_forward.run(policy, batch).logits
    from fastppo.policy_forward import plain_token_logprobs

    _, entropy = plain_token_logprobs(logits, batch.completion_ids, base.temperature, with_entropy=True)
    mask = batch.loss_mask.float()
    policy.zero_grad(set_to_none=True)
    ((entropy * mask).sum() / mask.sum()).backward()
    entropy_grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()}
    for fused in (True, False):
        _, _, with_bonus = loss_and_grads(policy, batch, base, fused, chunk_bytes=4 * 1024)
        _, _, without = loss_and_grads(
            policy, batch, dataclasses.replace(base, entropy_coef=0.0), fused, 4 * 1024
        )
        for name, grad in entropy_grads.items():
            torch.testing.assert_close(
                with_bonus[name] - without[name], -base.entropy_coef * grad, rtol=1e-3, atol=1e-7, msg=name
            )


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_on_policy_ratio_is_exactly_one(model, fused):
    """Without recorded old log-probs the old policy is the detached current one: ratio == 1 exactly,
    and recorded log-probs from the same weights on the same batch give exactly 1 as well."""
    policy, tokenizer = model
    batch = make_batch(policy, len(tokenizer))
    settings = dataclasses.replace(CASES["dapo"], beta=0.0)
    forward = PolicyForward(ForwardPlan(fused=fused, chunk_bytes=4 * 1024))
    on_policy = dataclasses.replace(batch, old_logprobs=None)
    _, stats = forward.policy_loss(policy, on_policy, settings)
    assert float(stats.ratio_mean) == 1.0
    recorded = dataclasses.replace(batch, old_logprobs=forward.score(policy, batch, settings.temperature))
    _, stats = forward.policy_loss(policy, recorded, settings)
    assert float(stats.ratio_mean) == 1.0
    # and an off-policy record does move it (the assertion above can fail)
    _, stats = forward.policy_loss(policy, batch, settings)
    assert float(stats.ratio_mean) != 1.0


def test_masked_rows_with_extreme_recorded_logprobs_stay_finite(model):
    """A row dropped from the loss (mask_truncated_completions) may carry any recorded log-prob."""
    policy, tokenizer = model
    batch = make_batch(policy, len(tokenizer))
    batch.loss_mask[1] = 0
    batch.old_logprobs[1] = -500.0  # exp(logp + 500) overflows unless masked before the ratio
    for fused in (True, False):
        loss, _, grads = loss_and_grads(policy, batch, CASES["dapo"], fused=fused, chunk_bytes=4 * 1024)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in grads.values())


# --- padded and packed, whole model and shared trunk ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def policy_with_attention(tokenizer, attention: str):
    policy = build_policy(tokenizer, seed=1, hidden_size=32, layers=3)
    if attention == VARLEN_ATTENTION:
        register_varlen_attention()
    policy.set_attn_implementation(attention)
    return policy.train()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("attention", ["sdpa", VARLEN_ATTENTION])
def test_padding_free_loss_logprobs_and_grads_equal_padded(
    tokenizer, attention, fused, pack_calls, ragged_batch
):
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
def test_padding_free_shared_trunk_scoring_equals_padded(
    tokenizer, attention, fused, pack_calls, ragged_batch
):
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


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_policy_loss_on_a_shared_trunk_pass_equals_the_whole_forward(
    tokenizer, fused, padding_free, ragged_batch
):
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
