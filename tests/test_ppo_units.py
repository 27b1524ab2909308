"""PPO's pure functions against independent float64 loops written here (fresh random inputs each run)."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo.advantages import (
    generalized_advantage_estimation,
    kl_per_token,
    masked_whiten,
    shaped_rewards,
)
from fastppo.critic import clipped_value_loss

F64 = torch.float64


def gae_loop(rewards, values, gamma, lam):
    """Textbook GAE, one row and one token at a time in Python floats."""
    b, t = len(rewards), len(rewards[0])
    adv = [[0.0] * t for _ in range(b)]
    for i in range(b):
        acc = 0.0
        for j in reversed(range(t)):
            nxt = values[i][j + 1] if j + 1 < t else 0.0
            acc = rewards[i][j] + gamma * nxt - values[i][j] + gamma * lam * acc
            adv[i][j] = acc
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    rewards, values = torch.randn(3, 7, dtype=F64), torch.randn(3, 7, dtype=F64)
    adv, ret = generalized_advantage_estimation(rewards, values, gamma, lam)
    expected = torch.tensor(gae_loop(rewards.tolist(), values.tolist(), gamma, lam), dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, expected + values, rtol=1e-12, atol=1e-12)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards, values = torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64)
    adv, ret = generalized_advantage_estimation(rewards, values, 1.0, 1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, to_go, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(adv).any()


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="rewards and values"):
        generalized_advantage_estimation(torch.zeros(2, 3), torch.zeros(2, 4), 1.0, 0.95)


def test_masked_whiten_matches_float64_formula():
    values = torch.randn(4, 6, dtype=F64) * 3 + 2
    mask = torch.rand(4, 6) > 0.3
    picked = [v for v, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / (len(picked) - 1)  # Bessel, as legacy TRL
    expected = (values - mean) / math.sqrt(var + 1e-8)
    torch.testing.assert_close(masked_whiten(values, mask), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), expected + mean)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_reward_shaping_matches_loop(estimator):
    b, t, coef = 3, 6, 0.05
    logp, ref = -torch.rand(b, t, dtype=F64) * 3, -torch.rand(b, t, dtype=F64) * 3
    scores = torch.randn(b, dtype=F64)
    last = torch.tensor([5, 0, 3])
    kl = kl_per_token(logp, ref, estimator)
    rewards, non_score = shaped_rewards(kl, scores, last, coef)
    for i in range(b):
        for j in range(t):
            lp, rp = logp[i, j].item(), ref[i, j].item()
            k = lp - rp if estimator == "k1" else math.exp(rp - lp) - 1 - (rp - lp)
            want = -coef * k + (scores[i].item() if j == last[i].item() else 0.0)
            assert rewards[i, j].item() == pytest.approx(want, abs=1e-12)
            assert non_score[i, j].item() == pytest.approx(-coef * k, abs=1e-12)
    if estimator == "k3":
        assert (kl >= 0).all()


def test_reward_shaping_rejects_bad_inputs():
    with pytest.raises(ValueError, match="estimator"):
        kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), "k2")
    with pytest.raises(ValueError, match="scores"):
        shaped_rewards(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.1)


def test_clipped_value_loss_matches_loop_and_gradient():
    b, t, eps = 4, 5, 0.2
    values = torch.randn(b, t, dtype=F64, requires_grad=True)
    old = values.detach() + torch.randn(b, t, dtype=F64) * 0.3
    returns = torch.randn(b, t, dtype=F64)
    mask = torch.rand(b, t) > 0.25
    out = clipped_value_loss(values, old, returns, mask, eps)
    out.loss.backward()
    total, clipped_count, n = 0.0, 0, int(mask.sum())
    grad = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            v, o, r = values[i, j].item(), old[i, j].item(), returns[i, j].item()
            vc = min(max(v, o - eps), o + eps)
            e1, e2 = (v - r) ** 2, (vc - r) ** 2
            total += max(e1, e2)
            clipped_count += e2 > e1
            if e2 > e1:  # gradient flows through the clipped branch only inside the clip range
                grad[i, j] = (vc - r) / n if o - eps < v < o + eps else 0.0
            else:
                grad[i, j] = (v - r) / n
    assert out.loss.item() == pytest.approx(0.5 * total / n, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(clipped_count / n, abs=1e-12)
    torch.testing.assert_close(values.grad, grad, rtol=1e-10, atol=1e-12)


def test_clipped_value_loss_rejects_bad_inputs():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cliprange_value"):
        clipped_value_loss(z, z, z, z, -0.1)
    with pytest.raises(ValueError, match="shape"):
        clipped_value_loss(z, z, torch.zeros(2, 4), z, 0.2)
