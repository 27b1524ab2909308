"""Loss settings (one frozen dataclass instead of a long argument list) and the loss-type normaliser.

``loss_token_weights`` is the single place where the loss types' reductions differ: every loss
is ``sum(weight[b, t] * per_token_loss[b, t])``, so the reference, the Triton launcher and the
chunked linear path all reduce the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
KLEstimator = Literal["k1", "k2", "k3"]
ImportanceLevel = Literal["token", "sequence"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# TRL's PPO-clip family: -min(r A, clip(r) A), with delta's cap on r. The others shape r otherwise:
# cispo (clipped, detached r times A log p), sapo (a sigmoid gate), vespo (a sequence gamma weight).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# The types whose summed token losses are divided by ``num_items_in_batch`` (the trainer passes the
# token count it normalises over: the accumulation window in training, the batch in evaluation).
ITEM_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")

# The log-ratio fed to the KL estimators is clamped to this magnitude: k3's exp() otherwise
# overflows and its gradient turns NaN for far-off tokens (OpenRLHF PR #1335).
KL_LOG_RATIO_CLAMP = 20.0


@dataclasses.dataclass(frozen=True)
class PolicyLossSettings:
    """How the policy loss is formed and reduced (TRL 1.16 GRPOTrainer's definitions; TRL's config
    name in brackets where it differs)."""

    clip_low: float = 0.2  # epsilon below 1: ratio is clipped at 1 - clip_low [epsilon]
    # epsilon above 1; None means clip_low (symmetric) [epsilon_high]. cispo: the ratio's cap itself.
    clip_high: float | None = None
    delta: float | None = None  # two-sided clipping: the unclipped ratio is capped at delta
    beta: float = 0.0  # weight of the KL-to-reference term; 0 needs no reference log-probs
    kl_estimator: KLEstimator = "k3"  # k1: log r, k2: (log r)^2 / 2, k3: exp(-log r) + log r - 1
    # The KL term times the importance ratio (its gradient then the unbiased reverse-KL one;
    # DeepSeek-V3.2) [use_bias_correction_kl, whose TRL default is True]
    kl_bias_correction: bool = False
    loss_type: LossType = "grpo"  # the per-token loss and its reduction (see loss_token_weights)
    importance_sampling_level: ImportanceLevel = "token"  # "sequence" is GSPO: one ratio per sequence
    max_completion_length: int | None = None  # dr_grpo's constant denominator (default: T of the batch)
    # dapo / cispo / vespo's denominator (default: the batch's unmasked tokens)
    num_items_in_batch: float | None = None
    temperature: float = 1.0  # sampling temperature; log-probs are of softmax(logits / temperature)
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature for tokens with advantage > 0
    sapo_temperature_neg: float = 1.05  # ... and for the others
    vespo_k_pos: float = 2.0  # vespo's gamma weight phi(w) = e^lam w^k e^(-lam w), advantage >= 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # ... advantage < 0
    vespo_lambda_neg: float = 2.0
    # Entropy bonus: loss -= entropy_coef * mean entropy of the tokens the policy term acts on
    entropy_coef: float = 0.0
    # Train on the top fraction of tokens by entropy only (Beyond the 80/20 Rule); 1 keeps all
    top_entropy_quantile: float = 1.0
    # Drop sequences with advantage < 0 whose mean KL(old || current) exceeds this (DeepSeek-V3.2)
    off_policy_mask_threshold: float | None = None

    def __post_init__(self) -> None:
        for name in ("clip_low", "temperature", "sapo_temperature_pos", "sapo_temperature_neg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("entropy_coef", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
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
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile!r}")
        threshold = self.off_policy_mask_threshold
        if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(
                f"off_policy_mask_threshold must be a finite number >= 0 or None, got {threshold!r}"
            )

    @property
    def upper_clip(self) -> float:
        return self.clip_low if self.clip_high is None else self.clip_high

    @property
    def needs_entropy(self) -> bool:
        """The loss itself reads the per-token entropy (its bonus, or the high-entropy mask)."""
        return self.entropy_coef != 0.0 or self.top_entropy_quantile < 1.0

    @property
    def token_local(self) -> bool:
        """dLoss/dlogp of a token depends on that token alone, so a kernel can form it in the same
        launch that reads the token's logits. Sequence-level ratios, vespo's sequence weight, and
        the two masks (a batch entropy quantile; a sequence's mean KL) couple tokens: those take
        a log-prob pass, autograd of the ``[B, T]`` objective, then a gradient pass."""
        return (
            self.importance_sampling_level == "token"
            and self.loss_type != "vespo"
            and self.top_entropy_quantile == 1.0
            and self.off_policy_mask_threshold is None
        )


def loss_token_weights(mask: torch.Tensor, settings: PolicyLossSettings) -> torch.Tensor:
    """Per-token weights w with ``loss = sum(w * per_token_loss)`` for each loss_type.

    grpo, sapo: mean over each sequence's tokens, then over sequences; bnpo: mean over all tokens;
    dr_grpo: sum / (B * max_completion_length); dapo, cispo, vespo: sum / num_items_in_batch (the
    trainer passes the token count of the whole accumulated batch, so accumulation does not change
    the update); luspo: each sequence's sum, then the mean over sequences (length-unbiased GSPO).
    """
    mask = mask.to(torch.float32) if not mask.is_floating_point() else mask
    batch, length = mask.shape
    if settings.loss_type in ("grpo", "sapo"):
        return mask / (batch * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if settings.loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if settings.loss_type == "dr_grpo":
        return mask / (batch * (settings.max_completion_length or length))
    if settings.loss_type == "luspo":
        return mask / batch
    # dapo, cispo, vespo
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
