"""Triton path of the clipped-ratio policy loss: the logits' gradient is produced in the forward.

Token-level ratios: one launch. Each program reads its row for the log-sum-exp, forms
dLoss/dlogp for its token in registers (ratio, clipping, delta cap, KL, loss-type weight), then
writes ``dlogits = c * (onehot - p) / T``. A row of up to ``SINGLE_TILE_MAX_V`` logits stays on
chip between the two steps (one read, one write); a longer one is streamed twice (two reads, one
write). Masked tokens are not read: their gradient row is written as zeros.
Sequence-level ratios (GSPO): the forward kernel gives every log-prob, autograd of the [B, T]
reference objective gives dLoss/dlogp, and the backward kernel writes dlogits (one extra launch).
Either way the loss value and the stats come from ``policy_objective`` on the kernel's log-probs,
so there is exactly one definition of the loss; tests check the in-kernel derivative against it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..token_logprobs import kernel_rows
from ..token_logprobs import triton as token_kernels
from ..token_logprobs.triton import (
    _LOG2E,
    _grad_tile,
    _load_x,
    _logp_of,
    _lse_finish,
    _lse_init,
    _lse_step,
    _row_lse,
    _row_ptr,
    _write_row_grad,
    _write_row_zeros,
    block_config,
    row_layout,
    token_logprobs_bwd,
    token_logprobs_fwd,
)
from .reference import Gather, PolicyLossStats, objective_grads, policy_objective
from .settings import CLIPPED_LOSS_TYPES, KL_LOG_RATIO_CLAMP, PolicyLossSettings, loss_token_weights

_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
# The kernel's LOSS switch for the token-local loss types (vespo's weight is a sequence's: two passes).
LOSS_CODES = {**dict.fromkeys(CLIPPED_LOSS_TYPES, 0), "cispo": 1, "sapo": 2}


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
    tau_pos,
    tau_neg,
    LOSS: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    KL: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    KL_BIAS: tl.constexpr,
):
    """dLoss/dlogp of ``weight * (policy term + beta * kl)`` for one token, r = exp(logp - old).

    Matches autograd of ``policy_objective``: clamp passes gradient inside its bounds only (bounds
    included), and torch.min splits it in half on ties (inside the clip region both branches give
    A * r, so the sum is A * r again). ``LOSS``: 0 the clipped family (clip_lo, clip_hi = 1 -+ eps),
    1 cispo (clip_hi = the ratio's cap), 2 sapo (tau_pos / tau_neg the gate temperatures).
    """
    # d r / d logp = r
    ratio = tl.exp(logp - old)
    if LOSS == 0:  # -min(r' A, clip(r) A), r' = min(r, delta) with HAS_DELTA
        clipped = tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        d_clipped = tl.where((ratio >= clip_lo) & (ratio <= clip_hi), ratio, 0.0)
        unclipped = ratio
        d_unclipped = ratio
        if HAS_DELTA:  # no gradient above the cap
            unclipped = tl.minimum(ratio, delta)
            d_unclipped = tl.where(ratio <= delta, ratio, 0.0)
        t1 = unclipped * adv
        t2 = clipped * adv
        d_min = tl.where(t1 < t2, d_unclipped, tl.where(t1 > t2, d_clipped, 0.5 * (d_unclipped + d_clipped)))
        d = -adv * d_min
    elif LOSS == 1:  # cispo: -sg(min(r, cap)) A logp
        d = -tl.minimum(ratio, clip_hi) * adv
    else:  # sapo: -sigmoid(tau (r - 1)) 4 / tau A; d/dlogp = -4 A r s (1 - s)
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        d = -4.0 * adv * ratio * gate * (1.0 - gate)
    if KL != 0:
        # kl of x = clamp(logp - ref, -C, C): k1 = x, k2 = x^2 / 2, k3 = exp(-x) + x - 1
        # d kl / d x: k1 = 1, k2 = x, k3 = 1 - exp(-x); zero where the clamp is active
        x = logp - ref
        inside = (x >= -KL_CLAMP) & (x <= KL_CLAMP)
        x = tl.minimum(tl.maximum(x, -KL_CLAMP), KL_CLAMP)
        if KL == 1:
            kl = x
            d_kl = tl.full((), 1.0, tl.float32)
        elif KL == 2:
            kl = 0.5 * x * x
            d_kl = x
        else:
            e = tl.exp(-x)
            kl = e + x - 1.0
            d_kl = 1.0 - e
        d_kl = tl.where(inside, d_kl, 0.0)
        if KL_BIAS:  # kl * r, r differentiable too: d/dlogp = (kl' + kl) r
            d_kl = (d_kl + kl) * ratio
        d += beta * d_kl
    return weight * d


@triton.jit
def _policy_loss_fwd_kernel(
    p_logits,
    T,
    stride_b,
    stride_t,
    p_dlogits,
    stride_db,
    stride_dt,
    p_labels,
    p_old,
    p_adv,
    p_ref,
    p_weight,
    p_ent_weight,
    p_logp,
    p_entropy,
    V,
    inv_temp,
    clip_lo,
    clip_hi,
    delta,
    beta,
    tau_pos,
    tau_neg,
    LOSS: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    KL: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    KL_BIAS: tl.constexpr,
    ON_POLICY: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    L2_HINTS: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    p_row = _row_ptr(p_logits, i_row, T, stride_b, stride_t)
    p_drow = _row_ptr(p_dlogits, i_row, T, stride_db, stride_dt)
    weight = tl.load(p_weight + i_row)
    logp = tl.zeros((), tl.float32)  # masked tokens: logp = entropy = 0
    entropy = tl.zeros((), tl.float32)
    if weight != 0.0:  # masked tokens carry weight 0: zero loss, zero gradient, row not read
        c = inv_temp * _LOG2E
        # Every per-row load is issued before the row is read, so their latency hides behind it.
        label = tl.load(p_labels + i_row).to(tl.int32)  # ids < V < 2^31: 32-bit compares
        x_label = tl.load(p_row + label).to(tl.float32)  # read before dlogits may overwrite it
        adv = tl.load(p_adv + i_row)
        ref = 0.0
        if KL != 0:
            ref = tl.load(p_ref + i_row)
        if not ON_POLICY:
            old = tl.load(p_old + i_row)
        g_ent = 0.0  # dLoss/dH: the entropy bonus's weight of this token
        if WITH_ENTROPY_GRAD:
            g_ent = tl.load(p_ent_weight + i_row)
        if SINGLE_TILE:  # the row stays in registers for the gradient below: one read
            o_v, b_x = _load_x(p_row, 0, V, BLOCK_V, "")
            m, s, st = _lse_init()
            m, s, st = _lse_step(m, s, st, b_x, c, WITH_ENTROPY)
            m, log2_s, entropy = _lse_finish(m, s, st)
        else:  # first of two reads: ask L2 to keep the row for the second
            m, log2_s, entropy = _row_lse(
                p_row, V, c, WITH_ENTROPY, BLOCK_V, "evict_last" if L2_HINTS else ""
            )
        logp = _logp_of(x_label, m, log2_s, inv_temp)
        if ON_POLICY:  # old policy = current one: ratio exactly 1
            old = logp
        coef = _token_loss_dlogp(
            logp,
            old,
            adv,
            ref,
            weight,
            clip_lo,
            clip_hi,
            delta,
            beta,
            tau_pos,
            tau_neg,
            LOSS,
            HAS_DELTA,
            KL,
            KL_CLAMP,
            KL_BIAS,
        )
        # dlogits = coef * (onehot(label) - p) / T - g_ent * p (logp + H) / T
        if SINGLE_TILE:
            b_d = _grad_tile(b_x, o_v, label, m, log2_s, c, coef, g_ent, entropy, inv_temp, WITH_ENTROPY_GRAD)
            tl.store(p_drow + o_v, b_d.to(p_drow.dtype.element_ty), mask=o_v < V)
        else:  # second read of the row, from L2 where it stayed; not needed after this
            _write_row_grad(
                p_row,
                p_drow,
                V,
                inv_temp,
                label,
                m,
                log2_s,
                coef,
                g_ent,
                entropy,
                WITH_ENTROPY_GRAD,
                BLOCK_V,
                "evict_first" if L2_HINTS else "",
            )
    else:
        _write_row_zeros(p_drow, V, BLOCK_V)
    tl.store(p_logp + i_row, logp)
    if WITH_ENTROPY:
        tl.store(p_entropy + i_row, entropy)


class TokenInputs(NamedTuple):
    """Per-token inputs of the fused kernel, flattened to ``[N]`` (N = B * T)."""

    labels: torch.Tensor  # int64; 0 where masked (never read there)
    old_logprobs: torch.Tensor | None  # fp32; None: on-policy
    advantages: torch.Tensor  # fp32, per token
    ref_logprobs: torch.Tensor | None  # fp32
    weights: torch.Tensor  # fp32 from loss_token_weights; 0 where masked
    entropy_weights: torch.Tensor | None  # fp32 dLoss/dH of the entropy bonus; None without one

    @classmethod
    def build(cls, labels, old_logprobs, advantages, mask, ref_logprobs, settings) -> TokenInputs:
        """From the ``[B, T]`` inputs of the public functions (advantages ``[B]`` or ``[B, T]``)."""
        batch, length = labels.shape
        adv = advantages[:, None].expand(batch, length) if advantages.dim() == 1 else advantages

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.float().reshape(-1).contiguous()

        maskf = mask.float()
        # loss -= coef * sum(H m) / sum(m): each unmasked token's H weighs -coef / sum(m)
        bonus = (
            None
            if settings.entropy_coef == 0.0
            else -settings.entropy_coef * maskf / maskf.sum().clamp(min=1.0)
        )
        return cls(
            torch.where(mask.bool(), labels, 0).reshape(-1).long(),
            flat(old_logprobs),
            flat(adv),
            flat(ref_logprobs),
            flat(loss_token_weights(mask, settings)),
            flat(bonus),
        )

    def rows(self, sl: slice) -> TokenInputs:
        return TokenInputs(*(None if x is None else x[sl] for x in self))


def fused_token_chunk(
    logits: torch.Tensor,  # [n, V] or [B, T, V] (n = B * T), last dim contiguous
    inputs: TokenInputs,  # [n] each
    settings: PolicyLossSettings,
    want_entropy: bool,
    out: torch.Tensor,  # like logits: gradient destination (may be logits itself)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch: (logp [n], entropy [n] | None) and dLoss/dlogits written into ``out``.

    Token-local settings only (``settings.token_local``): the loss types whose per-token
    derivative the kernel forms (``LOSS_CODES``), an entropy bonus included.
    """
    layout, (_, *out_strides) = row_layout(logits), row_layout(out)
    n_rows, vocab = inputs.labels.numel(), logits.shape[-1]
    with_entropy_grad = inputs.entropy_weights is not None
    want_entropy = want_entropy or with_entropy_grad  # the bonus's gradient needs H
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp) if want_entropy else logp  # dummy pointer when unused
    kl_code = _KL_CODES[settings.kl_estimator] if settings.beta != 0.0 else 0
    loss_code = LOSS_CODES[settings.loss_type]
    config = block_config(vocab, single_tile_ok=True, entropy_grad=with_entropy_grad)
    if n_rows:
        _policy_loss_fwd_kernel[(n_rows,)](
            logits,
            *layout,
            out,
            *out_strides,
            inputs.labels,
            logp if inputs.old_logprobs is None else inputs.old_logprobs,
            inputs.advantages,
            inputs.ref_logprobs if kl_code else logp,
            inputs.weights,
            inputs.entropy_weights if with_entropy_grad else inputs.weights,
            logp,
            entropy,
            vocab,
            1.0 / settings.temperature,
            1.0 - settings.clip_low,
            settings.upper_clip if settings.loss_type == "cispo" else 1.0 + settings.upper_clip,
            settings.delta if settings.delta is not None else 0.0,
            settings.beta,
            settings.sapo_temperature_pos,
            settings.sapo_temperature_neg,
            LOSS=loss_code,
            HAS_DELTA=settings.delta is not None,
            KL=kl_code,
            KL_CLAMP=KL_LOG_RATIO_CLAMP,
            KL_BIAS=settings.kl_bias_correction,
            ON_POLICY=inputs.old_logprobs is None,
            WITH_ENTROPY=want_entropy,
            WITH_ENTROPY_GRAD=with_entropy_grad,
            SINGLE_TILE=config.single_tile,
            BLOCK_V=config.block_v,
            L2_HINTS=token_kernels.L2_HINTS,
            num_warps=config.num_warps,
        )
    return logp, entropy if want_entropy else None


@dataclasses.dataclass(frozen=True)
class TritonLossOptions:
    """What a Triton policy-loss call does besides the loss settings."""

    settings: PolicyLossSettings
    compute_entropy: bool  # entropy as a stat (the loss reads it anyway when settings.needs_entropy)
    overwrite_logits: bool  # write dlogits into the logits' own buffer
    gather: Gather | None = None  # across processes, for the top_entropy_quantile threshold

    @property
    def want_entropy(self) -> bool:
        return self.compute_entropy or self.settings.needs_entropy


def _logprobs_and_grad(
    rows: torch.Tensor,  # [B, T, V] (or [N, V]) kernel layout
    labels: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T]
    ref_logprobs: torch.Tensor | None,
    options: TritonLossOptions,
    out: torch.Tensor,  # like rows: gradient destination
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token (logp [B, T], entropy [B, T] | None), with dLoss/dlogits written into ``out``."""
    settings = options.settings
    batch, length = labels.shape
    if settings.token_local:
        inputs = TokenInputs.build(labels, old_logprobs, advantages, mask, ref_logprobs, settings)
        logp, entropy = fused_token_chunk(rows, inputs, settings, options.want_entropy, out)
    else:  # tokens coupled (a sequence ratio or weight, a mask): autograd of the [B, T] objective
        ignore = torch.where(mask.bool(), labels, -100).reshape(-1).long()
        logp, lse, entropy = token_logprobs_fwd(
            rows, ignore, settings.temperature, -100, options.want_entropy
        )
        shaped = None if entropy is None else entropy.reshape(batch, length)
        dlogp, dentropy = objective_grads(
            logp.reshape(batch, length),
            shaped,
            old_logprobs,
            advantages,
            mask,
            settings,
            ref_logprobs,
            options.gather,
        )
        token_logprobs_bwd(
            rows,
            ignore,
            lse,
            dlogp.reshape(-1),
            settings.temperature,
            -100,
            entropy=entropy if dentropy is not None else None,
            grad_entropy=None if dentropy is None else dentropy.reshape(-1),
            out=out,
        )
    return logp.reshape(batch, length), None if entropy is None else entropy.reshape(batch, length)


class _PolicyLossTriton(torch.autograd.Function):
    """Gradient computed in forward; backward only scales it by the upstream gradient."""

    @staticmethod
    def forward(ctx, logits, labels, old_logprobs, advantages, mask, ref_logprobs, options):
        rows = kernel_rows(logits)
        copied = rows.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
        # The gradient goes into the logits when allowed, or into the kernel's own copy of them.
        out = rows if options.overwrite_logits or copied else torch.empty_like(rows)
        logp, entropy = _logprobs_and_grad(
            rows, labels, old_logprobs, advantages, mask, ref_logprobs, options, out
        )
        if out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            # Written behind autograd's back: a node that saved the logits must now refuse them.
            torch.autograd.graph.increment_version(logits)
        loss, stats = policy_objective(
            logp, old_logprobs, advantages, mask, options.settings, ref_logprobs, entropy, options.gather
        )
        ctx.dlogits = out.view(logits.shape)  # held on ctx, not saved: backward may scale it in place
        return loss.detach(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        dlogits, ctx.dlogits = ctx.dlogits, None
        if dlogits is None:
            raise RuntimeError("the Triton policy loss's gradient buffer is consumed by its first backward")
        # One host sync; skipping the scale when grad_loss == 1 saves a full pass over [B, T, V].
        if bool(grad_loss != 1):
            dlogits.mul_(grad_loss)  # fp32 scale: no bf16 rounding of grad_loss itself
        # labels, old_logprobs, advantages, mask, ref_logprobs, options: not differentiable
        return dlogits, None, None, None, None, None, None


def policy_loss_triton(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T]
    old_logprobs: torch.Tensor | None,  # [B, T]; None: on-policy
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T]
    settings: PolicyLossSettings,
    ref_logprobs: torch.Tensor | None,  # [B, T]
    compute_entropy: bool,
    overwrite_logits: bool,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``fused_policy_loss`` on the Triton backend (inputs already checked there)."""
    options = TritonLossOptions(settings, compute_entropy, overwrite_logits, gather)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _PolicyLossTriton.apply(logits, labels, old_logprobs, advantages, mask, ref_logprobs, options)
    # Nothing to differentiate: log-probs only (one read, nothing written), then the objective.
    ignore = torch.where(mask.bool(), labels, -100).reshape(-1).long()
    logp, _, entropy = token_logprobs_fwd(
        kernel_rows(logits), ignore, settings.temperature, -100, options.want_entropy
    )
    batch, length = labels.shape
    return policy_objective(
        logp.reshape(batch, length),
        old_logprobs,
        advantages,
        mask,
        settings,
        ref_logprobs,
        None if entropy is None else entropy.reshape(batch, length),
        gather,
    )
