"""Advantage estimators and the masked statistics they use: pure tensor functions, tested alone.

GRPO's group-relative advantages live here; PPO's GAE joins them (same helpers, same file).
"""

from __future__ import annotations

import torch

# Added to the std before dividing, as TRL does, so a group whose rewards are all equal gets
# advantage 0 instead of 0/0.
STD_EPS = 1e-4


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over ``dim``, or everything); 0 where nothing counts."""
    maskf = mask.to(values.dtype)
    if dim is None:
        return (values * maskf).sum() / maskf.sum().clamp(min=1.0)
    return (values * maskf).sum(dim) / maskf.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default, as PPO's whitening uses)."""
    maskf = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    count = maskf.sum()
    var = masked_mean((values - mean).square(), mask)
    if unbiased:
        if count <= 1:  # one sample has no spread; say so rather than divide by zero  (CPU sync)
            raise ValueError(
                f"masked_var needs at least 2 unmasked values for an unbiased estimate, got {int(count)}"
            )
        var = var * count / (count - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the masked entries; ``shift_mean=False`` keeps the mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN entries (torch has nanmean but no nanstd); NaN with < 2 values."""
    valid = ~torch.isnan(values)
    count = valid.sum() if dim is None else valid.sum(dim, keepdim=True)
    mean = torch.nanmean(values) if dim is None else torch.nanmean(values, dim=dim, keepdim=True)
    sq = torch.where(valid, (values - mean).square(), torch.zeros_like(values))
    total = sq.sum() if dim is None else sq.sum(dim, keepdim=True)
    std = torch.sqrt(total / (count - 1))  # count - 1 <= 0 gives inf/NaN: too few values
    std = torch.where(count > 1, std, torch.full_like(std, float("nan")))
    return std if keepdim or dim is None else std.squeeze(dim)


def group_relative_advantages(
    rewards: torch.Tensor,  # [N] one reward per completion, NaN = unscorable; N = prompts * group_size
    group_size: int,
    scale: str = "group",  # "group" | "batch" | "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages (Shao et al. 2024, eq. 3 / TRL): reward minus its group's mean, over a std.

    Completions of one prompt are consecutive. ``scale`` picks the std: the group's ("group"), the
    whole batch's ("batch", PPO-Lite), or none ("none", Dr. GRPO: no question-difficulty bias).
    NaN rewards are left out of the means/stds and get advantage 0 (no signal, no spurious push).

    Returns ``(advantages [N], std [N])``; std is the group's (or the batch's) spread, which the
    trainer logs as ``frac_reward_zero_std``.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be [N] with N a multiple of group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def normalize_then_sum_advantages(
    rewards_per_func: torch.Tensor,  # [N, F] NaN = that function did not score the sample
    weights: torch.Tensor,  # [F]
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO (TRL's ``multi_objective_aggregation="normalize_then_sum"``): normalise each reward
    function within its group, sum with the weights, then whiten over the batch.

    Returns ``(advantages [N], batch std [N])``.
    """
    n, funcs = rewards_per_func.shape
    grouped = rewards_per_func.view(-1, group_size, funcs)
    per_func = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
        nanstd(grouped, dim=1, keepdim=True) + STD_EPS
    )
    combined = (per_func.reshape(n, funcs) * weights[None, :]).nansum(dim=1)
    combined[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
    std = nanstd(combined).expand_as(combined)
    advantages = (combined - torch.nanmean(combined)) / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


# --- PPO (actor-critic) -------------------------------------------------------------------------------


def shaped_rewards(
    kl: torch.Tensor,  # [B, T] per-token KL estimate (fastppo.kernels.ppo_loss.kl_estimate)
    scores: torch.Tensor,  # [B] reward-model score of each whole completion
    last_index: torch.Tensor,  # [B] int, position that receives the score (last real token)
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Legacy TRL's per-token reward: ``-kl_coef * KL`` everywhere, plus the score at ``last_index``.

    The KL penalty is dense so every token pays for drifting from the reference; the task reward is
    sparse because the reward model judges the finished completion. Returns ``(rewards, non_score)``.
    """
    if scores.shape != kl.shape[:1] or last_index.shape != kl.shape[:1]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and last_index {tuple(last_index.shape)} must be [B] "
            f"with B = kl.shape[0] = {kl.shape[0]}"
        )
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last_index.long()] += scores.to(rewards.dtype)
    return rewards, non_score


def generalized_advantage_estimation(
    rewards: torch.Tensor,  # [B, T] per-token rewards, 0 past the end of each completion
    values: torch.Tensor,  # [B, T] value estimates, 0 past the end
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016): ``A_t = sum_k (gamma*lam)^k delta_{t+k}``, the value after the last
    position taken as 0 (legacy TRL). Returns ``(advantages, returns = advantages + values)``, unwhitened.

    A backward loop over T: T is the completion length (tens to hundreds), and each step is one
    vectorised op over the batch, so the loop costs little next to the model's forwards.
    """
    if rewards.shape != values.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards and values must both be [B, T], got {tuple(rewards.shape)} and {tuple(values.shape)}"
        )
    length = rewards.shape[1]
    advantages = torch.empty_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values
