"""Validation of the per-token inputs of the policy losses (logits or hidden states in)."""

from __future__ import annotations

import torch

from .._checks import check_finite, check_labels, check_same_shape


def check_policy_inputs(
    batch_shape: tuple[int, int],
    vocab: int,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    beta: float,
    source: str,
) -> None:
    """Shapes against ``batch_shape`` = (B, T) taken from ``source``; labels of unmasked tokens in
    [0, vocab) (the Triton kernels index the row with them); NaN advantages/old/ref log-probs."""
    for name, tensor in (("labels", labels), ("old_logprobs", old_logprobs), ("mask", mask)):
        if tensor is not None:
            check_same_shape(name, tensor, batch_shape, source)
    if advantages.shape not in (batch_shape[:1], batch_shape):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected [B] = {batch_shape[:1]} or [B, T] = "
            f"{batch_shape} ({source})"
        )
    if ref_logprobs is not None:
        check_same_shape("ref_logprobs", ref_logprobs, batch_shape, source)
    elif beta != 0.0:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (the reference policy's per-token log-probs)")
    check_labels(torch.where(mask.bool(), labels, -100), vocab, -100)  # masked labels are never read
    check_finite("advantages", advantages)
    if old_logprobs is not None:
        check_finite("old_logprobs", torch.where(mask.bool(), old_logprobs, 0.0))
    if ref_logprobs is not None:
        check_finite("ref_logprobs", torch.where(mask.bool(), ref_logprobs, 0.0))
