"""Bytes of parameters, gradients and optimizer state: what the memory switches change, counted from
the modules themselves (tests assert it; benchmarks/bench_memory.py reports it next to measured peaks).

Tensors are counted once however many modules hold them (tied lm_head, a shared trunk): keyed by
storage, or by identity on the meta device, so a 7B-shaped model can be accounted without
allocating it (``with torch.device("meta"): AutoModelForCausalLM.from_config(config)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from ..optim import BNB_OPTIMIZERS, TORCH_OPTIMIZERS

# bitsandbytes 8-bit AdamW (blockwise): tensors smaller than this keep fp32 state
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256  # one fp32 absmax per block and moment
BNB_QMAP_BYTES = 2 * 256 * 4  # two fp32 quantisation maps, shared by every tensor of the optimizer


def _key(tensor: torch.Tensor) -> tuple:
    if tensor.is_meta:
        return ("meta", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr())


def _nbytes(tensor: torch.Tensor) -> int:
    if tensor.is_meta:
        return tensor.numel() * tensor.element_size()
    return tensor.untyped_storage().nbytes()


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each storage once, in first-seen order."""
    seen, out = set(), []
    for tensor in tensors:
        if (key := _key(tensor)) not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def unique_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    return unique_tensors(p for module in modules for p in module.parameters())


def unique_parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameter storages of ``modules`` together (policy + reference + critic)."""
    return sum(_nbytes(p) for p in unique_parameters(*modules))


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for p in unique_parameters(*modules) if p.requires_grad]


def trainable_parameter_count(*modules: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(*modules))


def gradient_bytes(*modules: nn.Module) -> int:
    """Bytes of ``.grad`` after a backward: one tensor per trainable parameter, in its dtype."""
    return sum(p.numel() * p.element_size() for p in trainable_parameters(*modules))


def optimizer_state_bytes(params: Iterable[torch.Tensor], optim_name: str) -> int:
    """Bytes of AdamW state for ``params`` (the trainable ones) once the first step has run.

    torch AdamW: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype (8 bytes/param for fp32)
    and a 4-byte fp32 ``step`` per tensor. bitsandbytes 8-bit: two uint8 moments (2 bytes/param) and
    an fp32 absmax per 256-element block and moment for tensors of >= 4096 elements, fp32 moments
    (8 bytes/param) below that, and the two shared quantisation maps. Paged state has the same size.
    """
    name = str(getattr(optim_name, "value", optim_name))
    params = list(params)
    if name in TORCH_OPTIMIZERS:
        return sum(2 * p.numel() * p.element_size() + 4 for p in params)
    if name in BNB_OPTIMIZERS:
        total, any_8bit = 0, False
        for p in params:
            n = p.numel()
            if n < BNB_MIN_8BIT_SIZE:
                total += 8 * n
            else:
                any_8bit = True
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK_SIZE)
        return total + (BNB_QMAP_BYTES if any_8bit else 0)
    raise ValueError(f"optim must be one of {[*TORCH_OPTIMIZERS, *BNB_OPTIMIZERS]}, got {name!r}")


def measured_optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensors an optimizer actually holds in ``optimizer.state``."""
    tensors = (v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return sum(_nbytes(t) for t in unique_tensors(tensors))


class StaticMemory(NamedTuple):
    """Bytes that live through a whole training step (activations and logits come on top)."""

    parameters: int  # every distinct parameter of policy, reference and critic
    gradients: int  # trainable parameters only
    optimizer_states: int  # trainable parameters only

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states


def static_training_memory(modules: Iterable[nn.Module], optim_name: str) -> StaticMemory:
    """Parameters + gradients + optimizer state of ``modules`` (e.g. ``[policy, reference, critic]``)
    trained with ``optim_name`` (as resolved by ``optim.resolve_optim_name``)."""
    modules = list(modules)
    trainable = trainable_parameters(*modules)
    return StaticMemory(
        parameters=unique_parameter_bytes(*modules),
        gradients=gradient_bytes(*modules),
        optimizer_states=optimizer_state_bytes(trainable, optim_name),
    )
