"""Loss settings (one frozen dataclass instead of a long argument list) and the loss-type normaliser.

``loss_token_weights`` is the single place where grpo / bnpo / dr_grpo / dapo differ: every loss
is ``sum(weight[b, t] * per_token_loss[b, t])``, so the reference, the Triton launcher and the
chunked linear path all reduce the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
KLEstimator = Literal["k1", "k2", "k3"]
ImportanceLevel = Literal["token", "sequence"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")

# The log-ratio fed to the KL estimators is clamped to this magnitude: k3's exp() otherwise
# overflows and its gradient turns NaN for far-off tokens (OpenRLHF PR #1335).
KL_LOG_RATIO_CLAMP = 20.0


@dataclasses.dataclass(frozen=True)
class PolicyLossSettings:
    """How the clipped-ratio policy loss is formed and reduced (TRL GRPOTrainer's definitions)."""

    clip_low: float = 0.2  # epsilon below 1: ratio is clipped at 1 - clip_low
    clip_high: float | None = None  # epsilon above 1; None means clip_low (symmetric)
    delta: float | None = None  # two-sided clipping: the unclipped ratio is capped at delta
    beta: float = 0.0  # weight of the KL-to-reference term; 0 needs no reference log-probs
    kl_estimator: KLEstimator = "k3"  # k1: log r, k2: (log r)^2 / 2, k3: exp(-log r) + log r - 1
    loss_type: LossType = "grpo"  # how per-token losses are reduced (see loss_token_weights)
    importance_sampling_level: ImportanceLevel = "token"  # "sequence" is GSPO: one ratio per sequence
    max_completion_length: int | None = None  # dr_grpo's constant denominator (default: T of the batch)
    num_items_in_batch: float | None = None  # dapo's denominator (default: the batch's unmasked tokens)
    temperature: float = 1.0  # sampling temperature; log-probs are of softmax(logits / temperature)

    def __post_init__(self) -> None:
        for name in ("clip_low", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.clip_high is not None and not (math.isfinite(self.clip_high) and self.clip_high > 0):
            raise ValueError(f"clip_high must be a finite number > 0 or None, got {self.clip_high!r}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1 so that 1 - clip_low > 0, got {self.clip_low!r}")
        if self.delta is not None and not (math.isfinite(self.delta) and self.delta > 1):
            raise ValueError(
                f"delta must be a finite number > 1 (typically > 1 + clip_high), got {self.delta!r}"
            )
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        if self.max_completion_length is not None and self.max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {self.max_completion_length!r}")
        if self.num_items_in_batch is not None and not self.num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {self.num_items_in_batch!r}")

    @property
    def upper_clip(self) -> float:
        return self.clip_low if self.clip_high is None else self.clip_high


def loss_token_weights(mask: torch.Tensor, settings: PolicyLossSettings) -> torch.Tensor:
    """Per-token weights w with ``loss = sum(w * per_token_loss)`` for each loss_type.

    grpo: mean over each sequence's tokens, then over sequences; bnpo: mean over all tokens;
    dr_grpo: sum / (B * max_completion_length); dapo: sum / num_items_in_batch (the trainer passes
    the token count of the whole accumulated batch, so accumulation does not change the update).
    """
    mask = mask.to(torch.float32) if not mask.is_floating_point() else mask
    batch, length = mask.shape
    if settings.loss_type == "grpo":
        return mask / (batch * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if settings.loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if settings.loss_type == "dr_grpo":
        return mask / (batch * (settings.max_completion_length or length))
    # dapo
    if settings.num_items_in_batch is None:
        return mask / mask.sum().clamp(min=1.0)
    return mask / settings.num_items_in_batch


def resolve_settings(settings: PolicyLossSettings | None, overrides: dict[str, object]) -> PolicyLossSettings:
    """The settings a loss call runs with: ``settings`` (default ``PolicyLossSettings()``) with the
    call's keyword ``overrides`` (any of its field names) applied. The keywords are a convenience
    for one-off calls; trainers build one settings object and pass it."""
    names = {field.name for field in dataclasses.fields(PolicyLossSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown loss setting(s) {unknown}; PolicyLossSettings has {sorted(names)}")
    return dataclasses.replace(settings or PolicyLossSettings(), **overrides)
