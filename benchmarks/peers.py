"""The implementations we race against, and the textbook formulas the kernel tests take as truth.

``trl_policy_loss`` is TRL GRPOTrainer's loss written out as plain math, independent of
``policy_objective``: the eager baselines use it, and tests/test_policy_loss.py and
tests/test_linear_policy_loss.py evaluate it in float64 as ground truth, so a wrong
``policy_objective`` fails the tests instead of being copied into the oracle. Peers that are not
installed, or cannot run on this device, are reported as unavailable, never faked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from fastppo.kernels.ppo_loss import PolicyLossSettings


def eager_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """What TRL users wrote before fused kernels: log_softmax (in fp32 at least), then gather.

    bf16/fp16 logits are upcast to fp32 (the eager peer); fp64 stays fp64 (the tests' ground truth).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


@functools.cache
def compiled_token_logprobs() -> Callable:
    return torch.compile(eager_token_logprobs, dynamic=False)


@functools.cache
def compiled_policy_loss() -> Callable:
    return torch.compile(eager_policy_loss, dynamic=False)


def trl_selective_log_softmax() -> Callable | None:
    """TRL's ``selective_log_softmax`` (on CUDA, TRL 1.16 routes it to its own fused Triton kernel)."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        return None
    return selective_log_softmax


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


def eager_policy_loss(logits, labels, old, advantages, mask, settings: PolicyLossSettings, ref=None):
    """log_softmax -> gather -> TRL's loss: holds fp32 copies of the [B, T, V] logits."""
    logp = eager_token_logprobs(logits, labels, settings.temperature)
    return trl_policy_loss(logp, old, advantages, mask, settings, ref).loss


def eager_linear_policy_loss(
    hidden, weight, labels, old, advantages, mask, settings: PolicyLossSettings, ref=None
):
    """hidden @ W^T -> log_softmax -> gather -> loss: holds [N, V] logits and their fp32 copy."""
    return eager_policy_loss(F.linear(hidden, weight), labels, old, advantages, mask, settings, ref)


def liger_linear_grpo_loss(settings: PolicyLossSettings) -> Callable | None:
    """Liger-Kernel's chunked fused-linear GRPO loss (0.8.5 API) with our settings, or None when
    unavailable."""
    if not torch.cuda.is_available():
        return None  # its chunks run through torch.compile; a CPU timing would say nothing
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    loss_module = LigerFusedLinearGRPOLoss(
        beta=settings.beta,
        use_ref_model=settings.beta != 0.0,
        epsilon_low=settings.clip_low,
        epsilon_high=settings.upper_clip,
        loss_type=settings.loss_type,
        max_completion_length=settings.max_completion_length,
        importance_sampling_level=settings.importance_sampling_level,
        temperature=settings.temperature,
        delta=settings.delta,
    )

    def run(hidden, weight, labels, old, advantages, mask, ref=None):
        # forward(_input [B, T, H], lin_weight [V, H], selected_token_ids, attention_mask, advantages, ...)
        out = loss_module(
            hidden,
            weight,
            labels,
            mask,
            advantages,
            ref_per_token_logps=ref,
            old_per_token_logps=old,
            num_items_in_batch=settings.num_items_in_batch,
        )
        return out[0] if isinstance(out, tuple) else out

    return run
