"""Data-parallel training across the processes ``accelerate launch`` starts (gloo on CPU, NCCL on GPU).

Every process holds the whole model and trains on its own rows of each global batch. The models are
not wrapped in DistributedDataParallel: the fused path runs the decoder and the lm_head kernel
outside ``model.forward`` and the critic may be a separate module, so gradients are averaged
explicitly, once per optimizer step (``all_reduce_gradients``, one flat buffer per dtype), before
clipping. That is one collective per step instead of DDP's overlap with backward: correct for every
path, slower across many GPUs. Sharded training (FSDP2) lives in ``fastppo.sharding``; DeepSpeed is
refused by ``check_distributed_type``.
Checkpoints hold each process's RNG states, counters and rollout buffer next to the shared weights,
so a multi-process run resumes exactly with the same number of processes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn

SUPPORTED_TYPES = (
    DistributedType.NO,
    DistributedType.MULTI_CPU,
    DistributedType.MULTI_GPU,
    DistributedType.FSDP,  # FSDP2 only, applied by the trainer (fastppo.sharding checks the version)
)


def check_distributed_type(accelerator: Accelerator) -> None:
    """ValueError for a launch the trainers cannot run (DeepSpeed, TPU, Megatron ...)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError(
            "accelerate is configured for DeepSpeed; fastppo shards with FSDP2 instead: launch without "
            "the DeepSpeed config and set fsdp=True in the config (or use an accelerate FSDP config with "
            "fsdp_version: 2)"
        )
    if kind not in SUPPORTED_TYPES:
        raise ValueError(
            f"accelerate is configured for {kind.value}; fastppo's trainers run single-process, "
            "data-parallel (MULTI_GPU / MULTI_CPU) or sharded with FSDP2"
        )


def rank_rows(count: int, accelerator: Accelerator, what: str) -> slice:
    """The contiguous rows of a ``count``-row global batch this process trains on."""
    world = accelerator.num_processes
    if count % world:
        raise ValueError(f"{what} ({count}) must split evenly across the {world} processes")
    share = count // world
    return slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)


def evaluation_share(count: int, accelerator: Accelerator) -> tuple[list[int], list[bool]]:
    """(the dataset indices this process evaluates, which of them count): a contiguous share of
    ``count`` rows, the last process's padded with repeats of the last row so every process takes the
    same number (sharded generation must run as many times on each). Padding does not count."""
    world = accelerator.num_processes
    share = -(-count // world)  # ceil
    start = accelerator.process_index * share
    indices = [min(i, count - 1) for i in range(start, start + share)]
    return indices, [i < count for i in range(start, start + share)]


def gather_counted(tensor: torch.Tensor, counts: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Every process's rows of ``tensor`` (equal numbers per process) whose ``counts`` entry is True.
    Booleans travel as bytes (gloo gathers no bool)."""

    def gather(t: torch.Tensor) -> torch.Tensor:
        return (
            gather_rows(t.to(torch.uint8), accelerator).bool()
            if t.dtype == torch.bool
            else gather_rows(t, accelerator)
        )

    return gather(tensor)[gather(counts)]


def all_reduce_gradients(modules: Iterable[nn.Module], accelerator: Accelerator) -> None:
    """Average the gradients of every trainable parameter over the processes (no-op for one).

    A parameter whose gradient is None on this process contributes zeros, so every process takes
    part in the same collective whatever its data did.
    """
    if accelerator.num_processes == 1:
        return
    seen: set[int] = set()
    params = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = defaultdict(list)
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        by_dtype[(param.grad.dtype, param.grad.device)].append(param)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= accelerator.num_processes
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def broadcast_parameters(modules: Iterable[nn.Module], accelerator: Accelerator) -> None:
    """Every process starts from the main process's weights (a critic head initialised at random on
    each process would otherwise differ)."""
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def broadcast_object(value: Any, accelerator: Accelerator) -> Any:
    """The main process's ``value`` on every process (e.g. the temp folder a checkpoint goes to)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(tensor: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Every process's rows, concatenated in process order (the global batch)."""
    return tensor if accelerator.num_processes == 1 else accelerator.gather(tensor.contiguous())


def gather_ragged(values: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Every process's 1-D ``values``, of any length each, concatenated in process order (e.g. the
    entropies of each process's unmasked tokens, for one quantile over all of them)."""
    if accelerator.num_processes == 1:
        return values
    lengths = accelerator.gather(torch.tensor([values.numel()], device=values.device)).tolist()
    padded = accelerator.pad_across_processes(values.contiguous(), dim=0)
    width = padded.shape[0]
    gathered = accelerator.gather(padded)
    return torch.cat([gathered[rank * width : rank * width + n] for rank, n in enumerate(lengths)])


def sum_over_processes(value: float, accelerator: Accelerator) -> float:
    if accelerator.num_processes == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(total, "sum"))


def mean_over_processes(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each value's mean over the processes, in one collective (every process passes the same keys)."""
    if accelerator.num_processes == 1 or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    means = accelerator.reduce(stacked, "sum") / accelerator.num_processes
    return dict(zip(values, means.tolist(), strict=True))


def merge_metric_sums(
    state: dict[str, dict[str, float]], accelerator: Accelerator
) -> dict[str, dict[str, float]]:
    """Sum ``MetricsBuffer`` sums and weights over the processes, so a logged mean is the mean over
    every process's minibatches (a metric only some processes recorded still counts where it was)."""
    if accelerator.num_processes == 1:
        return state
    merged: dict[str, dict[str, float]] = {"sums": defaultdict(float), "weights": defaultdict(float)}
    for other in gather_object([state]):
        for part in ("sums", "weights"):
            for name, value in other[part].items():
                merged[part][name] += value
    return {part: dict(values) for part, values in merged.items()}
