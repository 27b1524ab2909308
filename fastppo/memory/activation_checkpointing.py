"""Activation (gradient) checkpointing that keeps a frozen trunk out of the backward pass.

transformers' ``gradient_checkpointing_enable`` always calls ``enable_input_require_grads()`` on a
causal LM: a hook that makes the embedding output require grad, so autograd records every frozen
layer and the backward runs (and recomputes) them to produce a gradient nobody uses. That hook is
only needed by *reentrant* checkpointing, which drops parameter gradients of a checkpointed block
whose inputs do not require grad. With the default non-reentrant checkpointing it is removed again.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import unwrap_peft


def enable_gradient_checkpointing(
    model: nn.Module, *, use_reentrant: bool = False, **checkpoint_kwargs: Any
) -> nn.Module:
    """Checkpoint every decoder layer of ``model`` (a transformers causal LM, or a PEFT model).

    Non-reentrant (default): nothing is recorded for frozen layers in front of the first trainable
    one, so a frozen trunk costs no activation memory and no backward compute. Reentrant: the
    embedding output is made to require grad whenever the embedding is frozen (a frozen trunk,
    LoRA), as the reentrant implementation needs. ``checkpoint_kwargs`` (e.g. ``preserve_rng_state``)
    go to ``torch.utils.checkpoint.checkpoint`` as the user's ``gradient_checkpointing_kwargs``.
    """
    base = unwrap_peft(model)
    kwargs = {"use_reentrant": use_reentrant, **checkpoint_kwargs}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    embedding_frozen = not any(p.requires_grad for p in base.get_input_embeddings().parameters())
    if use_reentrant and embedding_frozen:
        base.enable_input_require_grads()
    elif not use_reentrant:
        base.disable_input_require_grads()
    return model
