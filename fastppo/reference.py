"""The reference policy: frozen, used only for the KL term, so none is built when its coefficient is 0
(GRPO's ``beta``, PPO's ``kl_coef``; TRL PR #2806).

One protocol (``ReferencePolicy``), three ways of holding it, picked in one place (``build_reference``):
- ``FrozenCopyReference``: a frozen deep copy of the policy (the default), or the ``ref_model`` a user
  passed, frozen in place;
- ``AdapterDisabledReference``: a PEFT policy with its adapters switched off: zero extra weights;
- ``SharedTrunkReference`` (``num_frozen_layers=K``): the policy's frozen embedding and first K layers
  are shared and the reference owns a frozen copy of only the layers above, the final norm and (when
  not tied to the embedding) lm_head, so its extra memory is ``(L - K) * layer + norm (+ lm_head)``
  instead of a whole model (TRL #1245 asked for this), and one trunk pass serves the policy's and
  the reference's log-probs (and a trunk critic's values).
Each scores with the trainer's ``PolicyForward``, so fused / plain and padded / packed hold for it too.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from .adapters import adapters_disabled, has_adapters
from .batch import PolicyBatch
from .config import ForwardPlan
from .memory.trunk import (
    Trunk,
    check_trunk_frozen,
    decoder_of,
    head_is_tied,
    lm_head_of,
    own_top_copy,
    run_top,
)
from .policy_forward import PolicyForward, TrunkPass, eval_mode, logit_transform
from .sharding import load_local_state_dict, local_state_dict


class ReferencePolicy(Protocol):
    """What the trainers ask of a reference policy."""

    synced: bool  # sync_ref_model: its own weights move during training (and travel in checkpoints)

    def logprobs(
        self, batch: PolicyBatch, temperature: float, trunk: TrunkPass | None = None
    ) -> torch.Tensor:
        """``[b, Lc]`` fp32 log-probs of the completion tokens under the reference (no grad).
        ``trunk``: the policy's trunk pass over this batch, which a reference sharing the trunk reads
        instead of running its own (the others hold no trunk of the policy's and ignore it)."""
        ...

    def own_weights(self) -> nn.Module | None:
        """The weights it holds apart from the policy (sharded with fsdp; checkpointed when synced),
        or None when it holds none."""
        ...

    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO mix (Gorbatovski et al. 2024): ``ref = alpha * policy + (1 - alpha) * ref``."""
        ...

    def checkpoint_state(self) -> dict[str, torch.Tensor] | None: ...

    def load_checkpoint_state(self, state: dict[str, torch.Tensor] | None) -> None: ...


class _SyncedWeightsState:
    """A reference's checkpoint state: this process's part of its own weights when syncing changes
    them, None otherwise (a frozen reference is rebuilt as it was)."""

    synced: bool

    def checkpoint_state(self) -> dict[str, torch.Tensor] | None:
        return local_state_dict(self.own_weights()) if self.synced else None

    def load_checkpoint_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            load_local_state_dict(self.own_weights(), state)


@torch.no_grad()
def _mix_into(own: nn.Module, source: nn.Module, alpha: float) -> None:
    """``own = alpha * source + (1 - alpha) * own``, parameter by parameter."""
    for ref_param, param in zip(own.parameters(), source.parameters(), strict=True):
        ref_param.lerp_(param.detach().to(ref_param.dtype), alpha)


class FrozenCopyReference(_SyncedWeightsState):
    """A frozen model (no grad, eval mode): a deep copy of the policy taken before training, or a
    reference model the user passed (legacy PPO's ``ref_model``), frozen in place, never copied."""

    def __init__(
        self,
        policy: nn.Module,
        policy_forward: PolicyForward,
        *,
        copy_policy: bool = True,
        synced: bool = False,
    ):
        self.model = (copy.deepcopy(policy) if copy_policy else policy).eval()
        self.model.requires_grad_(False)
        self.policy_forward, self.synced = policy_forward, synced

    def logprobs(
        self, batch: PolicyBatch, temperature: float, trunk: TrunkPass | None = None
    ) -> torch.Tensor:
        return self.policy_forward.score(self.model, batch, temperature)

    def own_weights(self) -> nn.Module:
        return self.model

    def sync(self, policy: nn.Module, alpha: float) -> None:
        _mix_into(self.model, policy, alpha)


class AdapterDisabledReference(_SyncedWeightsState):
    """A PEFT policy scored with its adapters disabled: the base model, no extra weights.

    Syncing it is meaningless (the base weights are frozen), so ``build_reference`` refuses
    ``sync_ref_model`` for PEFT policies instead of silently doing nothing (TRL's is broken there).
    """

    synced = False

    def __init__(self, peft_model: nn.Module, policy_forward: PolicyForward):
        self.model, self.policy_forward = peft_model, policy_forward

    def logprobs(
        self, batch: PolicyBatch, temperature: float, trunk: TrunkPass | None = None
    ) -> torch.Tensor:
        with adapters_disabled(self.model):
            return self.policy_forward.score(self.model, batch, temperature)

    def own_weights(self) -> None:
        return None

    def sync(self, policy: nn.Module, alpha: float) -> None:
        raise ValueError(
            "a PEFT policy's reference is its base model with adapters disabled; it cannot be synced"
        )


class SharedTrunkReference(_SyncedWeightsState, nn.Module):
    """Frozen layers ``[K, L)`` + norm (+ lm_head if untied) on top of the policy's frozen trunk.

    Its ``parameters()`` are only what it owns, so optimizers, ``state_dict`` and the memory
    accounting never see the shared trunk twice. ``policy_forward``: how it scores (default: fused,
    padded); its plan's ``num_frozen_layers`` must be K.

    Example:
        >>> freeze_trunk(policy, 20)
        >>> ref = SharedTrunkReference(policy, 20)
        >>> trunk = run_trunk(policy, ids, num_layers=20, attention_mask=mask)
        >>> h_ref = ref.top(trunk)  # [B, L, H]; log-probs: linear_token_logprobs(h_ref, ref.head.weight, ...)
    """

    def __init__(
        self,
        policy: nn.Module,
        num_frozen_layers: int,
        policy_forward: PolicyForward | None = None,
        *,
        synced: bool = False,
    ):
        super().__init__()
        if (transform := logit_transform(policy)) is not None:
            raise ValueError(
                f"num_frozen_layers: the shared-trunk reference applies the bare lm_head, but the model "
                f"rescales its logits ({transform}); leave num_frozen_layers=None for this model"
            )
        policy_forward = policy_forward or PolicyForward(ForwardPlan(num_frozen_layers=num_frozen_layers))
        if policy_forward.plan.num_frozen_layers != num_frozen_layers:
            raise ValueError(
                f"the reference shares {num_frozen_layers} layers but its forward plan's trunk has "
                f"{policy_forward.plan.num_frozen_layers}"
            )
        check_trunk_frozen(policy, num_frozen_layers, "the shared-trunk reference")
        self.num_shared_layers = num_frozen_layers
        self.layers, self.norm = own_top_copy(policy, num_frozen_layers)
        # Tied head: the frozen shared embedding *is* the initial lm_head; nothing to copy.
        self.tied_head = head_is_tied(policy)
        self.lm_head = None if self.tied_head else copy.deepcopy(lm_head_of(policy))
        self.requires_grad_(False)
        self.eval()
        # Held without registering it as a submodule: the policy's parameters are not ours.
        object.__setattr__(self, "policy", policy)
        self.policy_forward, self.synced = policy_forward, synced

    @property
    def head(self) -> nn.Linear:
        """The reference's lm_head: its own frozen copy, or the policy's (frozen) tied one."""
        return lm_head_of(self.policy) if self.tied_head else self.lm_head

    def train(self, mode: bool = True) -> SharedTrunkReference:
        return super().train(False)  # always eval: the reference never uses dropout

    @torch.no_grad()
    def top(self, trunk: Trunk) -> torch.Tensor:
        """``[B, L, H]`` the reference's final hidden states from the policy's trunk pass."""
        if trunk.num_layers != self.num_shared_layers:
            raise ValueError(
                f"the reference shares {self.num_shared_layers} layers but the trunk ran {trunk.num_layers}; "
                f"call run_trunk(..., num_layers={self.num_shared_layers})"
            )
        return run_top(trunk, self.layers, self.norm)

    @torch.no_grad()
    def logprobs(
        self, batch: PolicyBatch, temperature: float, trunk: TrunkPass | None = None
    ) -> torch.Tensor:
        if trunk is None:
            with eval_mode(self.policy):  # the trunk is the policy's: no dropout in it either
                trunk = self.policy_forward.trunk_pass(self.policy, batch)
        hidden = trunk.inputs.completion_positions(self.top(trunk.trunk))
        return self.policy_forward.head_logprobs(self.head, hidden, batch, temperature)

    def own_weights(self) -> nn.Module:
        return self

    @torch.no_grad()
    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO mix (TRL's ``SyncRefModelCallback``) of the layers the reference owns. The shared
        trunk is the policy's own frozen modules, so it is already in sync."""
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {alpha!r}")
        decoder = decoder_of(policy)
        _mix_into(self.layers, nn.ModuleList(decoder.layers[self.num_shared_layers :]), alpha)
        _mix_into(self.norm, decoder.norm, alpha)
        if self.lm_head is not None:
            _mix_into(self.lm_head, lm_head_of(policy), alpha)


def build_reference(
    policy: nn.Module,
    policy_forward: PolicyForward,
    *,
    kl_coef: float,
    sync: bool = False,
    ref_model: nn.Module | None = None,
) -> ReferencePolicy | None:
    """The reference for ``policy``, or None when ``kl_coef == 0`` (no KL term: nothing is built).

    ``ref_model`` given: that model, frozen in place. PEFT policy: adapters disabled. The plan's
    ``num_frozen_layers`` set (the trunk already frozen by ``modeling.prepare_policy``): shares that
    trunk. Otherwise: a frozen deep copy. ``sync``: sync_ref_model will mix the policy into it.
    """
    if kl_coef == 0.0:
        return None
    if ref_model is not None:
        return FrozenCopyReference(ref_model, policy_forward, copy_policy=False, synced=sync)
    if has_adapters(policy):
        if sync:
            raise ValueError(
                "sync_ref_model=True with a PEFT policy: the reference is the base model with adapters "
                "disabled, which syncing cannot change; set sync_ref_model=False"
            )
        return AdapterDisabledReference(policy, policy_forward)
    if (frozen := policy_forward.plan.num_frozen_layers) is not None:
        return SharedTrunkReference(policy, frozen, policy_forward, synced=sync)
    return FrozenCopyReference(policy, policy_forward, synced=sync)
