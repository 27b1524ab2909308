"""The fused path (hidden states -> chunked kernel) and the plain path (full logits -> log_softmax ->
policy_objective) must give the same loss, statistics and parameter gradients for every loss type
(field note 2: Liger's fused GRPO loss drifted from the plain one silently).

fp32 throughout; the paths differ only in summation order (chunked lm_head, fused backward), so
losses agree to 1e-5 relative and gradients to rtol 1e-4 / atol 1e-6.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fastppo.kernels.ppo_loss import PolicyLossSettings

from fastppo.batch import PolicyBatch
from fastppo.config import ForwardPlan
from fastppo.demo import build_policy, build_tokenizer
from fastppo.policy_forward import PolicyForward
from fastppo.rollout import left_pad

CASES = {
    "grpo": PolicyLossSettings(loss_type="grpo", beta=0.04, temperature=0.7, clip_high=0.28),
    "bnpo": PolicyLossSettings(loss_type="bnpo", beta=0.04, temperature=1.0),
    "dr_grpo": PolicyLossSettings(loss_type="dr_grpo", beta=0.0, temperature=0.7, max_completion_length=9),
    "dapo": PolicyLossSettings(
        loss_type="dapo", beta=0.04, temperature=0.7, clip_high=0.28, delta=1.5, num_items_in_batch=40.0
    ),
    "dapo-sequence": PolicyLossSettings(loss_type="dapo", beta=0.04, importance_sampling_level="sequence"),
}


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
    assert fused[2].keys() == plain[2].keys()
    for name, grad in plain[2].items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(
            fused[2][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    # the perturbed old log-probs really exercise clipping (else the test could not see a clip bug)
    if settings.importance_sampling_level == "token":
        assert 0 < float(plain[1].clip_region) < 1


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
