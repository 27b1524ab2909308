"""The policy loss on hand-worked cases, counted statistics, TRL parity, tied embeddings, the KL
clamp and bad input. Where a case runs on both backends, the Triton one is interpreted on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from fastppo.kernels import fused_policy_loss, linear_ppo_loss
from fastppo.kernels.ppo_loss import PolicyLossSettings, policy_objective

BACKENDS = ["torch", "triton"]


def logits_for(logprobs: torch.Tensor, vocab: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] whose label (id 0) has exactly the given log-prob (the rest share the remainder)."""
    p = logprobs.double().exp()
    rest = ((1 - p) / (vocab - 1)).log()
    logits = rest[..., None].expand(*logprobs.shape, vocab).clone()
    logits[..., 0] = logprobs.double()
    return logits.float(), torch.zeros(logprobs.shape, dtype=torch.long)


# (ratio, advantage) -> expected per-token loss -min(r A, clip(r) A) with eps_low 0.2, eps_high 0.28.
HAND_WORKED = [
    (1.5, 1.0, -1.28),  # above 1 + eps_high, A > 0: clipped at 1.28
    (1.5, -1.0, 1.5),  # above, A < 0: the unclipped term is the min: 1.5
    (0.5, 1.0, -0.5),  # below 1 - eps_low, A > 0: unclipped 0.5
    (0.5, -1.0, 0.8),  # below, A < 0: clipped at 0.8
    (1.1, 2.0, -2.2),  # inside the region: r A
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio, advantage, expected", HAND_WORKED)
def test_hand_worked_clipping(backend, ratio, advantage, expected):
    logp = torch.tensor([[-1.0]])
    logits, labels = logits_for(logp)
    old = logp - math.log(ratio)
    loss, stats = fused_policy_loss(
        logits,
        labels,
        old,
        torch.tensor([advantage]),
        torch.ones(1, 1),
        clip_low=0.2,
        clip_high=0.28,
        backend=backend,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    clipped_high = ratio > 1.28 and advantage > 0
    clipped_low = ratio < 0.8 and advantage < 0
    assert stats.clip_high.item() == float(clipped_high)
    assert stats.clip_low.item() == float(clipped_low)
    assert stats.clip_region.item() == float(clipped_high or clipped_low)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_fractions_by_counting(backend):
    ratios = torch.tensor([[1.5, 0.5, 1.0, 1.4], [0.7, 1.3, 1.05, 0.6]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    logp = torch.full((2, 4), -2.0)
    logits, labels = logits_for(logp)
    _, stats = fused_policy_loss(
        logits, labels, logp - ratios.log(), advantages, mask, clip_low=0.2, clip_high=0.28, backend=backend
    )
    high = [(1.5, 1.0), (1.3, 1.0)]  # ratio > 1.28 with A > 0, unmasked
    low = [(0.5, -1.0), (0.7, -1.0)]  # ratio < 0.8 with A < 0 (0.6 is masked out)
    assert stats.clip_high.item() == pytest.approx(len(high) / 7)
    assert stats.clip_low.item() == pytest.approx(len(low) / 7)
    assert stats.clip_region.item() == pytest.approx(4 / 7)
    assert stats.num_items.item() == 7


def trl_loss(logp, old, advantages, mask, ref, *, eps_low, eps_high, beta, loss_type, level, max_len, items):
    """TRL 1.16 GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py, lines 3083-3172), transcribed
    verbatim for the loss types fastppo supports; `normalizer` there is 1 (no accumulation, 1 process)."""
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logp - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    return (per_token_loss * mask).sum() / items  # dapo


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_parity_with_trl_loss_formula(loss_type, level):
    pytest.importorskip("trl")
    batch, length = 4, 6
    logp = (-torch.rand(batch, length) * 3).double().requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(batch, length, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(batch, length, dtype=torch.float64)
    advantages = torch.randn(batch, dtype=torch.float64)
    mask = (torch.rand(batch, length) > 0.3).double()
    settings = PolicyLossSettings(
        clip_low=0.2,
        clip_high=0.28,
        beta=0.04,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=10,
        num_items_in_batch=17.0,
    )
    ours, _ = policy_objective(logp, old, advantages, mask, settings, ref)
    theirs = trl_loss(
        logp,
        old,
        advantages,
        mask,
        ref,
        eps_low=0.2,
        eps_high=0.28,
        beta=0.04,
        loss_type=loss_type,
        level=level,
        max_len=10,
        items=17.0,
    )
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert torch.allclose(
        torch.autograd.grad(ours, logp)[0], torch.autograd.grad(theirs, logp)[0], rtol=1e-12
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_with_huge_log_ratio_stays_finite(backend, estimator):
    logits = torch.randn(2, 3, 50)
    labels = torch.randint(0, 50, (2, 3))
    ref = torch.tensor([[-120.0, 0.0, -3.0], [100.0, -3.0, -80.0]])  # log-ratios around +-100
    x = logits.clone().requires_grad_()
    loss, stats = fused_policy_loss(
        x,
        labels,
        torch.full((2, 3), -4.0),
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 3),
        ref_logprobs=ref,
        beta=0.1,
        kl_estimator=estimator,
        backend=backend,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats.kl_mean) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradient_accumulates_into_the_shared_parameter(backend):
    embedding = torch.nn.Embedding(61, 16)
    ids = torch.randint(0, 61, (2, 5))
    hidden = embedding(ids) * 1.5  # the embedding is used twice: as input and as lm_head
    old = torch.full((2, 5), -4.0)
    loss, _ = linear_ppo_loss(
        hidden, embedding.weight, ids, old, torch.tensor([1.0, -0.5]), torch.ones(2, 5), backend=backend
    )
    loss.backward()
    tied = embedding.weight.grad.clone()
    # Same loss with an untied copy of the head: the shared grad is the sum of both uses.
    embedding.weight.grad = None
    head = embedding.weight.detach().clone().requires_grad_()
    loss2, _ = linear_ppo_loss(
        embedding(ids) * 1.5, head, ids, old, torch.tensor([1.0, -0.5]), torch.ones(2, 5), backend=backend
    )
    loss2.backward()
    assert torch.allclose(tied, embedding.weight.grad + head.grad, atol=1e-6)


def test_chunk_size_does_not_change_the_result():
    hidden = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 101, (3, 7))
    args = (
        weight,
        labels,
        torch.full((3, 7), -4.6, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
        torch.ones(3, 7),
    )
    one_chunk, _ = linear_ppo_loss(hidden, *args, chunk_bytes=2**30)
    grads = torch.autograd.grad(one_chunk, (hidden, weight))
    many, _ = linear_ppo_loss(hidden, *args, chunk_bytes=101 * 20 * 3)  # a few rows per chunk
    assert torch.allclose(one_chunk, many, rtol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(many, (hidden, weight)), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


GOOD = dict(
    logits=torch.randn(2, 3, 11),
    labels=torch.zeros(2, 3, dtype=torch.long),
    old_logprobs=torch.zeros(2, 3),
    advantages=torch.zeros(2),
    mask=torch.ones(2, 3),
)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(old_logprobs=torch.zeros(2, 4)), r"old_logprobs has shape \(2, 4\), expected \(2, 3\)"),
        (dict(mask=torch.ones(3, 3)), r"mask has shape \(3, 3\)"),
        (dict(advantages=torch.zeros(3)), r"advantages has shape \(3,\)"),
        (dict(advantages=torch.tensor([0.0, float("nan")])), "advantages contains NaN"),
        (dict(labels=torch.full((2, 3), 11)), "label 11 is outside the vocabulary"),
        (dict(clip_low=0.0), "clip_low must be a finite number > 0, got 0.0"),
        (dict(clip_high=-0.1), "clip_high must be"),
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(importance_sampling_level="batch"), "importance_sampling_level must be one of"),
        (dict(beta=0.1), "beta=0.1 > 0 needs ref_logprobs"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(logits=torch.randn(2, 3)), "logits must be"),
    ],
)
def test_bad_input_names_the_value(change, message):
    args = {**GOOD, **change}
    tensors = [args.pop(name) for name in ("logits", "labels", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match=message):
        fused_policy_loss(*tensors, **args)


def test_linear_bad_input_names_the_value():
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 8"):
        linear_ppo_loss(
            torch.randn(2, 3, 8),
            torch.randn(11, 9),
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.ones(2, 3),
        )
