"""The critic: its loss (PPO's clipped value loss, legacy TRL PPOTrainer) and where its values come from
(a head on the policy's hidden states, or a separate value model)."""

from __future__ import annotations

import os
from typing import NamedTuple, Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from .advantages import masked_mean
from .memory.critic import TrunkValueModel, ValueHead, fp32_linear
from .scoring import PolicyBatch, TrunkPass, sequence_inputs, trunk_pass
from .sharding import final_hidden_states, full_state_dict, is_sharded


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


# --- critics: where the values come from -------------------------------------------------------------


class Critic(Protocol):
    """Per-token values of the completion positions; trained next to the policy by one optimizer.

    A critic may read what the policy's pass already computed: its final hidden states
    (``reads_policy_hidden``) or the shared frozen trunk's pass (``reads_trunk``).
    """

    reads_policy_hidden: bool
    reads_trunk: bool

    def values(
        self, batch: PolicyBatch, policy_hidden: torch.Tensor | None, shared: TrunkPass | None
    ) -> torch.Tensor:
        """``[b, Lc]`` fp32 value of the state before each completion token."""
        ...

    def trained_modules(self) -> list[nn.Module]: ...

    def save(self, output_dir: str, main_process: bool) -> None:
        """Write the critic next to the policy; called on every process (a sharded critic gathers)."""
        ...


class PolicyValueHead:
    """A linear value head on the policy's final hidden states (legacy TRL's "causal LM with value
    head"): no second model, and the values of a minibatch come from the same decoder pass as its
    log-probs; the value loss also trains the policy's body (weighted by ``vf_coef``)."""

    reads_policy_hidden, reads_trunk = True, False
    FILE = "value_head.safetensors"

    def __init__(self, policy: nn.Module):
        embedding = policy.get_input_embeddings().weight
        init_std = getattr(policy.config, "initializer_range", 0.02)
        head = ValueHead(embedding.shape[1], init_std=init_std, dtype=embedding.dtype)
        self.head = head.to(embedding.device)

    def values(self, batch, policy_hidden, shared=None) -> torch.Tensor:
        if policy_hidden is None:
            raise ValueError("PolicyValueHead reads the policy's hidden states; pass policy_hidden")
        return self.head(policy_hidden)

    def trained_modules(self) -> list[nn.Module]:
        return [self.head]

    def save(self, output_dir: str, main_process: bool) -> None:
        if main_process:
            save_file(self.head.state_dict(), os.path.join(output_dir, self.FILE))


class OwnLayersCritic:
    """``memory.TrunkValueModel``: its own trainable copy of the layers above the policy's frozen
    trunk and a value head, reading the trunk pass the policy's loss already ran (``shared``)."""

    reads_policy_hidden, reads_trunk = False, True
    FILE = "critic.safetensors"

    def __init__(self, policy: nn.Module, num_frozen_layers: int, padding_free: bool):
        self.policy, self.padding_free = policy, padding_free
        self.model = TrunkValueModel(policy, num_frozen_layers)

    def values(self, batch, policy_hidden=None, shared=None) -> torch.Tensor:
        if shared is None:
            shared = trunk_pass(self.policy, batch, self.model.num_shared_layers, self.padding_free)
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

    reads_policy_hidden, reads_trunk = False, False
    DIRECTORY = "value_model"

    def __init__(self, model: nn.Module):
        self.model, self.backbone, self.score = model, *backbone_and_score(model, "value_model")

    def values(self, batch, policy_hidden=None, shared=None) -> torch.Tensor:
        return per_position_scores(self.model, batch)

    def trained_modules(self) -> list[nn.Module]:
        return [self.model]

    def save(self, output_dir: str, main_process: bool) -> None:
        weights = full_state_dict(self.model) if is_sharded(self.model) else None  # all processes
        if main_process:
            self.model.save_pretrained(os.path.join(output_dir, self.DIRECTORY), state_dict=weights)


def backbone_and_score(model: nn.Module, name: str) -> tuple[nn.Module, nn.Linear]:
    """The backbone and one-output ``score`` head of a sequence-classification model."""
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    score = getattr(model, "score", None)
    if backbone is None or not isinstance(score, nn.Linear) or score.out_features != 1:
        raise ValueError(
            f"{name} must be a sequence-classification model with a backbone and a one-output `score` "
            f"head, like AutoModelForSequenceClassification(num_labels=1); got {type(model).__name__}"
        )
    return backbone, score


def sequence_hidden_states(model: nn.Module, batch: PolicyBatch, name: str) -> tuple[torch.Tensor, nn.Linear]:
    """(``[b, Lp + Lc, H]`` the backbone's last hidden states over prompt + completion, ``score``) of
    a sequence-classification model; a sharded one runs its own forward (``fastppo.sharding``)."""
    backbone, score = backbone_and_score(model, name)
    if is_sharded(model):
        return final_hidden_states(model, sequence_inputs(batch), use_cache=False), score
    return backbone(**sequence_inputs(batch), use_cache=False).last_hidden_state, score


def per_position_scores(model: nn.Module, batch: PolicyBatch) -> torch.Tensor:
    """``[b, Lc]`` fp32 ``score(backbone(prompt + completion))`` at the positions before each
    completion token (a critic), whose last real entry is a reward model's score of the whole
    completion read one position later (``completion_scores``)."""
    hidden, score = sequence_hidden_states(model, batch, "value_model")
    start = batch.prompt_ids.shape[1] - 1  # the state before completion token t is position start + t
    return fp32_linear(score, hidden[:, start : start + batch.completion_ids.shape[1]]).squeeze(-1)


def completion_scores(reward_model: nn.Module, batch: PolicyBatch) -> torch.Tensor:
    """``[b]`` a sequence-classification reward model's score of prompt + completion, read at the
    completion's last token from the token ids themselves (legacy TRL's ``get_reward``): no decoding
    and re-tokenising, which would drop special tokens such as EOS."""
    hidden, score = sequence_hidden_states(reward_model, batch, "reward_model")  # [b, Lp + Lc, H]
    last = batch.prompt_ids.shape[1] + batch.completion_mask.sum(1) - 1  # [b] position of the last token
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return fp32_linear(score, picked).squeeze(-1)
