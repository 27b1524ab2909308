"""TRL GRPOTrainer's loss written out as plain math, independent of ``policy_objective``.

The float64 ground truth of tests/test_policy_loss.py and test_linear_policy_loss.py, and the
loss of the benchmarks' eager baselines: a wrong ``policy_objective`` fails the tests instead of
being copied into the oracle. Read from TRL 1.16's ``GRPOTrainer._compute_loss``
(trl/trainer/grpo_trainer.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .settings import PolicyLossSettings


class TrlLossTerms(NamedTuple):
    """The loss and the per-token terms TRL logs its metrics from."""

    loss: torch.Tensor  # []
    coef_1: torch.Tensor  # [B, T] ([B, 1] at sequence level): ratio after the delta cap
    advantages: torch.Tensor  # [B, 1] or [B, T]
    per_token_kl: torch.Tensor | None  # [B, T], None without ref log-probs


def trl_policy_loss(
    logp: torch.Tensor,  # [B, T] current policy, differentiable
    old: torch.Tensor | None,  # [B, T]; None: on-policy (old = logp.detach(), as TRL does)
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T]
    settings: PolicyLossSettings,
    ref: torch.Tensor | None = None,  # [B, T]
) -> TrlLossTerms:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) as plain math, for the
    grpo / bnpo / dr_grpo / dapo loss types with one process and no gradient accumulation (TRL's
    ``normalizer`` = 1). TRL has only the k3 KL estimator; k1 (log r) and k2 ((log r)^2 / 2) are
    Schulman's, in the same place. Unlike fastppo, no clamp of the KL log-ratio.
    """
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(logp.dtype)
    old = logp.detach() if old is None else old.to(logp.dtype)
    log_ratio = logp - old
    if settings.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = None
    if ref is not None:
        d = ref.to(logp.dtype) - logp  # log ref/pi
        if settings.kl_estimator == "k3":
            per_token_kl = torch.exp(d) - d - 1
        elif settings.kl_estimator == "k2":
            per_token_kl = 0.5 * d**2
        else:
            per_token_kl = -d
    coef_2 = torch.clamp(coef_1, 1 - settings.clip_low, 1 + settings.upper_clip)
    if settings.delta is not None:
        coef_1 = torch.clamp(coef_1, max=settings.delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if settings.beta != 0.0:
        per_token_loss = per_token_loss + settings.beta * per_token_kl
    if settings.loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif settings.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif settings.loss_type == "dr_grpo":
        max_len = settings.max_completion_length or mask.shape[1]
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    else:  # dapo; TRL passes num_items_in_batch, fastppo's default is the batch's token count
        items = settings.num_items_in_batch
        loss = (per_token_loss * mask).sum() / (mask.sum().clamp(min=1.0) if items is None else items)
    return TrlLossTerms(loss, coef_1, advantages, per_token_kl)
