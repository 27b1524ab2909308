"""Sequence-classification models read on the sampled token ids themselves (legacy TRL's PPO): the
backbone over prompt + completion, then the one-output ``score`` head, at the completion's last
token (a reward model's score) or at every completion position (a separate value model, the critic).

No decoding and re-tokenising, which would drop special tokens such as EOS. GRPO's text-based
reward models (TRL's convention: prompt + completion re-tokenised) live in ``fastppo.rewards``.
"""

from __future__ import annotations

import torch
from torch import nn

from .batch import PolicyBatch, sequence_inputs
from .policy_forward import eval_mode
from .sharding import final_hidden_states, is_sharded, reshard


def fp32_linear(linear: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``linear(hidden)`` in fp32 whatever autocast says: scores and values feed GAE, value clipping
    and the value loss, and bf16 rounding of a value of ~20 is already ~0.1."""
    bias = None if linear.bias is None else linear.bias.float()
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), linear.weight.float(), bias)


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
    completion's last token from the token ids themselves (legacy TRL's ``get_reward``)."""
    hidden, score = sequence_hidden_states(reward_model, batch, "reward_model")  # [b, Lp + Lc, H]
    last = batch.prompt_ids.shape[1] + batch.completion_mask.sum(1) - 1  # [b] position of the last token
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return fp32_linear(score, picked).squeeze(-1)


def score_with_reward_model(reward_model: nn.Module, batch: PolicyBatch) -> torch.Tensor:
    """``completion_scores`` in eval mode; a sharded model's root unit is freed after (no backward
    follows a scoring pass to free it)."""
    with eval_mode(reward_model):
        try:
            return completion_scores(reward_model, batch)
        finally:
            reshard(reward_model)
