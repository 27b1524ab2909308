"""Triton kernels for per-token log-probs and entropy (forward) and their gradient (backward).

Launchers match ``reference.py``: ``token_logprobs_fwd`` / ``token_logprobs_bwd``. One program
per row; the row is streamed in ``BLOCK_V`` tiles with an online max / sum-exp, so the forward
reads the logits once and the backward reads them once and writes the gradient once (in place
when ``out is logits``). The ``@triton.jit`` row helpers are shared with the fused policy loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Start value of the running max: finite, so the first rescale exp(m - m_new) is exactly 0
# instead of exp(-inf + inf) = NaN. Below any logit representable in bf16/fp16/fp32 practice.
_NEG_BIG = tl.constexpr(-1.0e30)  # jit code may read only constexpr globals
MAX_BLOCK_V = 8192


@triton.jit
def _row_lse(p_row, V, inv_temp, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online log-sum-exp of z = logits / T over one row; with entropy, H = log s - sum(e (z - m)) / s.

    Tracking sum e^(z-m) (z-m) rather than sum p z keeps H free of the cancellation lse - E[z]
    suffers at large logit magnitudes (1e4 logits would leave fp32 H with ~1e-3 absolute error).
    """
    m = tl.full((), _NEG_BIG, tl.float32)
    s = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(b_z, 0))
        scale = tl.exp(m - m_new)
        b_e = tl.exp(b_z - m_new)
        if WITH_ENTROPY:
            # rescale old terms to the new max: e^(z-m_new)(z-m_new) = scale * e^(z-m) ((z-m) + (m-m_new))
            sz = scale * (sz + s * (m - m_new)) + tl.sum(tl.where(b_e > 0, b_e * (b_z - m_new), 0.0), 0)
        s = s * scale + tl.sum(b_e, 0)
        m = m_new
    lse = m + tl.log(s)
    entropy = tl.log(s) - sz / s
    return lse, entropy


@triton.jit
def _write_row_grad(
    p_row,
    p_out_row,
    V,
    inv_temp,
    label,
    lse,
    g_logp,
    g_ent,
    entropy,
    WITH_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dlogits = g_logp * (onehot(label) - p) / T  -  g_ent * p * (log p + H) / T, tile by tile."""
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_logp = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32) * inv_temp - lse
        b_p = tl.exp(b_logp)
        b_d = tl.where(o_v == label, g_logp, 0.0) - b_p * g_logp
        if WITH_ENTROPY_GRAD:
            b_d -= g_ent * tl.where(b_p > 0, b_p * (b_logp + entropy), 0.0)
        tl.store(p_out_row + o_v, (b_d * inv_temp).to(p_out_row.dtype.element_ty), mask=m_v)


@triton.jit
def _token_logprobs_fwd_kernel(
    p_logits,
    stride_row,
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
    p_row = p_logits + i_row * stride_row
    label = tl.load(p_labels + i_row)
    keep = label != ignore_index
    lse, entropy = _row_lse(p_row, V, inv_temp, WITH_ENTROPY, BLOCK_V)
    z_label = tl.load(p_row + tl.where(keep, label, 0)).to(tl.float32) * inv_temp
    tl.store(p_lse + i_row, lse)
    tl.store(p_logp + i_row, tl.where(keep, z_label - lse, 0.0))
    if WITH_ENTROPY:
        tl.store(p_entropy + i_row, tl.where(keep, entropy, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    p_logits,
    stride_row,
    p_out,
    stride_out,
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
    label = tl.load(p_labels + i_row)
    keep = label != ignore_index
    g_logp = tl.where(keep, tl.load(p_glogp + i_row).to(tl.float32), 0.0)
    g_ent = 0.0
    entropy = 0.0
    if WITH_ENTROPY_GRAD:
        g_ent = tl.where(keep, tl.load(p_gent + i_row).to(tl.float32), 0.0)
        entropy = tl.load(p_entropy + i_row)
    _write_row_grad(
        p_logits + i_row * stride_row,
        p_out + i_row * stride_out,
        V,
        inv_temp,
        label,
        tl.load(p_lse + i_row),
        g_logp,
        g_ent,
        entropy,
        WITH_ENTROPY_GRAD,
        BLOCK_V,
    )


def block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Unmeasured on GPU: a first guess to tune with benchmarks/."""
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def _check_rows(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be [N, V] with a contiguous last dim, got {tuple(logits.shape)} "
            f"strides {logits.stride()}"
        )


def token_logprobs_fwd(logits, labels, temperature, ignore_index, return_entropy):
    """(logp fp32 [N], lse fp32 [N], entropy fp32 [N] | None); see reference.token_logprobs_fwd."""
    _check_rows(logits)
    n_rows, vocab = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else logp  # dummy pointer when unused
    block, warps = block_config(vocab)
    if n_rows:
        _token_logprobs_fwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            labels,
            logp,
            lse,
            entropy,
            vocab,
            1.0 / temperature,
            ignore_index,
            WITH_ENTROPY=return_entropy,
            BLOCK_V=block,
            num_warps=warps,
        )
    return logp, lse, entropy if return_entropy else None


def token_logprobs_bwd(
    logits, labels, lse, grad_logp, temperature, ignore_index, entropy=None, grad_entropy=None, out=None
):
    """Gradient w.r.t. logits into ``out`` (may be ``logits``); see reference.token_logprobs_bwd."""
    _check_rows(logits)
    out = torch.empty_like(logits) if out is None else out
    _check_rows(out)
    n_rows, vocab = logits.shape
    with_ent = grad_entropy is not None
    block, warps = block_config(vocab)
    if n_rows:
        _token_logprobs_bwd_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            labels,
            lse,
            grad_logp.float().contiguous(),
            entropy if with_ent else lse,
            grad_entropy.float().contiguous() if with_ent else lse,
            vocab,
            1.0 / temperature,
            ignore_index,
            WITH_ENTROPY_GRAD=with_ent,
            BLOCK_V=block,
            num_warps=warps,
        )
    return out
