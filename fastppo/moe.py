"""The Mixture-of-Experts load-balancing auxiliary loss, added to the policy loss as TRL 1.16's
GRPOTrainer adds it: ``loss + router_aux_loss_coef * aux_loss / gradient_accumulation_steps``.

TRL asks the model for ``output_router_logits`` and reads ``outputs.aux_loss``. fastppo's fused path
runs the decoder to hidden states only (and a frozen trunk runs its layers one by one), so the
router logits are recorded from the routers themselves, with forward hooks on the module class the
model declares in transformers' ``_can_record_outputs["router_logits"]`` (what ``output_router_logits``
records), on every path alike. The loss is the model module's own ``load_balancing_loss_func``
(Switch Transformer eq. 4-6) over those logits, padding excluded by the attention mask as the
model's forward does (a packed row holds no padding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import unwrap_peft


@dataclasses.dataclass(frozen=True)
class RouterAuxLoss:
    """The policy's load-balancing loss settings; ``coef == 0`` switches it off (a dense model)."""

    coef: float
    router_class: type[nn.Module] | None = None  # the module whose output holds a layer's router logits
    index: int = 0  # which of its outputs
    num_experts: int = 0
    top_k: int = 0
    loss_func: Any = None  # the model module's load_balancing_loss_func

    @property
    def enabled(self) -> bool:
        return self.coef != 0.0

    @classmethod
    def from_model(cls, model: nn.Module, coef: float | None) -> RouterAuxLoss:
        """TRL's rule: ``coef`` None takes the model config's ``router_aux_loss_coef`` (0.0 when it
        declares none); the loss is on for a config with ``output_router_logits`` (an MoE model)
        and a non-zero coefficient; a non-zero ``coef`` for a model without it is an error."""
        base = unwrap_peft(model)
        config = base.config.get_text_config()
        resolved = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
        if coef and not hasattr(config, "output_router_logits"):
            raise ValueError(
                f"`router_aux_loss_coef` is set to {coef} but {type(base).__name__} is not a "
                "Mixture-of-Experts model that returns its router logits, so there is no auxiliary loss to "
                "weight."
            )
        if not hasattr(config, "output_router_logits") or not resolved:
            return cls(0.0)
        recorder = getattr(base, "_can_record_outputs", {}).get("router_logits")
        loss_func = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
        target = getattr(recorder, "target_class", None)
        # the arguments the model's forward passes (its own attributes, or its text config's)
        num_experts = getattr(base, "num_experts", getattr(config, "num_experts", None))
        top_k = getattr(base, "num_experts_per_tok", getattr(config, "num_experts_per_tok", None))
        if target is None or getattr(recorder, "layer_name", None) or None in (loss_func, num_experts, top_k):
            raise ValueError(
                f"{type(base).__name__} declares router_aux_loss_coef={resolved} but fastppo cannot record "
                "its router logits (no router module class, load_balancing_loss_func or expert counts in "
                "transformers): set router_aux_loss_coef=0.0 to train without the load-balancing loss"
            )
        return cls(float(resolved), target, recorder.index, num_experts, top_k, loss_func)

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Every router's logits (``[tokens, experts]`` per MoE layer, in call order) of the forwards
        run inside the block; nothing is recorded (no hooks) when the loss is off. The hooks go at
        the block's end, so recomputation in backward (activation checkpointing) records nothing."""
        logits: list[torch.Tensor] = []
        if not self.enabled:
            yield logits
            return

        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            logits.append(output[self.index] if isinstance(output, (tuple, list)) else output)

        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, self.router_class)]
        try:
            yield logits
        finally:
            for hook in hooks:
                hook.remove()

    def loss(self, logits: list[torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The unweighted load-balancing loss of the recorded logits. ``attention_mask``: ``[b, L]``
        of the padded forward (padding excluded), None for a packed one (no padding)."""
        if not logits:
            raise ValueError("no router logits were recorded: the forward ran outside `recording`")
        if attention_mask is not None and logits[0].shape[0] != attention_mask.numel():
            raise ValueError(
                f"router logits of {logits[0].shape[0]} tokens for an attention mask of "
                f"{attention_mask.numel()}"
            )
        return self.loss_func(tuple(logits), self.num_experts, self.top_k, attention_mask)
