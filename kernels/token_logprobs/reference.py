"""PyTorch reference for per-token log-probs: the test oracle and the CPU path.

``eager_token_logprobs`` is the textbook formula (log_softmax, then gather): the eager peer of the
benchmarks, and in float64 the tests' ground truth. The launchers below compute the same thing
chunked, with the entropy and the backward a kernel needs.

Exposes the same two launchers as ``triton.py`` (``token_logprobs_fwd`` / ``token_logprobs_bwd``),
so one autograd Function and the chunked linear loss serve both backends. Chunked over rows, so
neither direction ever holds an fp32 copy of the whole ``[N, V]`` logits. Math runs in fp32, or
fp64 when the logits are fp64 (that is how the tests build ground truth).
"""

from __future__ import annotations

import torch

# Rows per chunk are picked so one fp32 chunk of logits stays near this many bytes.
CHUNK_BYTES = 64 * 2**20


def rows_per_chunk(vocab_size: int, bytes_per_element: int = 4) -> int:
    return max(1, CHUNK_BYTES // (vocab_size * bytes_per_element))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logprobs_fwd(
    logits: torch.Tensor,  # [N, V] any float dtype, rows may be strided
    labels: torch.Tensor,  # [N] int64
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (logp [N], lse [N], entropy [N] or None), fp32 (fp64 for fp64 logits).

    ``lse`` is the log-sum-exp of ``logits / temperature``: all backward needs besides the logits.
    Ignored rows give logp = entropy = 0.
    """
    n_rows, vocab = logits.shape
    cdtype = compute_dtype(logits.dtype)
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, 0)
    lse = torch.empty(n_rows, dtype=cdtype, device=logits.device)
    logp = torch.empty(n_rows, dtype=cdtype, device=logits.device)
    entropy = torch.empty(n_rows, dtype=cdtype, device=logits.device) if return_entropy else None
    step = rows_per_chunk(vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        z = logits[rows].to(cdtype) / temperature
        c_lse = torch.logsumexp(z, dim=-1)
        # An inf logit (or an all -inf row) has no distribution: NaN, as the kernel gives, not -inf / 0.
        c_lse = torch.where(torch.isfinite(c_lse), c_lse, torch.nan)
        lse[rows] = c_lse
        logp[rows] = z.gather(-1, safe_labels[rows, None]).squeeze(-1) - c_lse
        if return_entropy:
            p = torch.exp(z - c_lse[:, None])
            # H = -sum p log p; where() keeps -inf logits (p == 0) from turning 0 * -inf into NaN,
            # while a NaN row stays NaN.
            entropy[rows] = -torch.where(p == 0, 0.0, p * (z - c_lse[:, None])).sum(-1)
    logp = torch.where(keep, logp, 0.0)
    if return_entropy:
        entropy = torch.where(keep, entropy, 0.0)
    return logp, lse, entropy


def token_logprobs_bwd(
    logits: torch.Tensor,  # [N, V]
    labels: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N] from the forward
    grad_logp: torch.Tensor,  # [N]
    temperature: float,
    ignore_index: int,
    entropy: torch.Tensor | None = None,  # [N], needed with grad_entropy
    grad_entropy: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [N, V] destination; may be ``logits`` itself (in place)
) -> torch.Tensor:
    """Gradient w.r.t. the logits, in the logits' dtype, written into ``out``."""
    cdtype = lse.dtype
    out = torch.empty_like(logits) if out is None else out
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, 0)
    g_logp = torch.where(keep, grad_logp.to(cdtype), 0.0)
    g_ent = None if grad_entropy is None else torch.where(keep, grad_entropy.to(cdtype), 0.0)
    step = rows_per_chunk(logits.shape[1])
    for start in range(0, logits.shape[0], step):
        rows = slice(start, start + step)
        logp_all = logits[rows].to(cdtype) / temperature - lse[rows, None]
        p = torch.exp(logp_all)
        # d logp_y / d logits = (onehot(y) - p) / T
        d = -p * g_logp[rows, None]
        d.scatter_add_(-1, safe_labels[rows, None], g_logp[rows, None])
        if g_ent is not None:
            # d H / d logits = -p * (log p + H) / T
            d -= torch.where(p == 0, 0.0, p * (logp_all + entropy[rows, None])) * g_ent[rows, None]
        out[rows] = (d / temperature).to(out.dtype)
    return out


def eager_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """What TRL users wrote before fused kernels: log_softmax (in fp32 at least), then gather.

    bf16/fp16 logits are upcast to fp32 (the eager peer); fp64 stays fp64 (the tests' ground truth).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
