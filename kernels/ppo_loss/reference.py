"""PyTorch reference for the clipped-ratio policy loss with KL: the oracle, the CPU path and the
``use_fused_kernels=False`` path of the trainers.

``policy_objective`` works on per-token log-probs ``[B, T]`` only, so every path (logits in,
hidden states in, Triton or not) shares this one definition of the loss and its statistics.
Formulas follow TRL's GRPOTrainer (``_compute_loss``), with the KL log-ratio clamped.
"""

from __future__ import annotations

import dataclasses

import torch

from ..token_logprobs import token_logprobs
from .settings import KL_LOG_RATIO_CLAMP, PolicyLossSettings, loss_token_weights


@dataclasses.dataclass
class PolicyLossStats:
    """Detached per-batch statistics of one loss call: means over unmasked tokens, or over sequences
    when ratio and advantage both have one value per sequence (GSPO with [B] advantages), as TRL logs them."""

    logprobs: torch.Tensor  # [B, T] fp32 per-token log-probs of the labels (0 where masked)
    ratio_mean: torch.Tensor  # [] mean importance ratio (after delta capping)
    clip_low: torch.Tensor  # [] fraction with ratio < 1 - clip_low and advantage < 0
    clip_high: torch.Tensor  # [] fraction with ratio > 1 + clip_high and advantage > 0
    clip_region: torch.Tensor  # [] fraction clipped on either side
    kl_mean: torch.Tensor | None  # [] mean KL estimate to the reference (None without ref log-probs)
    entropy_mean: torch.Tensor | None  # [] mean entropy (None unless asked)
    num_items: torch.Tensor  # [] the count the means divide by (tokens, or sequences)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens (Schulman's k1/k2/k3): the one definition
    the losses, their kernels (which differentiate it in place) and PPO's reward shaping share.

    k3 = r - 1 - log r with r = ref / pi, written ``expm1(-x) + x`` (x = log pi/ref) so that small
    log-ratios do not cancel to zero."""
    log_ratio = (logprobs - ref_logprobs).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # log pi/ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio  # k3


def policy_objective(
    logprobs: torch.Tensor,  # [B, T] current policy, differentiable
    old_logprobs: torch.Tensor | None,  # [B, T] recorded at sampling time; None: on-policy
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T] 1 for completion tokens that count
    settings: PolicyLossSettings,
    ref_logprobs: torch.Tensor | None = None,  # [B, T] reference policy, needed when beta > 0
    entropy: torch.Tensor | None = None,  # [B, T] for the stats only
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Scalar loss and stats from per-token log-probs.

    ``old_logprobs=None`` means the batch is on-policy (the first update of a rollout): old is the
    detached current log-prob, so the ratio is exactly 1 and only its gradient acts.
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    maskf = mask.to(logprobs.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    adv = adv.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs.to(logprobs.dtype)
    if settings.importance_sampling_level == "sequence":
        # GSPO: one ratio per sequence from the mean token log-ratio; gradient reaches every token.
        log_ratio = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0))[:, None]  # [B, 1]
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - settings.clip_low, 1 + settings.upper_clip)
    if settings.delta is not None:
        ratio = torch.clamp(ratio, max=settings.delta)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [B, T] (or [B, 1] broadcast below)
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs.to(logprobs.dtype), settings.kl_estimator)
    if settings.beta != 0.0:
        if kl is None:
            raise ValueError("beta > 0 needs ref_logprobs (the reference policy's per-token log-probs)")
        per_token = per_token + settings.beta * kl
    weights = loss_token_weights(maskf, settings).to(logprobs.dtype)
    loss = (per_token * weights).sum()

    with torch.no_grad():
        low = (ratio < 1 - settings.clip_low) & (adv < 0)  # [B, T], or [B, 1] for GSPO with [B] advantages
        high = (ratio > 1 + settings.upper_clip) & (adv > 0)
        # As TRL logs them (global_masked_mean): flags with one value per sequence are averaged over
        # sequences, [B, T] ones over unmasked tokens. GSPO with [B, T] advantages has per-token
        # flags, so its ratio is then averaged per token too: every mean here divides by num_items.
        if low.shape[1] == 1:

            def mean(x: torch.Tensor) -> torch.Tensor:
                return x.float().mean()

            num_items = torch.tensor(float(low.shape[0]), device=low.device)
        else:
            count = maskf.sum().clamp(min=1.0)

            def mean(x: torch.Tensor) -> torch.Tensor:
                return (x.float() * maskf).sum() / count

            num_items = maskf.sum()
        token_count = maskf.sum().clamp(min=1.0)
        stats = PolicyLossStats(
            logprobs=logprobs.detach().float(),
            ratio_mean=mean(ratio),
            clip_low=mean(low),
            clip_high=mean(high),
            clip_region=mean(low | high),
            kl_mean=None if kl is None else (kl.float() * maskf).sum() / token_count,
            entropy_mean=None if entropy is None else (entropy.float() * maskf).sum() / token_count,
            num_items=num_items,
        )
    return loss, stats


def policy_loss_reference(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
    ref_logprobs: torch.Tensor | None = None,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Logits in: chunked reference log-probs, then ``policy_objective``. Masked labels are ignored."""
    batch, length, vocab = logits.shape
    labels = torch.where(mask.bool(), labels, -100)
    out = token_logprobs(
        logits.reshape(-1, vocab),
        labels.reshape(-1),
        temperature=settings.temperature,
        ignore_index=-100,
        return_entropy=compute_entropy,
        backend="torch",
    )
    logprobs, entropy = out if compute_entropy else (out, None)
    logprobs = logprobs.reshape(batch, length)
    entropy = None if entropy is None else entropy.reshape(batch, length)
    return policy_objective(logprobs, old_logprobs, advantages, mask, settings, ref_logprobs, entropy)
