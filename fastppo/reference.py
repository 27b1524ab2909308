"""The reference policy: used only for the KL term (beta > 0), so none is built when beta == 0.

A small interface (``ReferencePolicy``) so implementations can differ in what they hold:
``FrozenCopyReference`` (a frozen deep copy: the default), ``AdapterDisabledReference`` (a PEFT
policy with its adapters switched off: zero extra weights), ``SharedTrunkPolicyReference`` (with
``num_frozen_layers=K``: the policy's frozen embedding and first K layers are shared, the reference
owns a frozen copy of only the layers above; one trunk pass scores the policy and the reference).
``build_reference`` is the one place that picks.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from .adapters import adapters_disabled, has_adapters
from .memory.shared_reference import SharedTrunkReference
from .scoring import (
    PolicyBatch,
    TrunkPass,
    completion_hidden_states,
    eval_mode,
    head_logprobs,
    lm_parts,
    logit_transform,
    score_logprobs,
    trunk_pass,
)


class ReferencePolicy(Protocol):
    def logprobs(self, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        """``[b, Lc]`` fp32 log-probs of the completion tokens under the reference (no grad)."""
        ...

    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO mix (Gorbatovski et al. 2024): ``ref = alpha * policy + (1 - alpha) * ref``."""
        ...


class _Scorer:
    """How every reference runs its forwards: fused kernels or not, chunk budget, packed or padded."""

    def __init__(self, *, fused: bool, chunk_bytes: int, padding_free: bool):
        self.fused = fused
        self.chunk_bytes = chunk_bytes
        self.padding_free = padding_free

    def score(self, model: nn.Module, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        return score_logprobs(
            model,
            batch,
            temperature,
            fused=self.fused,
            chunk_bytes=self.chunk_bytes,
            padding_free=self.padding_free,
        )


class FrozenCopyReference(_Scorer):
    """A frozen model (no grad, eval mode): a deep copy of the policy taken before training, or a
    reference model the user passed (legacy PPO's ``ref_model``), frozen in place, never copied."""

    def __init__(
        self,
        policy: nn.Module,
        *,
        fused: bool,
        chunk_bytes: int,
        padding_free: bool = False,
        copy_policy: bool = True,
    ):
        super().__init__(fused=fused, chunk_bytes=chunk_bytes, padding_free=padding_free)
        self.model = (copy.deepcopy(policy) if copy_policy else policy).eval()
        self.model.requires_grad_(False)

    def logprobs(self, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        return self.score(self.model, batch, temperature)

    def own_weights(self) -> nn.Module:
        """The weights this reference owns (checkpointed when sync_ref_model changes them)."""
        return self.model

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        for ref_param, param in zip(self.model.parameters(), policy.parameters(), strict=True):
            ref_param.lerp_(param.detach().to(ref_param.dtype), alpha)


class AdapterDisabledReference(_Scorer):
    """A PEFT policy scored with its adapters disabled: the base model, no extra weights.

    Syncing it is meaningless (the base weights are frozen), so ``build_reference`` refuses
    ``sync_ref_model`` for PEFT policies instead of silently doing nothing (TRL's is broken there).
    """

    def __init__(self, peft_model: nn.Module, *, fused: bool, chunk_bytes: int, padding_free: bool = False):
        super().__init__(fused=fused, chunk_bytes=chunk_bytes, padding_free=padding_free)
        self.model = peft_model

    def logprobs(self, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        with adapters_disabled(self.model):
            return self.score(self.model, batch, temperature)

    def sync(self, policy: nn.Module, alpha: float) -> None:
        raise ValueError(
            "a PEFT policy's reference is its base model with adapters disabled; it cannot be synced"
        )


class SharedTrunkPolicyReference(_Scorer):
    """``memory.SharedTrunkReference`` behind the ``ReferencePolicy`` interface.

    Extra weights: layers ``[K, L)``, the final norm and (untied) lm_head, not a whole model.
    ``logprobs_with_policy`` runs the trunk once and both tops on it (old and reference log-probs
    of a minibatch for the price of one trunk); ``sync`` mixes only the layers the reference owns.
    """

    def __init__(
        self,
        policy: nn.Module,
        num_frozen_layers: int,
        *,
        fused: bool,
        chunk_bytes: int,
        padding_free: bool = False,
    ):
        super().__init__(fused=fused, chunk_bytes=chunk_bytes, padding_free=padding_free)
        if (transform := logit_transform(policy)) is not None:
            raise ValueError(
                f"num_frozen_layers: the shared-trunk reference applies the bare lm_head, but the model "
                f"rescales its logits ({transform}); leave num_frozen_layers=None for this model"
            )
        self.policy = policy
        self.module = SharedTrunkReference(policy, num_frozen_layers)

    @property
    def num_shared_layers(self) -> int:
        return self.module.num_shared_layers

    def _head_logprobs(
        self, head: nn.Linear, hidden: torch.Tensor, batch: PolicyBatch, temperature: float
    ) -> torch.Tensor:
        return head_logprobs(head, hidden, batch, temperature, fused=self.fused, chunk_bytes=self.chunk_bytes)

    @torch.no_grad()
    def logprobs(self, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        with eval_mode(self.policy):  # the trunk is the policy's: no dropout in it either
            shared = trunk_pass(self.policy, batch, self.num_shared_layers, self.padding_free)
        return self.logprobs_from_trunk(shared, batch, temperature)

    @torch.no_grad()
    def logprobs_from_trunk(self, shared: TrunkPass, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        """``[b, Lc]`` reference log-probs from a trunk pass already run for the policy (or a critic)."""
        hidden = shared.inputs.completion_positions(self.module.top(shared.trunk))
        return self._head_logprobs(self.module.head, hidden, batch, temperature)

    @torch.no_grad()
    def logprobs_with_policy(
        self,
        policy: nn.Module,
        batch: PolicyBatch,
        temperature: float,
        shared: TrunkPass | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([b, Lc], [b, Lc])`` fp32 log-probs under ``policy`` (the old log-probs) and under the
        reference, no grad, from one trunk pass (``shared``: one already run, e.g. for a critic too)."""
        if policy is not self.policy:
            raise ValueError("the shared-trunk reference scores only the policy it shares its trunk with")
        with eval_mode(policy):
            if shared is None:
                shared = trunk_pass(policy, batch, self.num_shared_layers, self.padding_free)
            policy_hidden = completion_hidden_states(policy, batch, shared=shared)
        _, head = lm_parts(policy)
        return (
            self._head_logprobs(head, policy_hidden, batch, temperature),
            self.logprobs_from_trunk(shared, batch, temperature),
        )

    def sync(self, policy: nn.Module, alpha: float) -> None:
        self.module.sync(policy, alpha)

    def own_weights(self) -> nn.Module:
        """The weights this reference owns (checkpointed when sync_ref_model changes them)."""
        return self.module


def build_reference(
    policy: nn.Module,
    *,
    beta: float,
    sync: bool,
    fused: bool,
    chunk_bytes: int,
    padding_free: bool = False,
    num_frozen_layers: int | None = None,
    ref_model: nn.Module | None = None,
) -> ReferencePolicy | None:
    """The reference for ``policy``, or None when ``beta == 0`` (no KL term: nothing is built).

    ``ref_model`` given: that model, frozen in place. PEFT policy: adapters disabled.
    ``num_frozen_layers`` set (the trunk already frozen by ``modeling.prepare_policy``): shares that
    trunk. Otherwise: a frozen deep copy.
    """
    if beta == 0.0:
        return None
    scoring = dict(fused=fused, chunk_bytes=chunk_bytes, padding_free=padding_free)
    if ref_model is not None:
        return FrozenCopyReference(ref_model, copy_policy=False, **scoring)
    if has_adapters(policy):
        if sync:
            raise ValueError(
                "sync_ref_model=True with a PEFT policy: the reference is the base model with adapters "
                "disabled, which syncing cannot change; set sync_ref_model=False"
            )
        return AdapterDisabledReference(policy, **scoring)
    if num_frozen_layers is not None:
        return SharedTrunkPolicyReference(policy, num_frozen_layers, **scoring)
    return FrozenCopyReference(policy, **scoring)
