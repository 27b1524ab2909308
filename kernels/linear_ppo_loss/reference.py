"""PyTorch reference for the hidden-states-in losses: ``F.linear``, then the logits-in reference,
unchunked. The readable definition, and what tests hold the chunked paths to.

It materialises the ``[N, V]`` logits, so it is not the CPU path: ``backend="torch"`` of
``linear_ppo_loss`` runs ``chunked.py``'s loop over the token-logprob reference launchers, whose
memory stays one chunk on the CPU too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ppo_loss.reference import PolicyLossStats, policy_loss_reference
from ..ppo_loss.settings import PolicyLossSettings
from ..token_logprobs import token_logprobs


def linear_token_logprobs_reference(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [...]
    bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T + bias)``: fp32 ``[...]`` log-probs (and entropy)."""
    return token_logprobs(
        F.linear(hidden, weight, bias),
        labels,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        backend="torch",
    )


def linear_policy_loss_reference(
    hidden: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None,  # [B, T]; None: on-policy
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T]
    settings: PolicyLossSettings,
    bias: torch.Tensor | None = None,  # [V]
    ref_logprobs: torch.Tensor | None = None,  # [B, T]
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``fused_policy_loss``'s reference on ``hidden @ weight.T + bias``."""
    logits = F.linear(hidden, weight, bias)
    return policy_loss_reference(
        logits, labels, old_logprobs, advantages, mask, settings, ref_logprobs, compute_entropy
    )
