"""PyTorch reference for the clipped-ratio policy loss with KL: the oracle, the CPU path and the
``use_fused_kernels=False`` path of the trainers.

``policy_objective`` works on per-token log-probs ``[B, T]`` only, so every path (logits in,
hidden states in, Triton or not) shares this one definition of the loss and its statistics.
Formulas follow TRL's GRPOTrainer (``_compute_loss``), with the KL log-ratio clamped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..token_logprobs import token_logprobs
from .settings import CLIPPED_LOSS_TYPES, KL_LOG_RATIO_CLAMP, PolicyLossSettings, loss_token_weights


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
    cispo_clip: torch.Tensor | None = None  # [] cispo: fraction with ratio > its cap and advantage > 0
    vespo_phi_mean: torch.Tensor | None = None  # [] vespo: mean sequence gamma weight
    entropy_kept: torch.Tensor | None = None  # [] top_entropy_quantile: fraction of tokens trained on
    # [] mean entropy of the tokens the policy term acts on (all unmasked ones without the
    # high-entropy mask): the entropy bonus's value, what TRL's adaptive controller measures
    acting_entropy_mean: torch.Tensor | None = None
    off_policy_kept: torch.Tensor | None = None  # [] off_policy_mask_threshold: fraction of sequences kept


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


Gather = Callable[[torch.Tensor], torch.Tensor]  # 1-D values of this process -> of every process


def high_entropy_mask(
    entropy: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    quantile: float,  # keep tokens at or above this quantile of the unmasked entropies
    gather: Gather | None = None,
) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask``: the unmasked tokens whose entropy reaches the ``quantile``
    of all unmasked entropies (of every process, through ``gather``; ties at the threshold kept).
    No unmasked token anywhere: nothing is kept. Returns a float [B, T] mask."""
    values = entropy.detach().float()[mask.bool()]
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.float32)
    threshold = torch.quantile(values, quantile)
    return ((entropy.detach() * mask >= threshold) & mask.bool()).float()


@torch.no_grad()
def off_policy_mask(
    logprobs: torch.Tensor,  # [B, T] current policy
    old_logprobs: torch.Tensor,  # [B, T] at sampling time
    advantages: torch.Tensor,  # [B, 1] or [B, T]
    mask: torch.Tensor,  # [B, T]
    threshold: float,
) -> torch.Tensor:
    """TRL's ``get_off_policy_mask`` (DeepSeek-V3.2, eq. 9): keep a sequence when its advantage is
    >= 0 or its mean KL(old || current) over its tokens is at most ``threshold``; [B, 1] or [B, T]."""
    kl = (old_logprobs - logprobs).nan_to_num(nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def vespo_weights(
    log_ratio: torch.Tensor,  # [B, T] per token, log pi / pi_old
    advantages: torch.Tensor,  # [B, 1] or [B, T]
    mask: torch.Tensor,  # [B, T]
    settings: PolicyLossSettings,
) -> torch.Tensor:
    """VESPO's gamma weight of each sequence's importance ratio w (TRL's ``get_gamma_weights``):
    phi(w) = e^lam w^k e^(-lam w), phi(1) = 1, computed in log space from the summed token
    log-ratios (each clamped to +-20, the sum to [log 1e-8, 20]); k and lam by advantage sign."""
    lower = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, settings.vespo_k_pos, settings.vespo_k_neg)
    lam = torch.where(nonneg, settings.vespo_lambda_pos, settings.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def acting_entropy(
    entropy: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] float
    kept_tokens: torch.Tensor | None,  # [B, T] the high-entropy mask, None: every unmasked token
) -> torch.Tensor:
    """Mean entropy of the tokens the policy term acts on: the entropy bonus (TRL's ``entropy_loss``,
    over its ``effective_mask``) and what TRL's adaptive controller measures."""
    acting = mask if kept_tokens is None else mask * kept_tokens.to(mask.dtype)
    return (entropy.to(mask.dtype) * acting).sum() / acting.sum().clamp(min=1.0)


def policy_objective(
    logprobs: torch.Tensor,  # [B, T] current policy, differentiable
    old_logprobs: torch.Tensor | None,  # [B, T] recorded at sampling time; None: on-policy
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T] 1 for completion tokens that count
    settings: PolicyLossSettings,
    ref_logprobs: torch.Tensor | None = None,  # [B, T] reference policy, needed when beta > 0
    entropy: torch.Tensor | None = None,  # [B, T]; differentiable when the loss reads it
    gather: Gather | None = None,  # across processes, for the top_entropy_quantile threshold
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Scalar loss and stats from per-token log-probs (TRL 1.16 ``GRPOTrainer._compute_loss``).

    ``old_logprobs=None`` means the batch is on-policy (the first update of a rollout): old is the
    detached current log-prob, so the ratio is exactly 1 and only its gradient acts. ``entropy``
    is needed when ``settings.needs_entropy`` (its bonus, or the high-entropy mask).
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    if settings.needs_entropy and entropy is None:
        raise ValueError("entropy_coef != 0 or top_entropy_quantile < 1 needs the per-token entropy")
    maskf = mask.to(logprobs.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    adv = adv.to(logprobs.dtype)
    old_logprobs = old_logprobs.to(logprobs.dtype)
    token_log_ratio = logprobs - old_logprobs
    log_ratio = token_log_ratio
    if settings.importance_sampling_level == "sequence":
        # GSPO: one ratio per sequence from the mean token log-ratio; gradient reaches every token.
        log_ratio = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0))[:, None]  # [B, 1]
    ratio = torch.exp(log_ratio)
    upper = settings.upper_clip
    phi = None
    if settings.loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(ratio, 1 - settings.clip_low, 1 + upper)
        if settings.delta is not None:
            ratio = torch.clamp(ratio, max=settings.delta)
        per_token = -torch.min(ratio * adv, clipped * adv)  # [B, T] (or [B, 1] broadcast below)
    elif settings.loss_type == "cispo":  # the ratio, capped at clip_high and detached, weights A log p
        per_token = -torch.clamp(ratio, max=upper).detach() * adv * logprobs
    elif settings.loss_type == "sapo":  # a sigmoid gate of slope 1 at r = 1 instead of a hard clip
        tau = torch.where(adv > 0, settings.sapo_temperature_pos, settings.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:  # vespo
        phi = vespo_weights(token_log_ratio.detach(), adv, maskf, settings)
        per_token = -phi * adv * logprobs
    kept_sequences = kept_tokens = None
    if settings.off_policy_mask_threshold is not None:
        kept_sequences = off_policy_mask(
            logprobs.detach(), old_logprobs, adv, maskf, settings.off_policy_mask_threshold
        )
        per_token = per_token * kept_sequences
    if settings.top_entropy_quantile < 1.0:
        kept_tokens = high_entropy_mask(entropy, maskf, 1 - settings.top_entropy_quantile, gather)
        per_token = per_token * kept_tokens.to(logprobs.dtype)
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs.to(logprobs.dtype), settings.kl_estimator)
        if settings.kl_bias_correction:  # the ratio before any cap; what TRL logs as kl too
            kl = kl * torch.exp(log_ratio)
    if settings.beta != 0.0:
        if kl is None:
            raise ValueError("beta > 0 needs ref_logprobs (the reference policy's per-token log-probs)")
        per_token = (
            per_token + settings.beta * kl
        )  # not masked by the two masks above (TRL adds it after them)
    loss = (per_token * loss_token_weights(maskf, settings).to(logprobs.dtype)).sum()
    if settings.entropy_coef != 0.0:
        loss = loss - settings.entropy_coef * acting_entropy(entropy, maskf, kept_tokens)

    with torch.no_grad():
        token_count = maskf.sum().clamp(min=1.0)

        def trl_mean(x: torch.Tensor) -> torch.Tensor:
            """TRL's ``global_masked_mean``: [B, 1] values (one per sequence) averaged over
            sequences, [B, T] ones over unmasked tokens."""
            x = x.float()
            return x.mean() if x.shape[1] == 1 else (x * maskf).sum() / token_count

        low = (ratio < 1 - settings.clip_low) & (adv < 0)  # [B, T], or [B, 1] for GSPO with [B] advantages
        high = (ratio > 1 + upper) & (adv > 0)
        per_sequence = low.shape[1] == 1  # GSPO with [B] advantages: the clip flags are per sequence
        stats = PolicyLossStats(
            logprobs=logprobs.detach().float(),
            ratio_mean=trl_mean(ratio if per_sequence else ratio.expand_as(maskf)),
            clip_low=trl_mean(low),
            clip_high=trl_mean(high),
            clip_region=trl_mean(low | high),
            kl_mean=None if kl is None else trl_mean(kl),
            entropy_mean=None if entropy is None else trl_mean(entropy),
            num_items=torch.tensor(float(low.shape[0]), device=low.device) if per_sequence else maskf.sum(),
            cispo_clip=trl_mean((ratio > upper) & (adv > 0)) if settings.loss_type == "cispo" else None,
            vespo_phi_mean=None if phi is None else trl_mean(phi),
            entropy_kept=None if kept_tokens is None else trl_mean(kept_tokens),
            acting_entropy_mean=None
            if entropy is None
            else acting_entropy(entropy, maskf, kept_tokens).float(),
            off_policy_kept=None if kept_sequences is None else trl_mean(kept_sequences),
        )
    return loss, stats


def objective_grads(
    logprobs: torch.Tensor,  # [B, T] detached, from a kernel's forward
    entropy: torch.Tensor | None,  # [B, T] detached; needed when settings.needs_entropy
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
    ref_logprobs: torch.Tensor | None,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dLoss/dlogp [B, T], dLoss/dH [B, T] or None) by autograd of ``policy_objective``: the middle
    step of every two-pass path (log-probs, this, then a gradient pass over the logits), so those
    paths differentiate the one definition of the loss instead of restating it."""
    with torch.enable_grad():
        leaf = logprobs.detach().requires_grad_()
        bonus = settings.entropy_coef != 0.0
        h = None if entropy is None else entropy.detach().requires_grad_(bonus)
        loss, _ = policy_objective(leaf, old_logprobs, advantages, mask, settings, ref_logprobs, h, gather)
        grads = torch.autograd.grad(loss, (leaf, h) if bonus else (leaf,))
    return grads[0], grads[1] if bonus else None


def policy_loss_reference(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
    ref_logprobs: torch.Tensor | None = None,
    compute_entropy: bool = False,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Logits in: chunked reference log-probs (and entropy, differentiable, when asked for or when
    the loss reads it), then ``policy_objective``. Masked labels are ignored."""
    batch, length, vocab = logits.shape
    labels = torch.where(mask.bool(), labels, -100)
    with_entropy = compute_entropy or settings.needs_entropy
    out = token_logprobs(
        logits.reshape(-1, vocab),
        labels.reshape(-1),
        temperature=settings.temperature,
        ignore_index=-100,
        return_entropy=with_entropy,
        backend="torch",
    )
    logprobs, entropy = out if with_entropy else (out, None)
    logprobs = logprobs.reshape(batch, length)
    entropy = None if entropy is None else entropy.reshape(batch, length)
    return policy_objective(logprobs, old_logprobs, advantages, mask, settings, ref_logprobs, entropy, gather)
