"""The policy loss on hand-worked cases: clipping written out, clip fractions counted by hand, the
KL clamp, tied embeddings. Both backends; the Triton one is interpreted on CPU. TRL parity, the
loss matrix, chunking and bad input are in tests/kernels/test_ppo_loss.py and test_linear_ppo_loss.py."""

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


def logp_grad(backend: str, logp: torch.Tensor, old, advantages, mask=None, **settings):
    """(loss, stats, dLoss/dlogp) of one call on logits built for ``logp`` (label id 0): the
    gradient w.r.t. the label's log-prob is read off the logits' gradient at the label,
    d/dz_0 = dL/dlogp (1 - p_0) (the other logits move only the normaliser)."""
    logits, labels = logits_for(logp)
    x = logits.clone().requires_grad_()
    mask = torch.ones(logp.shape) if mask is None else mask
    loss, stats = fused_policy_loss(x, labels, old, advantages, mask, backend=backend, **settings)
    loss.backward()
    return loss, stats, x.grad[..., 0] / (1 - logp.exp())


# (ratio, advantage) -> the cispo per-token loss -min(r, cap) A logp at logp = -1, cap 1.3
CISPO = [(1.5, 2.0, 2.6), (1.2, 2.0, 2.4), (0.5, -1.0, -0.5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio, advantage, expected", CISPO)
def test_hand_worked_cispo(backend, ratio, advantage, expected):
    """The ratio is capped (never floored) and detached: the loss is -min(r, cap) A logp, its
    gradient -min(r, cap) A; the clip fraction counts r above the cap with A > 0."""
    logp = torch.tensor([[-1.0]])
    loss, stats, grad = logp_grad(
        backend, logp, logp - math.log(ratio), torch.tensor([advantage]), loss_type="cispo", clip_high=1.3
    )
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert grad.item() == pytest.approx(-min(ratio, 1.3) * advantage, rel=1e-4)
    assert stats.cispo_clip.item() == float(ratio > 1.3 and advantage > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio, advantage", [(1.0, 1.0), (1.0, -2.0), (1.6, 1.0), (0.5, -1.0)])
def test_hand_worked_sapo_gate(backend, ratio, advantage):
    """-sigmoid(tau (r - 1)) 4 / tau A with tau 1 for A > 0, 1.05 otherwise; at r = 1 its slope is
    PPO's (dL/dlogp = -A), off it the gate flattens instead of cutting off."""
    tau = 1.0 if advantage > 0 else 1.05
    gate = 1 / (1 + math.exp(-tau * (ratio - 1)))
    logp = torch.tensor([[-1.0]])
    loss, _, grad = logp_grad(
        backend, logp, logp - math.log(ratio), torch.tensor([advantage]), loss_type="sapo"
    )
    assert loss.item() == pytest.approx(-gate * 4 / tau * advantage, abs=1e-5)
    assert grad.item() == pytest.approx(-4 * advantage * ratio * gate * (1 - gate), rel=1e-4)
    if ratio == 1.0:
        assert grad.item() == pytest.approx(-advantage, rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_vespo_weight(backend):
    """phi(w) = e^lam w^k e^(-lam w) of the sequence ratio w = exp(sum of its token log-ratios):
    1 on-policy, so vespo starts as plain -A logp; (k, lam) = (2, 3) for A >= 0, (3, 2) below."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    log_ratios = torch.tensor([[0.1, 0.2], [0.1, -0.4]])
    advantages = torch.tensor([1.0, -1.0])
    _, stats, grad = logp_grad(backend, logp, logp - log_ratios, advantages, loss_type="vespo")
    phi = [math.exp(3 + 2 * 0.3 - 3 * math.exp(0.3)), math.exp(2 + 3 * -0.3 - 2 * math.exp(-0.3))]
    expected = torch.tensor([[-phi[0], -phi[0]], [phi[1], phi[1]]]) / 4  # -phi A, over 4 tokens
    assert torch.allclose(grad.float(), expected, rtol=1e-4)
    assert stats.vespo_phi_mean.item() == pytest.approx(sum(phi) / 2, rel=1e-5)
    _, _, on_policy = logp_grad(backend, logp, None, advantages, loss_type="vespo")
    assert torch.allclose(on_policy.float(), -advantages[:, None].expand(2, 2) / 4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_policy_mask_drops_only_stale_sequences_with_negative_advantage(backend):
    """A sequence is dropped when its advantage is < 0 and its mean KL(old || current) exceeds the
    threshold; positive advantages and fresh sequences stay, whatever their KL."""
    logp = torch.full((3, 2), -1.0)
    stale = torch.tensor([[0.5, 0.3], [0.5, 0.3], [0.05, 0.05]])  # old - current: mean 0.4, 0.4, 0.05
    advantages = torch.tensor([-1.0, 1.0, -1.0])
    _, stats, grad = logp_grad(
        backend, logp, logp + stale, advantages, loss_type="bnpo", off_policy_mask_threshold=0.1
    )
    assert (grad[0] == 0).all() and (grad[1] != 0).all() and (grad[2] != 0).all()
    assert stats.off_policy_kept.item() == pytest.approx(2 / 3)


def entropy_logits(live: list[int], vocab: int = 8) -> torch.Tensor:
    """[1, len(live), V] logits whose row t is uniform over live[t] tokens: entropy ln(live[t])."""
    logits = torch.full((1, len(live), vocab), -1e4)
    for t, k in enumerate(live):
        logits[0, t, :k] = 0.0
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_high_entropy_mask_keeps_the_top_quantile_and_ties(backend):
    """TRL's rule: tokens at or above the quantile of the unmasked entropies stay; ties at the
    threshold stay together; masked tokens never count, and with none unmasked nothing is trained."""
    live = [2, 8, 4, 8, 2, 1]  # entropies ln 2, ln 8, ln 4, ln 8, ln 2, 0; the last is masked
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    logits = entropy_logits(live)
    labels = torch.zeros(1, 6, dtype=torch.long)
    old = torch.full((1, 6), -1.0)
    settings = dict(loss_type="bnpo", top_entropy_quantile=0.25, backend=backend)
    x = logits.clone().requires_grad_()
    loss, stats = fused_policy_loss(x, labels, old, torch.tensor([1.0]), mask, **settings)
    loss.backward()
    # the 0.75 quantile of [ln2, ln2, ln4, ln8, ln8] is ln 8 itself: both ln 8 tokens (a tie at the
    # threshold) train, nothing else
    trained = x.grad.abs().sum(-1)[0] > 0
    assert trained.tolist() == [False, True, False, True, False, False]
    assert stats.entropy_kept.item() == pytest.approx(2 / 5)
    y = logits.clone().requires_grad_()
    loss, stats = fused_policy_loss(y, labels, old, torch.tensor([1.0]), torch.zeros(1, 6), **settings)
    loss.backward()
    assert loss.item() == 0.0 and (y.grad == 0).all() and stats.entropy_kept.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_bonus_raises_entropy(backend):
    """loss -= coef * mean entropy: one gradient step on a bonus alone moves every row toward
    uniform (the mean entropy rises), and its value is -coef * mean H by hand."""
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 3.0, -2.0]]])
    labels = torch.zeros(1, 2, dtype=torch.long)
    mask = torch.ones(1, 2)
    x = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    # on-policy with advantage 0: the policy term is 0, only the bonus remains
    loss, _ = fused_policy_loss(x, labels, None, torch.zeros(1), mask, entropy_coef=0.5, backend=backend)
    assert loss.item() == pytest.approx(-0.5 * entropy.mean().item(), rel=1e-5)
    loss.backward()
    stepped = torch.log_softmax(logits - 0.1 * x.grad, -1)
    assert (-(stepped.exp() * stepped).sum(-1)).mean() > entropy.mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_bias_correction_differentiates_the_ratio_even_on_policy(backend, estimator):
    """kl * r with r = exp(logp - old) differentiable: on-policy (r = 1, A = 0) the KL gradient is
    beta (kl'(x) + kl(x)) instead of beta kl'(x), x = logp - ref (TRL's use_bias_correction_kl)."""
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    x = 0.5
    kl, dkl = {"k1": (x, 1.0), "k2": (x * x / 2, x), "k3": (math.exp(-x) + x - 1, 1 - math.exp(-x))}[
        estimator
    ]
    for correction, expected in ((False, 0.1 * dkl), (True, 0.1 * (dkl + kl))):
        _, stats, grad = logp_grad(
            backend,
            logp,
            None,
            torch.zeros(1),
            beta=0.1,
            ref_logprobs=ref,
            kl_estimator=estimator,
            kl_bias_correction=correction,
        )
        assert grad.item() == pytest.approx(expected, rel=1e-4)
        assert stats.kl_mean.item() == pytest.approx(kl, rel=1e-5)


# How each loss type's halves add up to the whole batch (TRL's accumulation): a global token count
# (num_items_in_batch = the whole batch's) sums them; per-sequence means and dr_grpo's B * L are
# averaged (the trainer divides by the accumulation steps). bnpo's local token mean does neither.
ACCUMULATION = {
    "dapo": 1.0,
    "cispo": 1.0,
    "vespo": 1.0,
    "grpo": 0.5,
    "sapo": 0.5,
    "luspo": 0.5,
    "dr_grpo": 0.5,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", list(ACCUMULATION))
def test_two_half_batches_update_like_the_whole_batch(backend, loss_type):
    """8 sequences at once equal 4 + 4 (the 8 x 1 vs 4 x 2 trap, TRL #3021): loss and gradient."""
    logits = torch.randn(8, 5, 40) * 2
    labels = torch.randint(0, 40, (8, 5))
    mask = (torch.rand(8, 5) > 0.3).float()
    mask[:, 0] = 1
    old = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] + 0.3 * torch.randn(8, 5)
    advantages = torch.randn(8)
    settings = dict(
        loss_type=loss_type,
        clip_high=1.3 if loss_type == "cispo" else 0.28,
        num_items_in_batch=mask.sum().item(),
        max_completion_length=5,
        backend=backend,
    )
    x = logits.clone().requires_grad_()
    whole, _ = fused_policy_loss(x, labels, old, advantages, mask, **settings)
    whole.backward()
    parts = []
    for half in (slice(0, 4), slice(4, 8)):
        y = logits[half].clone().requires_grad_()
        loss, _ = fused_policy_loss(y, labels[half], old[half], advantages[half], mask[half], **settings)
        (loss * ACCUMULATION[loss_type]).backward()
        parts.append((loss * ACCUMULATION[loss_type], y.grad))
    assert whole.item() == pytest.approx(sum(p[0].item() for p in parts), rel=1e-5, abs=1e-7)
    assert torch.allclose(x.grad, torch.cat([p[1] for p in parts]), rtol=1e-5, atol=1e-7)
