"""TRL GRPOTrainer's loss written out as plain math, independent of ``policy_objective``.

The float64 ground truth of tests/kernels/test_ppo_loss.py and test_linear_ppo_loss.py, and the
loss of the benchmarks' eager baselines: a wrong ``policy_objective`` fails the tests instead of
being copied into the oracle. Read from TRL 1.16's ``GRPOTrainer._compute_loss``
(trl/trainer/grpo_trainer.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .settings import PolicyLossSettings


class TrlLossTerms(NamedTuple):
    """The loss and the per-token terms TRL logs its metrics from."""

    loss: torch.Tensor  # []
    coef_1: (
        torch.Tensor
    )  # [B, T] ([B, 1] at sequence level): ratio, after the delta cap in the clipped family
    advantages: torch.Tensor  # [B, 1] or [B, T]
    per_token_kl: torch.Tensor | None  # [B, T] (times the ratio with bias correction); None without ref
    phi_seq: torch.Tensor | None = None  # [B, 1] vespo's gamma weights
    entropy_mask: torch.Tensor | None = None  # [B, T] bool, top_entropy_quantile < 1
    off_policy_mask: torch.Tensor | None = None  # [B, 1] off_policy_mask_threshold set


def trl_policy_loss(
    logp: torch.Tensor,  # [B, T] current policy, differentiable
    old: torch.Tensor | None,  # [B, T]; None: on-policy (old = logp.detach(), as TRL does)
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T]
    settings: PolicyLossSettings,
    ref: torch.Tensor | None = None,  # [B, T]
    entropies: torch.Tensor | None = None,  # [B, T] differentiable; for the entropy bonus and mask
) -> TrlLossTerms:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) as plain math, with one
    process, no gradient accumulation (TRL's ``normalizer`` = 1), no vLLM, a static entropy
    coefficient. TRL has only the k3 KL estimator; k1 (log r) and k2 ((log r)^2 / 2) are
    Schulman's, in the same place. Unlike fastppo, no clamp of the KL log-ratio.
    """
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(logp.dtype)
    old = logp.detach() if old is None else old.to(logp.dtype)
    entropy_mask = None
    if settings.top_entropy_quantile < 1.0:  # get_high_entropy_mask
        local = entropies.detach()[mask.bool()].float()
        if local.numel() == 0:
            entropy_mask = torch.zeros_like(entropies, dtype=torch.bool)
        else:
            threshold = torch.quantile(local, 1 - settings.top_entropy_quantile)
            entropy_mask = ((entropies.detach() * mask) >= threshold) & mask.bool()
    off_mask = None
    if settings.off_policy_mask_threshold is not None:  # get_off_policy_mask, sampling logps = old
        kl_div = torch.nan_to_num(old - logp.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        off_mask = ((advantages >= 0) | (avg_seq_kl <= settings.off_policy_mask_threshold)).to(mask.dtype)
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
        if settings.kl_bias_correction:
            per_token_kl = per_token_kl * coef_1
    epsilon_high = settings.upper_clip
    phi_seq = None
    if settings.loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * logp
    elif settings.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - settings.clip_low, 1 + epsilon_high)
        if settings.delta is not None:
            coef_1 = torch.clamp(coef_1, max=settings.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif settings.loss_type == "sapo":
        temperatures = torch.where(
            advantages > 0, settings.sapo_temperature_pos, settings.sapo_temperature_neg
        )
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    else:  # vespo: get_gamma_weights, no importance-sampling correction
        with torch.no_grad():
            lower_clamp = math.log(1e-8)
            seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
            log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
            is_nonneg_adv = advantages >= 0
            k_seq = torch.where(is_nonneg_adv, settings.vespo_k_pos, settings.vespo_k_neg)
            lambda_seq = torch.where(is_nonneg_adv, settings.vespo_lambda_pos, settings.vespo_lambda_neg)
            lambda_seq = lambda_seq.clamp(min=1e-4)
            log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * torch.exp(log_w_seq)
            phi_seq = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi_seq * advantages * logp
    if off_mask is not None:
        per_token_loss = per_token_loss * off_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if settings.beta != 0.0:
        per_token_loss = per_token_loss + settings.beta * per_token_kl
    items = settings.num_items_in_batch  # TRL passes it; fastppo's default is the batch's token count
    if settings.loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif settings.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif settings.loss_type == "dr_grpo":
        max_len = settings.max_completion_length or mask.shape[1]
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    elif settings.loss_type in ("cispo", "dapo", "vespo"):
        loss = (per_token_loss * mask).sum() / (mask.sum().clamp(min=1.0) if items is None else items)
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()
    if settings.entropy_coef != 0.0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
        loss = loss - settings.entropy_coef * entropy_loss
    return TrlLossTerms(loss, coef_1, advantages, per_token_kl, phi_seq, entropy_mask, off_mask)
