"""The implementations we race against: eager PyTorch (the textbook formulas the kernel tests take
as truth, ``fastppo.kernels.token_logprobs.reference.eager_token_logprobs`` and
``fastppo.kernels.ppo_loss.trl_formula.trl_policy_loss``), torch.compile of it, TRL and Liger-Kernel.
Peers that are not installed, or cannot run on this device, are reported as unavailable, never faked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fastppo.kernels.ppo_loss import PolicyLossSettings
from fastppo.kernels.ppo_loss.trl_formula import trl_policy_loss
from fastppo.kernels.token_logprobs.reference import eager_token_logprobs


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
