"""The optimizer: AdamW over the trainable parameters only, with 8-bit state through bitsandbytes on
CUDA (``adamw_8bit``: ~2 bytes of state per parameter instead of 8 for fp32 AdamW).

Names follow transformers' ``OptimizerNames``. bitsandbytes serves CUDA parameters only: its CPU
optimizer path is a slow fallback (and does not page), and the 8-bit state is a GPU-memory feature.
When 8-bit is asked for and cannot run (no CUDA, bitsandbytes missing or without a GPU backend) the
optimizer falls back to ``adamw_torch`` and says so once.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
# transformers: "adamw_8bit" is an alias of "adamw_bnb_8bit"
BNB_OPTIMIZERS = {"adamw_8bit": False, "adamw_bnb_8bit": False, "paged_adamw_8bit": True}  # name -> paged
SUPPORTED_OPTIMIZERS = (*TORCH_OPTIMIZERS, *BNB_OPTIMIZERS)


@functools.cache
def warn_once(message: str) -> None:
    """One warning per distinct message per process (a fallback must not flood every rebuild)."""
    warnings.warn(message, UserWarning, stacklevel=3)


@functools.cache
def bitsandbytes_problem(device_type: str) -> str | None:
    """None when a bitsandbytes 8-bit AdamW can step on ``device_type``, else why not.

    Probed once per process with one step on a 4096-element tensor (the smallest that bitsandbytes
    keeps in 8 bits): an import that succeeds can still lack the compiled GPU backend.
    """
    if device_type != "cuda":
        return f"bitsandbytes 8-bit optimizers are used on CUDA only (parameters are on {device_type})"
    try:
        import bitsandbytes as bnb

        # This process's GPU: configs are built before accelerate sets the device, and a probe on
        # the current one (0) would put every launched process's CUDA context on GPU 0.
        local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        probe = nn.Parameter(
            torch.zeros(4096, device=torch.device("cuda", local % torch.cuda.device_count()))
        )
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as exc:  # ImportError, a missing CUDA library, an unsupported GPU: all fall back
        return f"bitsandbytes cannot run an 8-bit optimizer here ({type(exc).__name__}: {exc})"
    return None


def default_optim_name(device: torch.device | str | None = None) -> str:
    """``adamw_8bit`` where bitsandbytes can run it (CUDA), else ``adamw_torch``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "adamw_8bit" if bitsandbytes_problem(torch.device(device).type) is None else "adamw_torch"


def resolve_config_optim(optim_name: str | None, device: torch.device | str) -> str:
    """The optimizer a config will train with, resolved when the config is built (as ``bf16`` is):
    ``None`` -> ``default_optim_name`` (warned once when CUDA is there but bitsandbytes cannot run),
    an 8-bit name that cannot run here -> ``adamw_torch`` (warned once), anything else unchanged."""
    device = torch.device(device)
    if optim_name is None:
        name = default_optim_name(device)
        problem = bitsandbytes_problem(device.type)
        if device.type == "cuda" and problem is not None:
            warn_once(f"the default optim 'adamw_8bit' falls back to 'adamw_torch': {problem}")
        return name
    return resolve_optim_name(optim_name, device)


def resolve_optim_name(optim_name: str, device: torch.device | str) -> str:
    """The optimizer that will actually run: 8-bit names fall back to ``adamw_torch`` (warned once)."""
    name = str(getattr(optim_name, "value", optim_name))  # transformers' OptimizerNames enum
    if name not in SUPPORTED_OPTIMIZERS:
        raise ValueError(f"optim must be one of {list(SUPPORTED_OPTIMIZERS)}, got {name!r}")
    if name in BNB_OPTIMIZERS:
        problem = bitsandbytes_problem(torch.device(device).type)
        if problem is not None:
            warn_once(f"optim={name!r} falls back to 'adamw_torch': {problem}")
            return "adamw_torch"
    return name


def parameter_groups(modules: nn.Module | Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Trainable parameters of ``modules`` (each once, however often it is shared or tied), in two
    groups: decayed, and not decayed (biases, norm weights: every tensor with < 2 dims or "norm" in
    its name, as transformers' Trainer). Frozen parameters get no group and so no state."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
    if not seen:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_bnb_optimizer(
    groups: list[dict], optim_name: str, *, lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """The bitsandbytes AdamW for ``optim_name`` (8-bit blockwise state; paged: state in unified
    memory that can spill to the host under memory pressure). No device check: see
    ``resolve_optim_name``."""
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if BNB_OPTIMIZERS[optim_name] else bnb.optim.AdamW8bit
    return cls(groups, lr=lr, betas=betas, eps=eps)


def create_optimizer(
    modules: nn.Module | Iterable[nn.Module],
    optim_name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``modules`` (policy, and a critic if any).

    Example:
        >>> opt = create_optimizer([policy, critic], default_optim_name(), lr=1e-6, weight_decay=0.01)
    """
    groups = parameter_groups(modules, weight_decay)
    device = next(p for g in groups for p in g["params"]).device
    name = resolve_optim_name(optim_name, device)
    if name in BNB_OPTIMIZERS:
        return build_bnb_optimizer(groups, name, lr=lr, betas=betas, eps=eps)
    fused = name == "adamw_torch_fused" and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def optimizer_from_config(args: Any, modules: Iterable[nn.Module], sharded: bool) -> torch.optim.Optimizer:
    """The optimizer a config asks for (``optim``, ``learning_rate``, ``weight_decay``, Adam's betas and
    epsilon) over ``modules``. Sharded runs fall back from 8-bit (bitsandbytes does not shard its
    state here) to ``adamw_torch``, said once."""
    name = str(getattr(args.optim, "value", args.optim))
    if sharded and name in BNB_OPTIMIZERS:
        warn_once(f"optim={name!r} with fsdp: bitsandbytes does not shard its state here; adamw_torch")
        name = "adamw_torch"
    return create_optimizer(
        modules,
        name,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
