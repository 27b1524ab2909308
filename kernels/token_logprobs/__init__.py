"""Per-token log-probs (and entropy) of sampled tokens, fused log-softmax + gather."""

from __future__ import annotations

from types import ModuleType

import torch

from .._backend import Backend, resolve_backend
from .._checks import check_float, check_labels, check_positive, check_same_shape
from . import reference


def launchers(backend: Backend, tensor: torch.Tensor) -> ModuleType:
    """The module whose ``token_logprobs_fwd`` / ``token_logprobs_bwd`` serve ``tensor``."""
    if resolve_backend(backend, tensor) == "triton":
        from . import triton

        return triton
    return reference


def kernel_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` as the Triton launchers read them: ``[N, V]`` or ``[B, T, V]``, unit V stride.

    Leading dims are merged where their strides allow, so a slice such as ``logits[:, :-1]`` of
    ``[B, T, V]`` stays a view (the kernels take two leading strides); only a strided vocabulary
    dim, or leading dims that need three or more strides, are copied.
    """
    vocab = logits.shape[-1]
    if logits.stride(-1) != 1 or logits.numel() == 0:
        return logits.reshape(-1, vocab).contiguous()
    merged: list[list[int]] = []  # [size, stride] of each leading dim after merging
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1], strict=True):
        if size == 1:
            continue  # a size-1 dim's stride is irrelevant
        if merged and merged[-1][1] == stride * size:  # continues the outer dim: one stride for both
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        return logits.reshape(-1, vocab)
    return logits.view(*(size for size, _ in merged or [[1, 0]]), vocab)


class _TokenLogprobs(torch.autograd.Function):
    """One Function for both backends; they differ only in their fwd/bwd launchers."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, impl):
        logp, lse, entropy = impl.token_logprobs_fwd(
            logits, labels, temperature, ignore_index, return_entropy
        )
        ctx.save_for_backward(logits, labels, lse, entropy if return_entropy else lse)
        ctx.settings = (temperature, ignore_index, return_entropy, impl)
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if return_entropy:
            return logp.to(out_dtype), entropy.to(out_dtype)
        return logp.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, return_entropy, impl = ctx.settings
        grad_logits = impl.token_logprobs_bwd(
            logits,
            labels,
            lse,
            grad_logp,
            temperature,
            ignore_index,
            entropy=entropy if return_entropy else None,
            grad_entropy=grad_entropy if return_entropy else None,
        )
        # labels, temperature, ignore_index, return_entropy, impl: not differentiable
        return grad_logits, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16; leading dims may be strided (e.g. a slice of ``[B, T, V]``).
        labels: ``[...]`` int64 token ids; ``ignore_index`` positions give 0 and get zero gradient.
        temperature: the sampling temperature, so the ratio and KL use the sampled distribution.
        return_entropy: also return the entropy of each row's distribution (differentiable).
        backend: "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch".

    Returns:
        fp32 ``[...]`` log-probs, or ``(logprobs, entropy)``.

    Example:
        >>> logp = token_logprobs(model(ids).logits[:, :-1], ids[:, 1:], temperature=0.7)
    """
    check_float("logits", logits)
    check_positive("temperature", temperature)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    check_same_shape("labels", labels, logits.shape[:-1], f"logits are {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    check_labels(labels, vocab, ignore_index)
    lead = labels.shape
    impl = launchers(backend, logits)
    rows = kernel_rows(logits) if impl is not reference else logits.reshape(-1, vocab)
    out = _TokenLogprobs.apply(
        rows, labels.reshape(-1).long(), temperature, ignore_index, return_entropy, impl
    )
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
