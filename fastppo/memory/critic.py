"""A PPO critic that plugs into the policy's trunk pass instead of being a second whole model.

Two shapes, both reading a ``Trunk`` (``trunk.run_trunk``):
- ``ValueHead`` on the policy's own final hidden states (``policy_top(policy, trunk)``): the legacy
  "causal LM with value head"; zero extra layers, the value loss also trains the policy's top.
- ``TrunkValueModel``: its own trainable copy of layers ``[K, L)`` + norm + ``ValueHead`` on the
  shared frozen trunk; the critic learns apart from the policy, at ``L - K`` layers' cost instead of
  a whole model's.
"""

from __future__ import annotations

import torch
from torch import nn

from .trunk import Trunk, check_trunk_frozen, decoder_of, own_top_copy, run_top


class ValueHead(nn.Module):
    """``[..., H] -> [...]`` fp32 values: one linear unit per position (as legacy TRL's ``score``)."""

    def __init__(self, hidden_size: int, *, init_std: float = 0.02, dtype: torch.dtype | None = None):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.normal_(self.score.weight, std=init_std)  # transformers' initializer_range default
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return fp32_linear(self.score, hidden).squeeze(-1)


def fp32_linear(linear: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``linear(hidden)`` in fp32 whatever autocast says: values feed GAE, value clipping and the
    value loss, and bf16 rounding of a value of ~20 is already ~0.1."""
    bias = None if linear.bias is None else linear.bias.float()
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), linear.weight.float(), bias)


class TrunkValueModel(nn.Module):
    """Trainable copy of the policy's layers ``[K, L)`` and norm, then a ``ValueHead``.

    Built from the policy at the start of training (legacy TRL initialised its critic from the
    reward model; a critic sharing the policy's trunk must share its architecture). Its
    ``parameters()`` are only what it owns: give them to the optimizer next to the policy's.

    Example:
        >>> critic = TrunkValueModel(policy, 20)
        >>> values = critic(run_trunk(policy, ids, num_layers=20, attention_mask=mask))  # [B, L] fp32
    """

    def __init__(self, policy: nn.Module, num_shared_layers: int):
        super().__init__()
        check_trunk_frozen(policy, num_shared_layers, "the shared-trunk critic")
        self.num_shared_layers = num_shared_layers
        self.layers, self.norm = own_top_copy(policy, num_shared_layers)
        self.requires_grad_(True)
        embedding = decoder_of(policy).embed_tokens.weight
        self.head = ValueHead(
            embedding.shape[1],
            init_std=getattr(decoder_of(policy).config, "initializer_range", 0.02),
            dtype=embedding.dtype,
        ).to(embedding.device)

    def forward(self, trunk: Trunk) -> torch.Tensor:
        """``[B, L]`` fp32 value of every position."""
        if trunk.num_layers != self.num_shared_layers:
            raise ValueError(
                f"the critic shares {self.num_shared_layers} layers but the trunk ran {trunk.num_layers}; "
                f"call run_trunk(..., num_layers={self.num_shared_layers})"
            )
        return self.head(run_top(trunk, self.layers, self.norm))
