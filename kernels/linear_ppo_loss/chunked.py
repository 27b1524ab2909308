"""The chunk loop shared by the hidden-states-in losses: logits exist one token chunk at a time.

Pass 1 (``scan_logprobs``) turns each chunk's logits into log-probs and log-sum-exps; pass 2
(``backprop_chunks``) rebuilds each chunk's logits, overwrites them with their gradient (the
launcher's in-place ``out=``) and folds them into the hidden-state, weight and bias gradients.
Peak extra memory is one chunk of logits, never ``[N, V]``. The launchers (``impl``) are the
Triton or reference ``token_logprobs_fwd`` / ``token_logprobs_bwd`` pair.

``fused_token_chunks`` is the Triton single pass for token-level ratios: each chunk's logits go
through the fused loss kernel (log-probs and dlogits in one launch), so a step costs three
matmuls per chunk (logits, grad_hidden, grad_weight) instead of four.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..ppo_loss.settings import PolicyLossSettings

if TYPE_CHECKING:
    from ..ppo_loss.triton import TokenInputs

# Default budget for one chunk of logits (plus the fp32 temporaries the reference makes of it). Each
# chunk's grad_weight update reads and writes the whole [V, H] weight gradient, so small chunks turn
# the backward memory-bound: 1 GiB is at most 3532 bf16 rows of a 152k vocabulary on the Triton
# path (five even chunks of 3328 for 16k tokens), a few percent of an 80 GB GPU. The GPU run's
# sweep (benchmarks/bench_linear_loss.py) times 2 and 4 GiB beside it.
DEFAULT_CHUNK_BYTES = 2**30
# On CPU the reference launchers hold ~2 fp32 copies of each chunk and the GEMMs gain nothing from
# huge chunks, so a 1 GiB budget only adds resident memory: a GRPO job at V=151936 on a tiny body
# peaked at 0.60x TRL's RSS with it, 0.42x at 128 MiB (benchmarks/bench_cpu_rss.py, 2026-12-08,
# 2-core CPU machine). 128 MiB keeps each chunk's fp32 logits (a third of the budget, ~43 MB) above
# glibc's largest dynamic mmap threshold (32 MiB), so they are mapped and unmapped whole; 64 MiB
# chunks (~22 MB) land on the heap, which keeps the pages: the same job then peaked higher (0.79x)
# than at 1 GiB.
CPU_CHUNK_BYTES = 128 * 2**20


def default_chunk_bytes(device: torch.device) -> int:
    """The chunk budget when the caller gives none (``chunk_bytes=None``): sized for the device."""
    return CPU_CHUNK_BYTES if device.type == "cpu" else DEFAULT_CHUNK_BYTES


# Chunks of more rows than this are cut at multiples of it: whole 128-row tiles of the chunk's
# GEMMs (cuBLAS's usual M tile on Hopper), two per multiple, and no ragged tile per chunk.
CHUNK_ROW_MULTIPLE = 256


def rows_per_chunk(
    n_rows: int, vocab: int, logits_dtype: torch.dtype, budget_bytes: int, fp32_temporaries: bool = True
) -> int:
    """Token rows per chunk so a chunk of logits fits the budget, with ~2 fp32 copies of it when
    ``fp32_temporaries`` (the reference launchers make them; the Triton ones work in place).

    The rows are spread evenly over as few chunks as the budget allows (a 16384-token batch of
    3532-row chunks would end in a 2256-row one; five of 3328 instead), each a multiple of
    ``CHUNK_ROW_MULTIPLE`` where that still fits the budget.
    """
    per_row = vocab * (torch.finfo(logits_dtype).bits // 8 + (8 if fp32_temporaries else 0))
    most = max(1, min(n_rows, budget_bytes // per_row))
    chunks = -(-n_rows // most) if n_rows else 1
    even = -(-n_rows // chunks) if n_rows else most
    rounded = -(-even // CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
    return rounded if CHUNK_ROW_MULTIPLE <= rounded <= most else even


def chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(token slice, its logits ``[c, V]``) one chunk at a time.

    The generator keeps no reference to a chunk it has yielded, so a caller that ``del``s it at
    the end of its loop body holds one chunk of logits at a time, never two.
    """
    for start in range(0, hidden.shape[0], rows):
        sl = slice(start, start + rows)
        yield sl, F.linear(hidden[sl], weight, bias)


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
        for sl, logits in chunk_logits(hidden, weight, bias, rows):
            parts.append(
                impl.token_logprobs_fwd(logits, labels[sl], temperature, ignore_index, return_entropy)
            )
            del logits
    logp = torch.cat([p[0] for p in parts])
    lse = torch.cat([p[1] for p in parts])
    entropy = torch.cat([p[2] for p in parts]) if return_entropy else None
    return logp, lse, entropy


class ChunkGrads:
    """Accumulates the hidden / weight / bias gradients from one chunk's dlogits at a time."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs: tuple[bool, bool, bool],
    ):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.grad_hidden = torch.empty_like(hidden) if needs[0] else None  # [N, H]
        # Accumulated in the weight's dtype with fp32 accumulation inside each addmm (as Liger does).
        self.grad_weight = torch.zeros_like(weight) if needs[1] else None  # [V, H]
        self.grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs[2] else None
        )

    def add(self, rows: slice, dlogits: torch.Tensor) -> None:
        """dlogits [c, V] of token ``rows``: grad_hidden = dlogits @ W, grad_W += dlogits^T @ hidden."""
        if self.grad_hidden is not None:
            torch.matmul(dlogits, self.weight, out=self.grad_hidden[rows])
        if self.grad_weight is not None:
            self.grad_weight.addmm_(dlogits.t(), self.hidden[rows])
        if self.grad_bias is not None:
            self.grad_bias += dlogits.sum(0, dtype=torch.float32)  # no fp32 copy of the chunk

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.bias.dtype)
        return self.grad_hidden, self.grad_weight, grad_bias


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
    grads = ChunkGrads(hidden, weight, bias, needs)
    with torch.no_grad():
        for sl, logits in chunk_logits(hidden, weight, bias, rows):
            impl.token_logprobs_bwd(
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
            grads.add(sl, logits)
            del logits
    return grads.result()


def fused_token_chunks(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,
    inputs: TokenInputs,  # [N] each
    settings: PolicyLossSettings,
    want_entropy: bool,
    rows: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """One pass: (logp [N], entropy [N] | None, (grad_hidden, grad_weight, grad_bias))."""
    from ..ppo_loss.triton import fused_token_chunk  # imports triton: only on the Triton backend

    grads = ChunkGrads(hidden, weight, bias, needs)
    logps, entropies = [], []
    with torch.no_grad():
        for sl, logits in chunk_logits(hidden, weight, bias, rows):
            # in place: dlogits replace the chunk's logits
            logp, entropy = fused_token_chunk(logits, inputs.rows(sl), settings, want_entropy, out=logits)
            grads.add(sl, logits)
            logps.append(logp)
            entropies.append(entropy)
            del logits
    return torch.cat(logps), torch.cat(entropies) if want_entropy else None, grads.result()
