"""The policy loss on hand-worked cases: clipping written out, clip fractions counted by hand, the
KL clamp, tied embeddings. Both backends; the Triton one is interpreted on CPU. TRL parity, the
loss matrix, chunking and bad input are in tests/test_policy_loss.py and test_linear_policy_loss.py."""

from __future__ import annotations

import math

import pytest
import torch
from fastppo.kernels import fused_policy_loss, linear_ppo_loss

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
