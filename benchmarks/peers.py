"""The implementations we race against, on the same inputs as ours.

Eager baselines use the textbook formula and ``policy_objective`` (TRL GRPOTrainer's loss, the
definition our tests check), so no baseline restates the loss. Peers that are not installed, or
cannot run on this device, are reported as unavailable, never faked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fastppo.kernels.ppo_loss import PolicyLossSettings, policy_objective


def eager_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """What TRL users wrote before fused kernels: log_softmax over fp32 logits, then gather."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


@functools.cache
def compiled_token_logprobs() -> Callable:
    return torch.compile(eager_token_logprobs, dynamic=False)


def trl_selective_log_softmax() -> Callable | None:
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        return None
    return selective_log_softmax


def eager_policy_loss(logits, labels, old, advantages, mask, settings: PolicyLossSettings, ref=None):
    logp = eager_token_logprobs(logits, labels, settings.temperature)
    return policy_objective(logp, old, advantages, mask, settings, ref)[0]


def eager_linear_policy_loss(
    hidden, weight, labels, old, advantages, mask, settings: PolicyLossSettings, ref=None
):
    """hidden @ W^T -> log_softmax -> gather -> loss: holds [N, V] logits and their fp32 copy."""
    return eager_policy_loss(F.linear(hidden, weight), labels, old, advantages, mask, settings, ref)


def liger_linear_grpo_loss(settings: PolicyLossSettings) -> Callable | None:
    """Liger-Kernel's chunked fused-linear GRPO loss with our settings, or None when unavailable."""
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
    )

    def run(hidden, weight, labels, old, advantages, mask, ref=None):
        out = loss_module(
            hidden, weight, labels, mask, advantages, ref_per_token_logps=ref, old_per_token_logps=old
        )
        return out[0] if isinstance(out, tuple) else out

    return run
