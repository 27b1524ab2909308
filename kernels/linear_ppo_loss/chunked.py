"""The chunk loop shared by the hidden-states-in losses: logits exist one token chunk at a time.

Pass 1 (``scan_logprobs``) turns each chunk's logits into log-probs and log-sum-exps; pass 2
(``backprop_chunks``) rebuilds each chunk's logits, overwrites them with their gradient (the
launcher's in-place ``out=``) and folds them into the hidden-state, weight and bias gradients.
Peak extra memory is one chunk of logits, never ``[N, V]``. The launchers (``impl``) are the
Triton or reference ``token_logprobs_fwd`` / ``token_logprobs_bwd`` pair.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

# Default budget for one chunk of logits plus the fp32 temporaries the reference makes of it.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def rows_per_chunk(n_rows: int, vocab: int, logits_dtype: torch.dtype, budget_bytes: int) -> int:
    """Token rows per chunk so a chunk of logits (plus ~2 fp32 copies on the reference path) fits."""
    per_row = vocab * (torch.finfo(logits_dtype).bits // 8 + 8)
    return max(1, min(n_rows, budget_bytes // per_row))


def scan_logprobs(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    labels: torch.Tensor,  # [N]
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    impl: ModuleType,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp [N], lse [N], entropy [N] or None) without autograd, one chunk of logits at a time."""
    parts = []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            sl = slice(start, start + rows)
            logits = F.linear(hidden[sl], weight, bias)  # [c, V]
            parts.append(impl.token_logprobs_fwd(logits, labels[sl], temperature, ignore_index, return_entropy))
    logp = torch.cat([p[0] for p in parts])
    lse = torch.cat([p[1] for p in parts])
    entropy = torch.cat([p[2] for p in parts]) if return_entropy else None
    return logp, lse, entropy


def backprop_chunks(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,
    labels: torch.Tensor,  # [N]
    lse: torch.Tensor,  # [N]
    grad_logp: torch.Tensor,  # [N] dLoss/dlogp
    temperature: float,
    ignore_index: int,
    impl: ModuleType,
    rows: int,
    needs: tuple[bool, bool, bool],  # which of (hidden, weight, bias) want a gradient
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)`` w.r.t. hidden, weight, bias."""
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    # Accumulated in the weight's dtype with fp32 matmul accumulation inside each addmm (as Liger does).
    grad_weight = torch.zeros_like(weight) if needs[1] else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs[2] else None
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            sl = slice(start, start + rows)
            logits = F.linear(hidden[sl], weight, bias)  # [c, V]
            dlogits = impl.token_logprobs_bwd(
                logits,
                labels[sl],
                lse[sl],
                grad_logp[sl],
                temperature,
                ignore_index,
                entropy=None if entropy is None else entropy[sl],
                grad_entropy=None if grad_entropy is None else grad_entropy[sl],
                out=logits,  # in place: the chunk's logits are not needed again
            )
            if grad_hidden is not None:
                torch.matmul(dlogits, weight, out=grad_hidden[sl])  # [c, H]
            if grad_weight is not None:
                grad_weight.addmm_(dlogits.t(), hidden[sl])  # [V, H]
            if grad_bias is not None:
                grad_bias += dlogits.float().sum(0)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
