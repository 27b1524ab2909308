"""PPO's critic, in one home: its loss (the clipped value loss of legacy TRL's PPOTrainer) and where its
values come from, each kind reading what the policy's pass already computed when it can:

- ``PolicyValueHead``: a linear head on the policy's final hidden states (legacy TRL's "causal LM
  with value head"); no second model, the value loss also trains the policy's body.
- ``OwnLayersCritic`` (``critic="own_layers"``): its own trainable copy of the layers above the
  policy's frozen trunk and a head, reading the trunk pass the policy ran; it learns apart from the
  policy at ``L - K`` layers' cost instead of a whole model's.
- ``SeparateValueModel``: a sequence-classification model of its own (legacy TRL's ``value_model``).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from .advantages import masked_mean
from .batch import PolicyBatch
from .memory.trunk import Trunk, check_trunk_frozen, decoder_of, own_top_copy, run_top
from .policy_forward import PolicyPass
from .reward_model import backbone_and_score, fp32_linear, per_position_scores
from .sharding import full_state_dict, is_sharded


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # scalar, already halved (0.5 * mean squared error), not yet scaled by vf_coef
    clipfrac: torch.Tensor  # scalar, fraction of tokens where the clipped error was the larger one


def clipped_value_loss(
    values: torch.Tensor,  # [B, T] current value predictions (with grad)
    old_values: torch.Tensor,  # [B, T] predictions recorded at rollout time
    returns: torch.Tensor,  # [B, T] GAE returns
    mask: torch.Tensor,  # [B, T] 1 where the token counts
    cliprange_value: float,
) -> ValueLoss:
    """``0.5 * masked_mean(max((v - R)^2, (clip(v, v_old +- eps) - R)^2))``.

    Clipping keeps one rollout's many epochs from moving the value far from where it was recorded, the
    same trust region the policy gets; taking the max makes the clipped branch a pessimistic bound.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            "values, old_values, returns and mask must share one [B, T] shape, got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    if cliprange_value < 0:
        raise ValueError(f"cliprange_value must be >= 0, got {cliprange_value!r}")
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    plain_err = (values - returns).square()
    clipped_err = (clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(plain_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > plain_err).to(values.dtype), mask)
    return ValueLoss(loss, clipfrac.detach())


# --- the modules --------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """``[..., H] -> [...]`` fp32 values: one linear unit per position (as legacy TRL's ``score``)."""

    def __init__(self, hidden_size: int, *, init_std: float = 0.02, dtype: torch.dtype | None = None):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.normal_(self.score.weight, std=init_std)  # transformers' initializer_range default
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return fp32_linear(self.score, hidden).squeeze(-1)


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


# --- critics: where the values come from -------------------------------------------------------------


class Critic(Protocol):
    """Per-token values of the completion positions; trained next to the policy by one optimizer."""

    reads_policy_hidden: bool  # its values come from the policy pass's final hidden states

    def values(self, batch: PolicyBatch, policy_pass: PolicyPass) -> torch.Tensor:
        """``[b, Lc]`` fp32 value of the state before each completion token; ``policy_pass``: the
        policy's pass over ``batch`` (with hidden states when ``reads_policy_hidden``)."""
        ...

    def trained_modules(self) -> list[nn.Module]: ...

    def save(self, output_dir: str, main_process: bool) -> None:
        """Write the critic next to the policy; called on every process (a sharded critic gathers)."""
        ...


class PolicyValueHead:
    """A ``ValueHead`` on the policy's final hidden states: the values of a minibatch come from the
    same decoder pass as its log-probs."""

    reads_policy_hidden = True
    FILE = "value_head.safetensors"

    def __init__(self, policy: nn.Module):
        embedding = policy.get_input_embeddings().weight
        init_std = getattr(policy.config, "initializer_range", 0.02)
        head = ValueHead(embedding.shape[1], init_std=init_std, dtype=embedding.dtype)
        self.head = head.to(embedding.device)

    def values(self, batch: PolicyBatch, policy_pass: PolicyPass) -> torch.Tensor:
        if policy_pass.hidden is None:
            raise ValueError("PolicyValueHead reads the policy's hidden states; run the pass with_hidden")
        return self.head(policy_pass.hidden)

    def trained_modules(self) -> list[nn.Module]:
        return [self.head]

    def save(self, output_dir: str, main_process: bool) -> None:
        if main_process:
            save_file(self.head.state_dict(), os.path.join(output_dir, self.FILE))


class OwnLayersCritic:
    """A ``TrunkValueModel`` reading the trunk pass the policy's forward ran (``policy_pass.trunk``)."""

    reads_policy_hidden = False
    FILE = "critic.safetensors"

    def __init__(self, policy: nn.Module, num_frozen_layers: int):
        self.model = TrunkValueModel(policy, num_frozen_layers)

    def values(self, batch: PolicyBatch, policy_pass: PolicyPass) -> torch.Tensor:
        shared = policy_pass.trunk
        if shared is None:
            raise ValueError("OwnLayersCritic reads the policy's trunk pass: set num_frozen_layers")
        return shared.inputs.completion_positions(self.model(shared.trunk))

    def trained_modules(self) -> list[nn.Module]:
        return [self.model]

    def save(self, output_dir: str, main_process: bool) -> None:
        if main_process:
            save_file(
                {k: v.contiguous() for k, v in self.model.state_dict().items()},
                os.path.join(output_dir, self.FILE),
            )


class SeparateValueModel:
    """A critic of its own: the backbone of a sequence-classification model and its ``score`` head
    applied at every position (legacy TRL's ``value_model``, e.g. initialised from the reward model)."""

    reads_policy_hidden = False
    DIRECTORY = "value_model"

    def __init__(self, model: nn.Module):
        backbone_and_score(model, "value_model")  # checked now, not at the first rollout
        self.model = model

    def values(self, batch: PolicyBatch, policy_pass: PolicyPass) -> torch.Tensor:
        return per_position_scores(self.model, batch)

    def trained_modules(self) -> list[nn.Module]:
        return [self.model]

    def save(self, output_dir: str, main_process: bool) -> None:
        weights = full_state_dict(self.model) if is_sharded(self.model) else None  # all processes
        if main_process:
            self.model.save_pretrained(os.path.join(output_dir, self.DIRECTORY), state_dict=weights)


def build_critic(
    policy: nn.Module, value_model: nn.Module | None, kind: str, num_frozen_layers: int | None
) -> Critic:
    """The critic PPOConfig asks for: ``value_model`` when given, else ``kind`` ("policy_head" or
    "own_layers", which needs ``num_frozen_layers``)."""
    if value_model is not None:
        return SeparateValueModel(value_model)
    if kind == "own_layers":
        return OwnLayersCritic(policy, num_frozen_layers)
    return PolicyValueHead(policy)


def add_critic_to_optimizer(optimizer: torch.optim.Optimizer | None, critic: Critic) -> None:
    """A user-built optimizer (``optimizers=``) cannot know the critic the trainer builds: its
    trainable parameters join as one more param group with the optimizer's defaults (said once),
    or the value loss would train nothing."""
    if optimizer is None:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [
        p
        for module in critic.trained_modules()
        for p in module.parameters()
        if p.requires_grad and id(p) not in stepped
    ]
    if missing:
        warnings.warn(
            f"optimizers: added the critic's {len(missing)} trainable tensors as a new param group",
            UserWarning,
            stacklevel=3,
        )
        optimizer.add_param_group({"params": missing})
