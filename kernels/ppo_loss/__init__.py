"""Clipped-ratio policy loss + KL estimate fused with log-softmax + gather, from logits."""

from __future__ import annotations

import torch

from .._backend import Backend, resolve_backend
from .._checks import check_float, check_no_overlap
from .checks import check_policy_inputs
from .reference import (
    Gather,
    PolicyLossStats,
    high_entropy_mask,
    kl_estimate,
    off_policy_mask,
    policy_loss_reference,
    policy_objective,
)
from .settings import PolicyLossSettings, loss_token_weights, resolve_settings

__all__ = [
    "Gather",
    "PolicyLossSettings",
    "PolicyLossStats",
    "fused_policy_loss",
    "high_entropy_mask",
    "kl_estimate",
    "loss_token_weights",
    "off_policy_mask",
    "policy_objective",
]


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings | None = None,
    *,
    ref_logprobs: torch.Tensor | None = None,
    compute_entropy: bool = False,
    overwrite_logits: bool = False,
    gather: Gather | None = None,
    backend: Backend = "auto",
    **loss_settings: object,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO/GRPO clipped-ratio loss (+ beta * KL to the reference) straight from logits.

    Args:
        logits: ``[B, T, V]`` policy logits at the completion positions (fp32/bf16/fp16).
        labels: ``[B, T]`` sampled token ids. old_logprobs / ref_logprobs / mask: ``[B, T]``;
            ``old_logprobs=None``: on-policy, old = the detached current log-probs (ratio exactly 1).
        advantages: ``[B]`` (one per sequence) or ``[B, T]``.
        settings: how the loss is formed (``PolicyLossSettings``); ``loss_settings`` keywords
            (its field names: ``beta=0.04, loss_type="dapo"``, ...) override single fields.
        overwrite_logits: on the Triton path the gradient is written into ``logits`` itself
            (the caller must not need them afterwards); saves one ``[B, T, V]`` buffer. Logits
            whose rows share memory (``expand``-ed) are refused, and the write bumps their autograd
            version, so a graph that saved them fails at backward instead of reading gradients.
        gather: all-gathers a 1-D tensor of this process's values across processes (e.g. accelerate's
            ``pad_across_processes`` + ``gather``): the ``top_entropy_quantile`` threshold is then the
            global batch's, as TRL's; None: this call's tokens only.

    Returns:
        ``(loss, stats)``: scalar loss, and ``PolicyLossStats`` (detached per-batch means and the
        per-token log-probs).

    Example:
        >>> settings = PolicyLossSettings(beta=0.04, loss_type="dapo", temperature=0.7)
        >>> loss, stats = fused_policy_loss(logits, ids, old_logp, adv, mask, settings, ref_logprobs=ref)
        >>> loss.backward()
    """
    settings = resolve_settings(settings, loss_settings)
    check_float("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if overwrite_logits:
        check_no_overlap(
            "logits", logits, "overwrite_logits=True writes each row's gradient in place; pass a copy"
        )
    check_policy_inputs(
        tuple(logits.shape[:2]),
        logits.shape[-1],
        labels,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        settings.beta,
        f"logits are {tuple(logits.shape)}",
    )
    if resolve_backend(backend, logits) == "triton":
        from .triton import policy_loss_triton

        return policy_loss_triton(
            logits,
            labels,
            old_logprobs,
            advantages,
            mask,
            settings,
            ref_logprobs,
            compute_entropy,
            overwrite_logits,
            gather,
        )
    return policy_loss_reference(
        logits, labels, old_logprobs, advantages, mask, settings, ref_logprobs, compute_entropy, gather
    )
