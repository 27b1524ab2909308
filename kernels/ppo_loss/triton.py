"""Triton path of the clipped-ratio policy loss: the logits' gradient is produced in the forward.

Token-level ratios: one launch. Each program streams its row once for the log-sum-exp, forms
dLoss/dlogp for its token in registers (ratio, clipping, delta cap, KL, loss-type weight), then
streams the row again writing ``dlogits = c * (onehot - p) / T``: two reads, one write.
Sequence-level ratios (GSPO): the forward kernel gives every log-prob, autograd of the [B, T]
reference objective gives dLoss/dlogp, and the backward kernel writes dlogits (one extra launch).
Either way the loss value and the stats come from ``policy_objective`` on the kernel's log-probs,
so there is exactly one definition of the loss; tests check the in-kernel derivative against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..token_logprobs.triton import (
    _row_lse,
    _write_row_grad,
    block_config,
    token_logprobs_bwd,
    token_logprobs_fwd,
)
from .reference import PolicyLossStats, policy_objective
from .settings import KL_LOG_RATIO_CLAMP, PolicyLossSettings, loss_token_weights

_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _token_loss_dlogp(
    logp,
    old,
    adv,
    ref,
    weight,
    clip_lo,
    clip_hi,
    delta,
    beta,
    HAS_DELTA: tl.constexpr,
    KL: tl.constexpr,
    KL_CLAMP: tl.constexpr,
):
    """dLoss/dlogp of ``weight * (-min(r' A, clip(r) A) + beta * kl)`` for one token, r = exp(logp - old).

    Matches autograd of ``policy_objective``: clamp passes gradient inside its bounds only, and
    torch.min splits it in half on ties (inside the clip region both branches give A * r).
    """
    ratio = tl.exp(logp - old)
    clipped = tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    d_clipped = tl.where((ratio >= clip_lo) & (ratio <= clip_hi), ratio, 0.0)
    unclipped = ratio
    d_unclipped = ratio
    if HAS_DELTA:
        unclipped = tl.minimum(ratio, delta)
        d_unclipped = tl.where(ratio <= delta, ratio, 0.0)
    t1 = unclipped * adv
    t2 = clipped * adv
    d_min = tl.where(t1 < t2, d_unclipped, tl.where(t1 > t2, d_clipped, 0.5 * (d_unclipped + d_clipped)))
    d = -adv * d_min
    if KL != 0:
        # kl of x = clamp(logp - ref, -C, C): k1 = x, k2 = x^2 / 2, k3 = exp(-x) + x - 1
        x = logp - ref
        inside = (x >= -KL_CLAMP) & (x <= KL_CLAMP)
        x = tl.minimum(tl.maximum(x, -KL_CLAMP), KL_CLAMP)
        if KL == 1:
            d_kl = 1.0
        elif KL == 2:
            d_kl = x
        else:
            d_kl = 1.0 - tl.exp(-x)
        d += beta * tl.where(inside, d_kl, 0.0)
    return weight * d


@triton.jit
def _policy_loss_fwd_kernel(
    p_logits,
    stride_row,
    p_dlogits,
    stride_drow,
    p_labels,
    p_old,
    p_adv,
    p_ref,
    p_weight,
    p_logp,
    p_lse,
    p_entropy,
    V,
    inv_temp,
    clip_lo,
    clip_hi,
    delta,
    beta,
    HAS_DELTA: tl.constexpr,
    KL: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    ON_POLICY: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    p_row = p_logits + i_row * stride_row
    label = tl.load(p_labels + i_row)
    weight = tl.load(p_weight + i_row)
    keep = weight != 0.0  # masked tokens carry weight 0: zero loss, zero gradient
    lse, entropy = _row_lse(p_row, V, inv_temp, WITH_ENTROPY, BLOCK_V)
    logp = tl.load(p_row + label).to(tl.float32) * inv_temp - lse
    ref = 0.0
    if KL != 0:
        ref = tl.load(p_ref + i_row)
    if ON_POLICY:  # old policy = current one: ratio exactly 1
        old = logp
    else:
        old = tl.load(p_old + i_row)
    coef = _token_loss_dlogp(
        logp,
        old,
        tl.load(p_adv + i_row),
        ref,
        weight,
        clip_lo,
        clip_hi,
        delta,
        beta,
        HAS_DELTA,
        KL,
        KL_CLAMP,
    )
    coef = tl.where(keep, coef, 0.0)
    tl.store(p_lse + i_row, lse)
    tl.store(p_logp + i_row, tl.where(keep, logp, 0.0))
    if WITH_ENTROPY:
        tl.store(p_entropy + i_row, tl.where(keep, entropy, 0.0))
    # Second pass over the row: it is still hot in L2 for moderate V.
    _write_row_grad(
        p_row, p_dlogits + i_row * stride_drow, V, inv_temp, label, lse, coef, 0.0, 0.0, False, BLOCK_V
    )


def fused_token_chunk(
    logits: torch.Tensor,  # [n, V], overwritten with its gradient when out is logits
    labels: torch.Tensor,  # [n] int64, valid ids everywhere (masked rows carry weight 0)
    old_logprobs: torch.Tensor | None,  # [n] fp32; None: on-policy
    advantages: torch.Tensor,  # [n] fp32
    ref_logprobs: torch.Tensor | None,  # [n] fp32
    weights: torch.Tensor,  # [n] fp32 from loss_token_weights (0 where masked)
    settings: PolicyLossSettings,
    want_entropy: bool,
    out: torch.Tensor,  # [n, V] gradient destination (may be logits)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch: (logp [n], entropy [n] | None) and dLoss/dlogits written into ``out``."""
    n_rows, vocab = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if want_entropy else logp
    kl_code = _KL_CODES[settings.kl_estimator] if settings.beta != 0.0 else 0
    block, warps = block_config(vocab)
    if n_rows:
        _policy_loss_fwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            labels,
            logp if old_logprobs is None else old_logprobs,
            advantages,
            ref_logprobs if kl_code else logp,
            weights,
            logp,
            lse,
            entropy,
            vocab,
            1.0 / settings.temperature,
            1.0 - settings.clip_low,
            1.0 + settings.upper_clip,
            settings.delta if settings.delta is not None else 0.0,
            settings.beta,
            HAS_DELTA=settings.delta is not None,
            KL=kl_code,
            KL_CLAMP=KL_LOG_RATIO_CLAMP,
            ON_POLICY=old_logprobs is None,
            WITH_ENTROPY=want_entropy,
            BLOCK_V=block,
            num_warps=warps,
        )
    return logp, entropy if want_entropy else None


class _PolicyLossTriton(torch.autograd.Function):
    """Gradient computed in forward; backward only scales it by the upstream gradient."""

    @staticmethod
    def forward(ctx, logits, dlogits):
        ctx.save_for_backward(dlogits)
        return logits.new_zeros((), dtype=torch.float32)  # the value is added outside (see below)

    @staticmethod
    def backward(ctx, grad_out):
        (dlogits,) = ctx.saved_tensors
        return dlogits * grad_out.to(dlogits.dtype), None  # dlogits: not differentiable


def policy_loss_triton(
    logits, labels, old_logprobs, advantages, mask, settings, ref_logprobs, compute_entropy, overwrite_logits
) -> tuple[torch.Tensor, PolicyLossStats]:
    batch, length, vocab = logits.shape
    rows = logits.reshape(-1, vocab) if logits.is_contiguous() else logits.reshape(batch * length, vocab)
    out = rows if overwrite_logits else torch.empty_like(rows)
    flat_labels = torch.where(mask.bool(), labels, 0).reshape(-1).long()
    adv = advantages[:, None].expand(batch, length) if advantages.dim() == 1 else advantages
    if settings.importance_sampling_level == "token":
        weights = loss_token_weights(mask, settings)
        logp, entropy = fused_token_chunk(
            rows,
            flat_labels,
            None if old_logprobs is None else old_logprobs.float().reshape(-1),
            adv.float().reshape(-1),
            None if ref_logprobs is None else ref_logprobs.float().reshape(-1),
            weights.reshape(-1).contiguous(),
            settings,
            compute_entropy,
            out,
        )
        logp = logp.reshape(batch, length)
    else:
        ignore = torch.where(mask.bool(), labels, -100).reshape(-1).long()
        logp, lse, entropy = token_logprobs_fwd(rows, ignore, settings.temperature, -100, compute_entropy)
        with torch.enable_grad():
            leaf = logp.reshape(batch, length).requires_grad_()
            loss_for_grad, _ = policy_objective(leaf, old_logprobs, advantages, mask, settings, ref_logprobs)
            (dlogp,) = torch.autograd.grad(loss_for_grad, leaf)
        token_logprobs_bwd(rows, ignore, lse, dlogp.reshape(-1), settings.temperature, -100, out=out)
        logp = logp.reshape(batch, length)
    entropy = None if entropy is None else entropy.reshape(batch, length)
    loss, stats = policy_objective(logp, old_logprobs, advantages, mask, settings, ref_logprobs, entropy)
    # loss.detach() carries the value, the Function the gradient (its own output is 0).
    loss = loss.detach() + _PolicyLossTriton.apply(logits, out.view(logits.shape))
    return loss, stats
