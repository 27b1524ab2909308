"""The critic's loss: PPO's clipped value loss (legacy TRL PPOTrainer), a pure tensor function."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .advantages import masked_mean


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # scalar, already halved (0.5 * mean squared error), not yet scaled by vf_coef
    clipfrac: torch.Tensor  # scalar, fraction of tokens where the clipped error was the larger one


def clipped_value_loss(
    values: torch.Tensor,  # [B, T] current value predictions (with grad)
    old_values: torch.Tensor,  # [B, T] predictions recorded at rollout time
    returns: torch.Tensor,  # [B, T] GAE returns
    mask: torch.Tensor,  # [B, T] 1 where the token counts
    cliprange_value: float,
) -> ValueLoss:
    """``0.5 * masked_mean(max((v - R)^2, (clip(v, v_old +- eps) - R)^2))``.

    Clipping keeps one rollout's many epochs from moving the value far from where it was recorded, the
    same trust region the policy gets; taking the max makes the clipped branch a pessimistic bound.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            "values, old_values, returns and mask must share one [B, T] shape, got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    if cliprange_value < 0:
        raise ValueError(f"cliprange_value must be >= 0, got {cliprange_value!r}")
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    plain_err = (values - returns).square()
    clipped_err = (clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(plain_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > plain_err).to(values.dtype), mask)
    return ValueLoss(loss, clipfrac.detach())
