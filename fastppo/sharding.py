"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``): the path past one
GPU's memory. Parameters, gradients and optimizer state are split over the processes; each process
still trains on its own rows of the global batch, as in plain data parallelism.

Turned on the way Trainer users turn it on: ``fsdp=True`` (and ``fsdp_config``) in the config, or an
``accelerate launch`` configured for FSDP version 2 (``--use_fsdp --fsdp_version 2``, honoured on CPU
processes too, where accelerate itself ignores it). The trainer shards the models itself, in place:
each decoder layer is one FSDP unit and the root (embedding, final norm, lm_head) another. It does
not hand them to ``accelerator.prepare``: the fused loss runs parts of the model outside its
``forward``, which only works when the trainer knows where the unit boundaries are.

What sharding changes, and why:
  - generation: every unit is gathered once for the whole ``generate`` call (``gathered``), not once
    per decoded token; no collective runs inside ``generate``, so processes may stop at different
    completion lengths without waiting for each other.
  - the fused loss multiplies hidden states by the lm_head weight outside lm_head's ``forward``: the
    model runs its own ``forward`` with no logits kept, which leaves the root unit gathered (FSDP keeps
    the root's parameters after forward for backward), and FSDP's end-of-backward pass reduce-scatters
    the gradient the kernel wrote into the gathered weight.
  - gradients are averaged by FSDP's reduce-scatter, so the trainer's explicit all-reduce covers only
    unsharded trained modules; the gradient norm sums every process's shards (``clip_grad_norm``).
  - checkpoints: the full weights are gathered for ``save_pretrained``; the optimizer state is written
    sharded with ``torch.distributed.checkpoint`` and read back by the same number of processes.

PPOTrainer shards its policy, reference and a separate value model the same way, and both trainers
shard their reward models (frozen; after each scoring pass the root unit is freed with ``reshard``).
A value head on the policy is small and stays whole on every process (its gradient all-reduced, as
in plain data parallelism).

Not supported with sharding (a ValueError says so): FSDP1, CPU offload, ``num_frozen_layers``, PEFT
adapters, fp16, a prebuilt ``optimizers=`` optimizer, DeepSpeed. bitsandbytes' 8-bit AdamW falls
back to ``adamw_torch`` (warned); its other optimizers are refused (their state is not sharded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from .adapters import unwrap_peft
from .memory.trunk import find_decoder

OPTIMIZER_DIR = "optimizer_sharded"  # a torch.distributed.checkpoint folder inside a checkpoint


@dataclasses.dataclass(frozen=True)
class ShardingSettings:
    reshard_after_forward: bool = True  # False: gathered layers stay until backward (ZeRO-2-like)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def sharding_settings(args: Any, accelerator: Accelerator) -> ShardingSettings | None:
    """The sharding a run asked for (``args.fsdp`` / ``fsdp_config``, or accelerate's FSDP plugin),
    checked; None for unsharded runs. An unsupported option is a ValueError naming it."""
    kind = accelerator.distributed_type
    options = _config_options(args)
    if kind != DistributedType.FSDP and (launcher := _launcher_options()) is not None:
        options = {**launcher, **(options or {})}
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        options = {
            "version": plugin.fsdp_version,
            "cpu_offload": bool(getattr(plugin.cpu_offload, "offload_params", plugin.cpu_offload)),
            "reshard_after_forward": plugin.reshard_after_forward,
            **(options or {}),
        }
    elif options is None:
        return None
    if accelerator.num_processes == 1:
        warnings.warn(
            "fsdp is set but this run has one process: nothing to shard over, training unsharded",
            stacklevel=3,
        )
        return None
    if int(options.get("version", 2)) != 2:
        raise ValueError(
            f"fsdp version {options['version']!r} is not supported: fastppo shards with FSDP2 "
            "(fsdp_config={'version': 2}, or fsdp_version: 2 in the accelerate config)"
        )
    if _truthy(options.get("cpu_offload", False)) or "offload" in options.get("legacy", ()):
        raise ValueError("fsdp cpu_offload is not supported by fastppo's sharding yet; leave it off")
    if _truthy(options.get("xla", False)):
        raise ValueError(
            "fsdp_config xla=True (PyTorch/XLA FSDP) is not supported; fastppo shards with FSDP2"
        )
    if _truthy(options.get("activation_checkpointing", False)):
        raise ValueError(
            "fsdp_config activation_checkpointing is not applied by fastppo; use gradient_checkpointing=True"
        )
    if "hybrid_shard" in options.get("legacy", ()):
        raise ValueError("fsdp 'hybrid_shard' is not supported; use 'full_shard' or 'shard_grad_op'")
    if getattr(args, "fp16", False):
        raise ValueError("fp16 with fsdp is not supported (no sharded gradient scaler); use bf16")
    if getattr(args, "num_frozen_layers", None) is not None:
        raise ValueError(
            "num_frozen_layers (a reference sharing the policy's trunk) cannot be combined with fsdp; "
            "leave num_frozen_layers=None when sharding"
        )
    reshard = options.get("reshard_after_forward", "shard_grad_op" not in options.get("legacy", ()))
    if isinstance(reshard, str) and reshard.upper() in ("FULL_SHARD", "SHARD_GRAD_OP"):
        reshard = reshard.upper() == "FULL_SHARD"  # FSDP1's sharding-strategy spelling
    return ShardingSettings(reshard_after_forward=_truthy(reshard))


def _config_options(args: Any) -> dict[str, Any] | None:
    """``fsdp`` / ``fsdp_config`` of a TrainingArguments as one dict (None when fsdp is off); the
    legacy option strings ("full_shard offload ...") under "legacy"."""
    fsdp = getattr(args, "fsdp", None)
    if not fsdp:
        return None
    config = getattr(args, "fsdp_config", None) or {}
    options = {key.removeprefix("fsdp_"): value for key, value in dict(config).items()}
    if isinstance(fsdp, str) and fsdp.strip().lower() not in ("true", "1"):
        fsdp = fsdp.split()
    if isinstance(fsdp, (list, tuple)):
        options["legacy"] = tuple(str(getattr(o, "value", o)).lower() for o in fsdp)
    return options


def _launcher_options() -> dict[str, Any] | None:
    """What ``accelerate launch --use_fsdp`` put in the environment. accelerate sets up FSDP only on
    GPUs and ignores it on CPU processes; fastppo shards there too (gloo), rather than silently not."""
    if not _truthy(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        return None
    names = {"version": "FSDP_VERSION", "reshard_after_forward": "FSDP_RESHARD_AFTER_FORWARD"}
    names.update(cpu_offload="FSDP_OFFLOAD_PARAMS", activation_checkpointing="FSDP_ACTIVATION_CHECKPOINTING")
    return {key: os.environ[name] for key, name in names.items() if name in os.environ}


# models sharded by ``shard``, with their settings (generation restores them after gathering)
_SHARDED: weakref.WeakKeyDictionary[nn.Module, ShardingSettings] = weakref.WeakKeyDictionary()


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def shard(model: nn.Module, settings: ShardingSettings) -> None:
    """Shard a causal LM in place: each decoder layer, then the root (embedding, norm, lm_head).
    Every process must hold the same weights first (``distributed.broadcast_parameters``)."""
    layers = getattr(find_decoder(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"fsdp needs a decoder with a `layers` ModuleList (Llama, Qwen2, Mistral, ...); "
            f"{type(unwrap_peft(model)).__name__} has none"
        )
    for layer in layers:
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, reshard_after_forward=settings.reshard_after_forward)
    _SHARDED[model] = settings


def final_hidden_states(model: nn.Module, inputs: dict[str, Any], **extra: Any) -> torch.Tensor:
    """``[B, L, H]`` last (normed) hidden states of a sharded model through its own forward: the
    root unit (embedding, final norm, heads) is gathered only there. The root is left gathered (again,
    after a no-grad forward resharded it) for the head the caller applies to them; backward or
    ``reshard`` frees it."""
    out = model(**inputs, output_hidden_states=True, **extra)
    model.unshard()  # the root unit only (not recursive)
    return out.hidden_states[-1]


def _units(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every unit of a sharded ``model`` gathered for the block (generation), resharded after; the
    block's forwards then run no collective. A no-op for an unsharded model."""
    settings = _SHARDED.get(model)
    if settings is None:
        yield
        return
    model.set_reshard_after_forward(False)
    for unit in _units(model):
        unit.unshard()
    try:
        yield
    finally:  # the layers as configured; the root keeps its parameters for backward (as fully_shard)
        model.set_reshard_after_forward(settings.reshard_after_forward)
        model.set_reshard_after_forward(False, recurse=False)
        reshard(model)


def reshard(model: nn.Module) -> None:
    """Free the gathered root unit after a no-grad forward (it stays gathered otherwise: FSDP keeps
    the root for a backward that a scoring pass never runs)."""
    if is_sharded(model):
        for unit in _units(model):
            unit.reshard()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded gradients and whole ones (a replicated critic head, already
    averaged over the processes): the norm of the whole gradient, the same on every process."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [local(g).float().pow(2).sum() for g in grads if isinstance(g, DTensor)]
    whole = [g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.stack(sharded).sum() if sharded else torch.zeros((), device=device)
    dist.all_reduce(squares)  # each process holds different shards: sum them all
    if whole:
        squares = squares + torch.stack(whole).sum().to(squares.device)
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for g in grads:
        local(g).mul_(scale.to(g.device))
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of the main process ({} elsewhere). Collective: every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load whole-model weights (every process holds them) into a sharded model, each process
    keeping its shard. Tied copies absent from ``weights`` are left to the tensor they share."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def local_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with this process's shards as plain tensors (per-process checkpoint files)."""
    return {name: local(value).detach() for name, value in module.state_dict().items()}


@torch.no_grad()
def load_local_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for name, value in state.items():
        local(own[name]).copy_(value)


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """The optimizer's sharded state into a ``torch.distributed.checkpoint`` folder (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to read into
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
