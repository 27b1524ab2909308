"""Advantage estimators and masked statistics against hand-worked values and float64 references:
GRPO's group-relative advantages, and PPO's reward shaping and GAE against independent float64 loops
written here (fresh random inputs each run)."""

from __future__ import annotations

import math

import pytest
import torch
from fastppo.kernels.ppo_loss import kl_estimate

from fastppo.advantages import (
    STD_EPS,
    generalized_advantage_estimation,
    group_relative_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    nanstd,
    normalize_then_sum_advantages,
    shaped_rewards,
)


def test_group_relative_hand_worked():
    # group 1: rewards 1, 0 -> mean 0.5, std (Bessel) sqrt(0.5); group 2: 2, 2 -> zero spread
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])
    adv, std = group_relative_advantages(rewards, group_size=2, scale="group")
    s = math.sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([0.5 / (s + STD_EPS), -0.5 / (s + STD_EPS), 0.0, 0.0]))
    torch.testing.assert_close(std, torch.tensor([s, s, 0.0, 0.0]))
    adv_none, _ = group_relative_advantages(rewards, group_size=2, scale="none")
    torch.testing.assert_close(adv_none, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    adv_batch, std_batch = group_relative_advantages(rewards, group_size=2, scale="batch")
    batch_std = torch.tensor([1.0, 0.0, 2.0, 2.0], dtype=torch.float64).std().item()
    torch.testing.assert_close(std_batch, torch.full((4,), batch_std, dtype=torch.float32))
    torch.testing.assert_close(adv_batch, adv_none / (batch_std + STD_EPS))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_relative_matches_float64_reference(scale):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(6 * 5, generator=g)
    adv, _ = group_relative_advantages(rewards, group_size=5, scale=scale)
    r = rewards.double().view(6, 5)
    expected = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        expected = expected / (r.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        expected = expected / (r.std() + STD_EPS)
    torch.testing.assert_close(adv, expected.reshape(-1).float(), rtol=1e-5, atol=1e-6)


def test_nan_rewards_are_left_out_and_get_zero_advantage():
    rewards = torch.tensor([1.0, float("nan"), 0.0, float("nan"), float("nan"), float("nan")])
    adv, _ = group_relative_advantages(rewards, group_size=3)
    # group 1 from {1, 0} only; the unscorable completion and the all-NaN group get 0
    s = math.sqrt(0.5)
    torch.testing.assert_close(
        adv, torch.tensor([0.5 / (s + STD_EPS), 0.0, -0.5 / (s + STD_EPS), 0.0, 0.0, 0.0])
    )


def test_group_relative_rejects_bad_shapes_and_scales():
    with pytest.raises(ValueError, match="group_size=4"):
        group_relative_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale"):
        group_relative_advantages(torch.zeros(4), group_size=2, scale="global")


def test_nanstd_matches_torch_std_without_nans():
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(nanstd(x), x.std())
    torch.testing.assert_close(nanstd(x, dim=1), x.std(dim=1))
    x[0, :6] = float("nan")  # one value left: no spread to measure
    assert torch.isnan(nanstd(x, dim=1)[0])
    torch.testing.assert_close(nanstd(x, dim=1)[1:], x[1:].std(dim=1))


def test_masked_statistics_match_selected_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 8, generator=g) > 0.4
    picked = x[mask]
    torch.testing.assert_close(masked_mean(x, mask), picked.mean())
    torch.testing.assert_close(
        masked_mean(x, mask, dim=1), torch.stack([x[i][mask[i]].mean() for i in range(3)])
    )
    torch.testing.assert_close(masked_var(x, mask), picked.var())
    whitened = masked_whiten(x, mask)
    torch.testing.assert_close(
        whitened[mask].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        whitened[mask].var(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0
    )
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask].mean(), picked.mean())
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), True)[:1])


def test_normalize_then_sum_hand_worked():
    # two functions, one group of 2: each normalised by its own group std, summed, whitened
    per_func = torch.tensor([[1.0, 30.0], [0.0, 10.0]])
    adv, _ = normalize_then_sum_advantages(per_func, torch.tensor([1.0, 1.0]), group_size=2)
    s = math.sqrt(0.5)
    z1 = 0.5 / (s + STD_EPS)  # function 1: +-0.5 / std
    z2 = 10.0 / (math.sqrt(200.0) + STD_EPS)  # function 2: +-10 / std
    combined = torch.tensor([z1 + z2, -z1 - z2], dtype=torch.float64)
    expected = (combined - combined.mean()) / (combined.std() + STD_EPS)
    torch.testing.assert_close(adv, expected.float(), rtol=1e-5, atol=1e-6)


# --- PPO (actor-critic) -------------------------------------------------------------------------------

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
    kl = kl_estimate(logp, ref, estimator)
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
    with pytest.raises(ValueError, match="scores"):
        shaped_rewards(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.1)
