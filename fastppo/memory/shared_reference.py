"""A reference policy that shares the policy's frozen trunk instead of copying the whole model.

With ``num_frozen_layers=K`` the policy's input embedding and first K decoder layers are frozen
(``trunk.freeze_trunk``). The reference reuses those very modules and owns a frozen copy of only
decoder layers ``[K, L)``, the final norm and, when lm_head is not tied to the embedding, lm_head.
Its extra parameter memory is therefore ``(L - K) * layer + norm (+ lm_head if untied)`` instead of
a whole model (TRL #1245 asked for this), and one trunk pass serves the policy's and the
reference's scoring in the same batch.

With PEFT/LoRA the reference is the base model with its adapters disabled (``adapters_disabled``):
zero extra weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .trunk import Trunk, check_trunk_frozen, decoder_of, head_is_tied, lm_head_of, own_top_copy, run_top


class SharedTrunkReference(nn.Module):
    """Frozen layers ``[K, L)`` + norm (+ lm_head if untied) on top of the policy's frozen trunk.

    Its ``parameters()`` are only what it owns, so optimizers, ``state_dict`` and the memory
    accounting never see the shared trunk twice.

    Example:
        >>> freeze_trunk(policy, 20)
        >>> ref = SharedTrunkReference(policy, 20)
        >>> trunk = run_trunk(policy, ids, num_layers=20, attention_mask=mask)
        >>> h_ref = ref.top(trunk)  # [B, L, H]; log-probs: linear_token_logprobs(h_ref, ref.head.weight, ...)
    """

    def __init__(self, policy: nn.Module, num_frozen_layers: int):
        super().__init__()
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
    def sync(self, policy: nn.Module, alpha: float) -> None:
        """TR-DPO mix (Gorbatovski et al. 2024, TRL's ``SyncRefModelCallback``) of the layers the
        reference owns: ``ref = alpha * policy + (1 - alpha) * ref``. The shared trunk is the
        policy's own frozen modules, so it is already in sync."""
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {alpha!r}")
        decoder = decoder_of(policy)
        policy_top_layers = nn.ModuleList(decoder.layers[self.num_shared_layers :])
        pairs = [(self.layers, policy_top_layers), (self.norm, decoder.norm)]
        if self.lm_head is not None:
            pairs.append((self.lm_head, lm_head_of(policy)))
        for own, source in pairs:
            for ref_param, param in zip(own.parameters(), source.parameters(), strict=True):
                ref_param.lerp_(param.detach().to(ref_param.dtype), alpha)
