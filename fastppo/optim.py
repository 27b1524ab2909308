"""The optimizer over the trainable parameters only: every ``optim`` name transformers'
``TrainingArguments`` accepts (``OptimizerNames``), built by transformers' own factory
(``Trainer.get_optimizer_cls_and_kwargs``) with ``optim_args``, so a name means what it means in
transformers and TRL.

fastppo's default (``optim=None``) is 8-bit AdamW through bitsandbytes on CUDA (``adamw_8bit``: ~2
bytes of state per parameter instead of 8 for fp32 AdamW), else ``adamw_torch``. bitsandbytes serves
CUDA parameters only: its CPU optimizer path is a slow fallback (and does not page), and the 8-bit
state is a GPU-memory feature. Where bitsandbytes cannot run (no CUDA, not installed, no GPU backend)
the 8-bit AdamW names fall back to ``adamw_torch`` (the same update with fp32 state) and say so once;
any other bitsandbytes optimizer (Lion, RMSprop, AdEMAMix, 32-bit paged AdamW) is a ValueError there,
as is an optimizer whose package is missing and the few that fastppo's loop cannot drive
(``REFUSED_OPTIMIZERS``).
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.training_args import OptimizerNames

# The AdamW names whose state ``memory.accounting`` has a formula for: torch's, and bitsandbytes'
# 8-bit ones (name -> paged), which fall back to adamw_torch where bitsandbytes cannot run.
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
# transformers: "adamw_8bit" is an alias of "adamw_bnb_8bit"
BNB_OPTIMIZERS = {"adamw_8bit": False, "adamw_bnb_8bit": False, "paged_adamw_8bit": True}
# transformers optimizers the training loop cannot drive: (name prefixes, why).
REFUSED_OPTIMIZERS = (
    (
        ("lomo", "adalomo"),
        "LOMO updates the weights inside backward (transformers calls optimizer.fused_backward), which "
        "would bypass fastppo's gradient accumulation, clipping and non-finite guard",
    ),
    (
        ("galore_", "apollo_"),
        "low-rank optimizers need optim_target_modules (not supported) and their layer-wise variants "
        "step inside backward hooks, bypassing accumulation, clipping and the non-finite guard",
    ),
    (
        ("schedule_free_",),
        "schedule-free optimizers need optimizer.train()/eval() around evaluation and saving, which "
        "fastppo's loop does not call (the saved weights would be the wrong iterate)",
    ),
)


@functools.cache
def warn_once(message: str) -> None:
    """One warning per distinct message per process (a fallback must not flood every rebuild)."""
    warnings.warn(message, UserWarning, stacklevel=3)


@functools.cache
def bitsandbytes_problem(device_type: str) -> str | None:
    """None when bitsandbytes optimizers can step on ``device_type``, else why not.

    Probed once per process with one step on a 4096-element tensor (the smallest that bitsandbytes
    keeps in 8 bits): an import that succeeds can still lack the compiled GPU backend.
    """
    if device_type != "cuda":
        return f"bitsandbytes optimizers are used on CUDA only (parameters are on {device_type})"
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


def checked_optim_name(optim_name: Any) -> str:
    """``optim_name`` (a string or ``OptimizerNames``) as a string, when transformers knows it and
    fastppo can train with it; else a ValueError naming it and what was expected."""
    name = str(getattr(optim_name, "value", optim_name))
    known = [member.value for member in OptimizerNames]
    if name not in known:
        raise ValueError(f"optim must be one of transformers' OptimizerNames {known}, got {name!r}")
    for prefixes, reason in REFUSED_OPTIMIZERS:
        if name.startswith(prefixes):
            raise ValueError(f"optim={name!r} is not supported by fastppo: {reason}")
    return name


def optimizer_cls_and_kwargs(
    optim_name: str,
    *,
    lr: float = 5e-5,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    optim_args: str | None = None,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """transformers' optimizer class and keyword arguments for ``optim_name``
    (``Trainer.get_optimizer_cls_and_kwargs``; the defaults are TrainingArguments'). The factory
    reads only these ``TrainingArguments`` fields for the optimizers fastppo drives (GaLore, APOLLO
    and LOMO, which need more, are refused), so they are passed by value: ``create_optimizer`` has
    no config. A missing package or malformed
    ``optim_args`` ("key=value,...") is a ValueError naming the optimizer."""
    fields = types.SimpleNamespace(
        optim=OptimizerNames(optim_name),
        learning_rate=lr,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_epsilon=eps,
        optim_args=optim_args,
    )
    try:
        return Trainer.get_optimizer_cls_and_kwargs(fields)
    except (ImportError, ValueError) as exc:  # a missing package; "key" without "=value"
        raise ValueError(f"optim={optim_name!r} cannot be built here: {exc}") from exc


def is_bitsandbytes(optimizer_cls: type) -> bool:
    """Whether transformers picked a bitsandbytes class (known from the class, not a list of names)."""
    return optimizer_cls.__module__.startswith("bitsandbytes")


def default_optim_name(device: torch.device | str | None = None) -> str:
    """``adamw_8bit`` where bitsandbytes can run it (CUDA), else ``adamw_torch``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "adamw_8bit" if bitsandbytes_problem(torch.device(device).type) is None else "adamw_torch"


def resolve_config_optim(
    optim_name: str | None, device: torch.device | str, optim_args: str | None = None
) -> str:
    """The optimizer a config will train with, resolved when the config is built (as ``bf16`` is):
    ``None`` -> ``default_optim_name`` (warned once when CUDA is there but bitsandbytes cannot run),
    anything else as ``resolve_optim_name`` (so a bad name, a missing package or a bitsandbytes
    optimizer that cannot run here fails when the config is built, not when training starts)."""
    device = torch.device(device)
    if optim_name is None:
        name = default_optim_name(device)
        problem = bitsandbytes_problem(device.type)
        if device.type == "cuda" and problem is not None:
            warn_once(f"the default optim 'adamw_8bit' falls back to 'adamw_torch': {problem}")
        return name
    return resolve_optim_name(optim_name, device, optim_args)


def resolve_optim_name(optim_name: Any, device: torch.device | str, optim_args: str | None = None) -> str:
    """The optimizer that will actually run on ``device``: the 8-bit AdamW names fall back to
    ``adamw_torch`` where bitsandbytes cannot run (warned once); another bitsandbytes optimizer there,
    an unknown or refused name, or one transformers cannot build here is a ValueError."""
    name = checked_optim_name(optim_name)
    device_type = torch.device(device).type
    if name in BNB_OPTIMIZERS:
        if (problem := bitsandbytes_problem(device_type)) is not None:
            warn_once(f"optim={name!r} falls back to 'adamw_torch': {problem}")
            return "adamw_torch"
        return name
    optimizer_cls, _ = optimizer_cls_and_kwargs(name, optim_args=optim_args)
    if is_bitsandbytes(optimizer_cls) and (problem := bitsandbytes_problem(device_type)) is not None:
        raise ValueError(
            f"optim={name!r} cannot run here: {problem} (only the 8-bit AdamW names "
            f"{list(BNB_OPTIMIZERS)} fall back to 'adamw_torch')"
        )
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


def build_optimizer(groups: list[dict], optim_name: str, **hyperparameters: Any) -> torch.optim.Optimizer:
    """transformers' optimizer for ``optim_name`` over ``groups`` (``optimizer_cls_and_kwargs`` takes
    ``hyperparameters``); a group's own ``weight_decay`` wins over the default. No device check: see
    ``resolve_optim_name``."""
    optimizer_cls, kwargs = optimizer_cls_and_kwargs(optim_name, **hyperparameters)
    return optimizer_cls(groups, **kwargs)


def create_optimizer(
    modules: nn.Module | Iterable[nn.Module],
    optim_name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    optim_args: str | None = None,
) -> torch.optim.Optimizer:
    """The ``optim_name`` optimizer over the trainable parameters of ``modules`` (policy, and a
    critic if any), as it can run on their device (``resolve_optim_name``).

    Example:
        >>> opt = create_optimizer([policy, critic], "sgd", lr=1e-6, optim_args="momentum=0.9")
    """
    groups = parameter_groups(modules, weight_decay)
    device = next(p for g in groups for p in g["params"]).device
    name = resolve_optim_name(optim_name, device, optim_args)
    return build_optimizer(
        groups, name, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, optim_args=optim_args
    )


def optimizer_from_config(args: Any, modules: Iterable[nn.Module], sharded: bool) -> torch.optim.Optimizer:
    """The optimizer a config asks for (``optim``, ``optim_args``, ``learning_rate``,
    ``weight_decay``, Adam's betas and epsilon) over ``modules``. Sharded runs fall back from 8-bit
    AdamW (bitsandbytes does not shard its state here) to ``adamw_torch``, said once; another
    bitsandbytes optimizer is refused there."""
    name = checked_optim_name(args.optim)
    if sharded and name in BNB_OPTIMIZERS:
        warn_once(f"optim={name!r} with fsdp: bitsandbytes does not shard its state here; adamw_torch")
        name = "adamw_torch"
    elif sharded and is_bitsandbytes(optimizer_cls_and_kwargs(name, optim_args=args.optim_args)[0]):
        raise ValueError(f"optim={name!r} with fsdp: bitsandbytes does not shard its state here")
    return create_optimizer(
        modules,
        name,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        optim_args=args.optim_args,
    )
