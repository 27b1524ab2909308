"""The reference policy: used only for the KL term (beta > 0), so none is built when beta == 0.

A small interface (``ReferencePolicy``) so implementations can differ in what they hold:
``FrozenCopyReference`` (a frozen deep copy: the default), ``AdapterDisabledReference`` (a PEFT
policy with its adapters switched off: zero extra weights). The memory work adds a reference that
shares the policy's frozen trunk; ``build_reference`` is the one place that picks.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from .scoring import PolicyBatch, score_logprobs


class ReferencePolicy(Protocol):
    def logprobs(self, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        """``[b, Lc]`` fp32 log-probs of the completion tokens under the reference (no grad)."""
        ...

    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO mix (Gorbatovski et al. 2024): ``ref = alpha * policy + (1 - alpha) * ref``."""
        ...


class FrozenCopyReference:
    """A deep copy of the policy taken before training, frozen (no grad, eval mode)."""

    def __init__(self, policy: nn.Module, *, fused: bool, chunk_bytes: int):
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)
        self.fused = fused
        self.chunk_bytes = chunk_bytes

    def logprobs(self, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        return score_logprobs(self.model, batch, temperature, fused=self.fused, chunk_bytes=self.chunk_bytes)

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        for ref_param, param in zip(self.model.parameters(), policy.parameters(), strict=True):
            ref_param.mul_(1.0 - alpha).add_(param.detach().to(ref_param.dtype), alpha=alpha)


class AdapterDisabledReference:
    """A PEFT policy scored with its adapters disabled: the base model, no extra weights.

    Syncing it is meaningless (the base weights are frozen), so ``build_reference`` refuses
    ``sync_ref_model`` for PEFT policies instead of silently doing nothing (TRL's is broken there).
    """

    def __init__(self, peft_model: nn.Module, *, fused: bool, chunk_bytes: int):
        self.model = peft_model
        self.fused = fused
        self.chunk_bytes = chunk_bytes

    def logprobs(self, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        with self.model.disable_adapter():
            return score_logprobs(
                self.model, batch, temperature, fused=self.fused, chunk_bytes=self.chunk_bytes
            )

    def sync(self, policy: nn.Module, alpha: float) -> None:
        raise ValueError(
            "a PEFT policy's reference is its base model with adapters disabled; it cannot be synced"
        )


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def build_reference(
    policy: nn.Module, *, beta: float, sync: bool, fused: bool, chunk_bytes: int
) -> ReferencePolicy | None:
    """The reference for ``policy``, or None when ``beta == 0`` (no KL term: nothing is built)."""
    if beta == 0.0:
        return None
    if is_peft_model(policy):
        if sync:
            raise ValueError(
                "sync_ref_model=True with a PEFT policy: the reference is the base model with adapters "
                "disabled, which syncing cannot change; set sync_ref_model=False"
            )
        return AdapterDisabledReference(policy, fused=fused, chunk_bytes=chunk_bytes)
    return FrozenCopyReference(policy, fused=fused, chunk_bytes=chunk_bytes)
