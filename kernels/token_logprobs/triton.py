"""Triton kernels for per-token log-probs and entropy (forward) and their gradient (backward).

Launchers match ``reference.py``: ``token_logprobs_fwd`` / ``token_logprobs_bwd``; they also take
``[B, T, V]`` logits with arbitrary leading strides (e.g. ``logits[:, :-1]``), so a slice is
read where it lies instead of being copied first. One program per row; the row is streamed in
``BLOCK_V`` tiles with an online max / sum-exp, so the forward reads the logits once and the
backward reads them once and writes the gradient once (in place when ``out is logits``). Ignored
rows are not read at all: they get 0 outputs and a zero gradient.

Exponentials are base 2: with the row max ``m`` of the raw logits ``x`` and ``c = log2(e) / T``,
``e^((x - m) / T) = 2^((x - m) c)``. One multiply per element forms the exponent (the division
by T and the change of base folded into ``c``), and ``exp2`` is the hardware's ``ex2``; ``tl.exp``
would add a multiply by log2(e) of its own. Subtracting before scaling keeps ``x - m`` exact for
bf16/fp16 logits, so even 1e4-sized logits lose nothing to the scaling. What the forward keeps
for the backward is therefore not the reference's natural ``lse [N]`` but each row's ``(m, log2 s)``
pair, ``[N, 2]`` fp32: the backward re-forms ``log2 p = (x - m) c - log2 s`` exactly as the forward
did, with nothing rounded to a single stored log-sum-exp. Only this module's backward reads it.

The ``@triton.jit`` row helpers below (online log-sum-exp, gradient tile, row writers) are shared
with the fused policy loss in ``ppo_loss/triton.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Start value of the running max: finite, so the first rescale 2^((m - m_new) c) is exactly 0
# instead of 2^(-inf + inf) = NaN. Below any logit representable in bf16/fp16/fp32 practice.
_NEG_BIG = tl.constexpr(-1.0e30)  # jit code may read only constexpr globals
_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))
# Streaming tile width. Unmeasured on GPU: a first guess for benchmarks/ to tune (its tile sweep).
MAX_BLOCK_V = 8192
# Widest row the fused loss holds on chip as one tile (read once instead of twice): 32768 fp32 over
# 16 warps is 64 values per thread. Offline sm_90 ptxas: 128 registers and a 64-byte spill per
# thread at 32768 (none at 16384), one program per SM. Unmeasured on GPU against streaming twice
# (set this to 0 to compare): benchmarks/ must decide it.
SINGLE_TILE_MAX_V = 32768
# Warps for a row held on chip as one tile of more than 16384 logits (benchmarks/ sweeps 32).
SINGLE_TILE_WARPS = 16
# L2 eviction hints for the fused loss's two reads of a streamed row: keep it after the first
# (evict_last) so the second finds it there, then let it go (evict_first). Unmeasured on GPU.
L2_HINTS = True


@triton.jit
def _row_ptr(p_base, i_row, T, stride_b, stride_t):
    """Row ``i_row`` of ``[B, T, V]`` logits (``[N, V]``: T = N, stride_b = 0); int64 offsets."""
    return p_base + (i_row // T) * stride_b + (i_row % T) * stride_t


@triton.jit
def _load_x(p_row, start, V, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """Tile ``[start, start + BLOCK_V)`` of the raw logits in fp32; lanes past V read -inf (p = 0).

    ``EVICT``: the L2 eviction policy of the load ("" for the default; every caller names one, as
    Triton 3.6 does not take a helper's constexpr default)."""
    o_v = start + tl.arange(0, BLOCK_V)
    b_x = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    return o_v, b_x


@triton.jit
def _lse_init():
    """Running (max m, sum 2^t s, sum 2^t t st) before any tile, t = (x - m) c."""
    return tl.full((), _NEG_BIG, tl.float32), tl.zeros((), tl.float32), tl.zeros((), tl.float32)


@triton.jit
def _lse_step(m, s, st, b_x, c, WITH_ENTROPY: tl.constexpr):
    """Fold one tile of raw logits into the running state, rescaling the old sums to the new max.

    Tracking sum 2^t t (t the base-2 exponent relative to the running max) rather than sum p z
    keeps H = ln 2 (log2 s - st / s) free of the cancellation lse - E[z] suffers at large logit
    magnitudes (1e4 logits would leave fp32 H with ~1e-3 absolute error). NaN anywhere makes s NaN;
    +inf makes (inf - inf) = NaN: both reach lse.
    """
    m_new = tl.maximum(m, tl.max(b_x, 0))
    shift = (m - m_new) * c  # <= 0: the old sums' exponent change
    scale = tl.exp2(shift)
    b_t = (b_x - m_new) * c
    b_e = tl.exp2(b_t)
    if WITH_ENTROPY:
        # 2^t_new t_new = scale * 2^t_old (t_old + shift); -inf lanes (e = 0) add 0
        st = scale * (st + s * shift) + tl.sum(b_e * tl.where(b_e > 0, b_t, 0.0), 0)
    s = s * scale + tl.sum(b_e, 0)
    return m_new, s, st


@triton.jit
def _lse_finish(m, s, st):
    """(m, log2 s, entropy) of the row: log2 p = (x - m) c - log2 s, entropy in nats.

    The max and the log-sum stay apart: forming x c - lse2 instead would round lse2 first
    (~5e-4 absolute at 1e4 logits), so both are what the backward gets too.
    """
    log2_s = tl.log2(s)
    return m, log2_s, (log2_s - st / s) * _LN2  # tensor first: constexpr * tensor breaks the interpreter


@triton.jit
def _row_lse(p_row, V, c, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """(m, log2 s, entropy) of one row of raw logits, streamed in BLOCK_V tiles (one read)."""
    m, s, st = _lse_init()
    for start in range(0, V, BLOCK_V):
        _, b_x = _load_x(p_row, start, V, BLOCK_V, EVICT)
        m, s, st = _lse_step(m, s, st, b_x, c, WITH_ENTROPY)
    return _lse_finish(m, s, st)


@triton.jit
def _logp_of(x, m, log2_s, inv_temp):
    """Natural log-prob of a raw logit ``x`` of a row whose (m, log2 s) are given.

    Formed in nats, (x - m) / T - ln s, rather than as ln 2 times the base-2 form: one rounding
    fewer on the value every ratio and KL term starts from. Once per row: the cost is nil.
    """
    return tl.fma(x - m, inv_temp, -(log2_s * _LN2))


@triton.jit
def _grad_tile(
    b_x, o_v, label, m, log2_s, c, g_logp, g_ent, entropy, inv_temp, WITH_ENTROPY_GRAD: tl.constexpr
):
    """dLoss/dlogits of one tile of raw logits, fp32, for upstream gradients g_logp (of logp) and
    g_ent (of H); ``label`` int32.

    The row max and log-sum come apart (nothing is rounded to a single lse): from the fused loss's
    registers, or from the pair the forward stored for the backward kernel.
    """
    # logp_v = z_v - lse, p_v = exp(logp_v) = 2^(log2 p_v)
    # d logp_label / d logits_v = (onehot_v - p_v) / T
    # d H / d logits_v = -p_v (logp_v + H) / T     (H = -sum p log p)
    b_log2p = tl.fma(b_x - m, c, -log2_s)  # one rounding, whether or not Triton contracts (3.10 won't)
    b_p = tl.exp2(b_log2p)
    b_d = tl.where(o_v == label, g_logp, 0.0) - b_p * g_logp
    if WITH_ENTROPY_GRAD:
        b_d -= g_ent * b_p * tl.where(b_p > 0, b_log2p * _LN2 + entropy, 0.0)  # p = 0: no 0 * -inf
    return b_d * inv_temp


@triton.jit
def _write_row_grad(
    p_row,
    p_out_row,
    V,
    inv_temp,
    label,
    m,
    log2_s,
    g_logp,
    g_ent,
    entropy,
    WITH_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EVICT: tl.constexpr,
):
    """Stream the row once more, writing its gradient tile by tile (p_out_row may be p_row)."""
    c = inv_temp * _LOG2E
    for start in range(0, V, BLOCK_V):
        o_v, b_x = _load_x(p_row, start, V, BLOCK_V, EVICT)
        b_d = _grad_tile(b_x, o_v, label, m, log2_s, c, g_logp, g_ent, entropy, inv_temp, WITH_ENTROPY_GRAD)
        tl.store(p_out_row + o_v, b_d.to(p_out_row.dtype.element_ty), mask=o_v < V)


@triton.jit
def _write_row_zeros(p_out_row, V, BLOCK_V: tl.constexpr):
    """Zero gradient for a row that does not count (its logits are never read)."""
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        tl.store(p_out_row + o_v, tl.zeros((BLOCK_V,), p_out_row.dtype.element_ty), mask=o_v < V)


@triton.jit
def _token_logprobs_fwd_kernel(
    p_logits,
    T,
    stride_b,
    stride_t,
    p_labels,
    p_logp,
    p_lse,
    p_entropy,
    V,
    inv_temp,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    label = tl.load(p_labels + i_row).to(tl.int32)  # ids < V < 2^31: 32-bit compares
    m = tl.zeros((), tl.float32)  # ignored rows: logp = entropy = (m, log2 s) = 0, logits not read
    log2_s = tl.zeros((), tl.float32)
    logp = tl.zeros((), tl.float32)
    entropy = tl.zeros((), tl.float32)
    if label != ignore_index:
        c = inv_temp * _LOG2E
        p_row = _row_ptr(p_logits, i_row, T, stride_b, stride_t)
        x_label = tl.load(p_row + label).to(tl.float32)  # issued before the row loop: its latency hides
        m, log2_s, entropy = _row_lse(p_row, V, c, WITH_ENTROPY, BLOCK_V, "")
        logp = _logp_of(x_label, m, log2_s, inv_temp)
    tl.store(p_lse + 2 * i_row, m)
    tl.store(p_lse + 2 * i_row + 1, log2_s)
    tl.store(p_logp + i_row, logp)
    if WITH_ENTROPY:
        tl.store(p_entropy + i_row, entropy)


@triton.jit
def _token_logprobs_bwd_kernel(
    p_logits,
    T,
    stride_b,
    stride_t,
    p_out,
    stride_ob,
    stride_ot,
    p_labels,
    p_lse,
    p_glogp,
    p_entropy,
    p_gent,
    V,
    inv_temp,
    ignore_index,
    WITH_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    label = tl.load(p_labels + i_row).to(tl.int32)  # ids < V < 2^31: 32-bit compares
    p_out_row = _row_ptr(p_out, i_row, T, stride_ob, stride_ot)
    if label != ignore_index:
        g_ent = 0.0
        entropy = 0.0
        if WITH_ENTROPY_GRAD:
            g_ent = tl.load(p_gent + i_row)
            entropy = tl.load(p_entropy + i_row)
        _write_row_grad(
            _row_ptr(p_logits, i_row, T, stride_b, stride_t),
            p_out_row,
            V,
            inv_temp,
            label,
            tl.load(p_lse + 2 * i_row),  # the row's (m, log2 s), as the forward formed them
            tl.load(p_lse + 2 * i_row + 1),
            tl.load(p_glogp + i_row),
            g_ent,
            entropy,
            WITH_ENTROPY_GRAD,
            BLOCK_V,
            "",
        )
    else:
        _write_row_zeros(p_out_row, V, BLOCK_V)


class BlockConfig(NamedTuple):
    block_v: int  # tile width (a power of 2)
    num_warps: int
    single_tile: bool  # the whole row is one tile: the fused loss reads it once, not twice


def block_config(vocab: int, single_tile_ok: bool = False, entropy_grad: bool = False) -> BlockConfig:
    """Tile and warps for a row of ``vocab`` logits.

    Streaming kernels read each row once whatever the tile, so they stream ``MAX_BLOCK_V`` tiles;
    the fused loss (``single_tile_ok``) keeps rows up to ``SINGLE_TILE_MAX_V`` on chip, over
    ``SINGLE_TILE_WARPS`` warps past 16384. With the entropy bonus's gradient (``entropy_grad``)
    the on-chip row is at most half as wide: its extra per-logit terms spilled at 32768 over 16
    warps (16 B a thread with Triton 3.9, 152 B with 3.6, offline sm_90 compile). Module constants
    read at every launch, so benchmarks/ can time other values; unmeasured on GPU: first guesses.
    """
    full = triton.next_power_of_2(max(vocab, 1))
    widest = SINGLE_TILE_MAX_V // 2 if entropy_grad else SINGLE_TILE_MAX_V
    block = full if full <= MAX_BLOCK_V or (single_tile_ok and full <= widest) else MAX_BLOCK_V
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else SINGLE_TILE_WARPS
    return BlockConfig(block, warps, block >= vocab)


def row_layout(x: torch.Tensor) -> tuple[int, int, int]:
    """(T, stride_b, stride_t) addressing the rows of ``x`` (``[N, V]`` or ``[B, T, V]``) in a kernel.

    Raises for other layouts: the public functions make the vocabulary dim contiguous first.
    """
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        raise ValueError(
            f"logits must be [N, V] or [B, T, V] with a contiguous last dim, got shape "
            f"{tuple(x.shape)} strides {x.stride()}"
        )
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    return max(x.shape[1], 1), x.stride(0), x.stride(1)


def token_logprobs_fwd(logits, labels, temperature, ignore_index, return_entropy):
    """(logp fp32 [N], lse fp32 [N, 2], entropy fp32 [N] | None); see reference.token_logprobs_fwd.

    ``logits``: ``[N, V]`` or ``[B, T, V]`` (N = B * T), last dim contiguous. ``lse`` holds each
    row's raw-logit max and base-2 log-sum ``(m, log2 sum 2^((x - m) log2(e) / T))`` for this
    module's backward (the module docstring says why not the reference's natural ``[N]``); 0 on
    ignored rows (never read: their gradient is zero).
    """
    layout = row_layout(logits)
    vocab = logits.shape[-1]
    labels = labels.contiguous()  # the kernels index per-row inputs by row number
    n_rows = labels.numel()
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp) if return_entropy else logp  # dummy pointer when unused
    config = block_config(vocab)
    if n_rows:
        _token_logprobs_fwd_kernel[(n_rows,)](
            logits,
            *layout,
            labels,
            logp,
            lse,
            entropy,
            vocab,
            1.0 / temperature,
            ignore_index,
            WITH_ENTROPY=return_entropy,
            BLOCK_V=config.block_v,
            num_warps=config.num_warps,
        )
    return logp, lse, entropy if return_entropy else None


def token_logprobs_bwd(
    logits, labels, lse, grad_logp, temperature, ignore_index, entropy=None, grad_entropy=None, out=None
):
    """Gradient w.r.t. logits into ``out`` (may be ``logits``); see reference.token_logprobs_bwd.

    ``lse``: the ``[N, 2]`` row pairs of this module's forward (not the reference's natural lse)."""
    layout = row_layout(logits)
    out = torch.empty_like(logits) if out is None else out
    if out.shape != logits.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected the logits' {tuple(logits.shape)}")
    _, *out_strides = row_layout(out)
    vocab = logits.shape[-1]
    labels = labels.contiguous()
    n_rows = labels.numel()
    with_ent = grad_entropy is not None
    config = block_config(vocab)
    if n_rows:
        _token_logprobs_bwd_kernel[(n_rows,)](
            logits,
            *layout,
            out,
            *out_strides,
            labels,
            lse,
            grad_logp.float().contiguous(),
            entropy if with_ent else lse,
            grad_entropy.float().contiguous() if with_ent else lse,
            vocab,
            1.0 / temperature,
            ignore_index,
            WITH_ENTROPY_GRAD=with_ent,
            BLOCK_V=config.block_v,
            num_warps=config.num_warps,
        )
    return out
