"""PEFT (LoRA) adapters, recognised in one place: the policy wrapped in a ``peft.PeftModel`` or a
transformers model with adapters loaded through its PEFT integration, the transformers model inside
the wrapper, and the policy run with its adapters switched off (the LoRA reference: zero extra
weights)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    """A ``peft.PeftModel`` wrapper: adapters injected into the transformers model it wraps, saved
    and loaded as adapters only (``adapter_model.safetensors``)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def has_adapters(model: nn.Module) -> bool:
    """A PEFT model, or a transformers model with PEFT adapters loaded (``model.load_adapter``)."""
    return is_peft_model(model) or getattr(model, "_hf_peft_config_loaded", False)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (adapters are injected in place), else ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model: with LoRA the reference costs zero extra weights.

    Example:
        >>> with torch.no_grad(), adapters_disabled(policy):
        ...     ref_hidden = policy.model(ids, attention_mask=mask).last_hidden_state
    """
    if is_peft_model(model):
        with model.disable_adapter():
            yield model
    elif getattr(model, "_hf_peft_config_loaded", False):  # transformers' PEFT integration
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
    else:
        raise ValueError(
            f"{type(model).__name__} has no adapters to disable; the adapter-free reference needs a "
            "PEFT model (peft_config)"
        )
