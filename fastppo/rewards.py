"""Rewards with TRL's calling convention: plain functions, reward models, or a mix, with weights.

A reward function is called as ``func(prompts=..., completions=..., completion_ids=..., **columns)``
(every other dataset column arrives as a keyword list, one entry per completion, plus
``trainer_state``, ``log_metric`` and ``log_extra``) and returns one float or ``None`` per completion.
``None`` means "not applicable" and becomes NaN; the weighted sum over functions ignores NaN
(``nansum``) and a completion no function scored stays NaN, so it gets advantage 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

RewardFunc = Callable[..., Sequence[float | None]]


def callable_name(func: Any) -> str:
    """Display name of a reward function (TRL's rule): partials unwrap, instances use their class name."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


@dataclasses.dataclass
class RewardModelScorer:
    """A sequence-classification model as a reward function: the first logit of prompt + completion."""

    model: nn.Module
    tokenizer: Any
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def __name__(self) -> str:  # TRL names a reward model after its checkpoint
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__).split("/")[
            -1
        ]

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        if prompts and isinstance(prompts[0], list):  # chat messages
            texts = [
                self.tokenizer.apply_chat_template(p + c, tokenize=False, **self.chat_template_kwargs)
                for p, c in zip(prompts, completions, strict=True)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
        ).to(device)
        return self.model(**inputs).logits[:, 0].float().tolist()


@dataclasses.dataclass
class RewardSet:
    """The reward functions of a run, their metric names and weights."""

    funcs: list[RewardFunc]
    names: list[str]
    weights: torch.Tensor  # [F] fp32

    def __len__(self) -> int:
        return len(self.funcs)


def load_rewards(
    reward_funcs: Any,
    *,
    weights: Sequence[float] | None,
    reward_processing_classes: Any = None,
    model_init_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> RewardSet:
    """Resolve TRL's ``reward_funcs`` argument: a callable, a reward-model path or module, or a list.

    Reward models (``AutoModelForSequenceClassification``, ``num_labels=1``) are put on ``device``
    in eval mode; their tokenizer comes from ``reward_processing_classes`` or the checkpoint.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    funcs_in = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs_in or any(f is None for f in funcs_in):
        raise ValueError("reward_funcs must name at least one reward function or reward model, got none")
    tokenizers = reward_processing_classes
    if not isinstance(tokenizers, (list, tuple)):
        tokenizers = [tokenizers] * len(funcs_in)
    if len(tokenizers) != len(funcs_in):
        raise ValueError(
            f"got {len(tokenizers)} reward_processing_classes for {len(funcs_in)} reward functions"
        )
    funcs: list[RewardFunc] = []
    for func, tokenizer in zip(funcs_in, tokenizers, strict=True):
        if isinstance(func, str):
            kwargs = {"trust_remote_code": trust_remote_code, **(model_init_kwargs or {})}
            func = AutoModelForSequenceClassification.from_pretrained(func, num_labels=1, **kwargs)
        if isinstance(func, nn.Module):
            if tokenizer is None:
                name = func.config._name_or_path
                tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            func.config.pad_token_id = tokenizer.pad_token_id
            func = RewardModelScorer(func.to(device).eval(), tokenizer, dict(chat_template_kwargs or {}))
        elif not callable(func):
            raise ValueError(
                f"reward function {func!r} is neither callable, a reward model, nor a model path"
            )
        funcs.append(func)
    if weights is None:
        weights = [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(
            f"reward_weights has {len(weights)} entries but there are {len(funcs)} reward functions"
        )
    names = [callable_name(f) for f in funcs]
    return RewardSet(funcs, names, torch.tensor(list(weights), dtype=torch.float32))


def check_reward_output(name: str, output: Any, expected: int) -> list[float]:
    """One reward per completion, each a finite number or None (-> NaN); else a ValueError naming
    the function and the sample index. (The reliability issue adds skipping of bad samples here.)"""
    if inspect.isawaitable(output):
        output = asyncio.run(_await(output))
    try:
        values = list(output)
    except TypeError:
        raise ValueError(
            f"reward function {name!r} returned {type(output).__name__}, expected a list"
        ) from None
    if len(values) != expected:
        raise ValueError(
            f"reward function {name!r} returned {len(values)} rewards for {expected} completions "
            "(one per prompt-completion pair expected)"
        )
    checked = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(math.nan)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"reward function {name!r} returned {value!r} for sample {i}; expected a number or None"
            ) from None
        if not math.isfinite(number):
            raise ValueError(
                f"reward function {name!r} returned {number} for sample {i}; rewards must be finite "
                "(return None for 'not applicable')"
            )
        checked.append(number)
    return checked


async def _await(awaitable: Any) -> Any:
    return await awaitable


def score_completions(
    rewards: RewardSet,
    prompts: list,  # [N] text or chat messages, repeated per completion
    completions: list,  # [N] text, or [{"role": "assistant", "content": ...}] for chat prompts
    completion_ids: list[list[int]],  # [N] unpadded token ids
    columns: dict[str, list],  # other dataset columns, [N] each
    extra: dict[str, Any],  # trainer_state, log_metric, log_extra
) -> torch.Tensor:
    """``[N, F]`` fp32 rewards per completion and function, NaN where a function returned None."""
    out = torch.empty(len(prompts), len(rewards), dtype=torch.float32)
    for j, (func, name) in enumerate(zip(rewards.funcs, rewards.names, strict=True)):
        output = func(
            prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extra
        )
        out[:, j] = torch.tensor(check_reward_output(name, output, len(prompts)), dtype=torch.float32)
    return out


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over functions ``[N, F] -> [N]`` ignoring NaN; NaN where no function scored."""
    total = (per_func * weights.to(per_func.device)[None, :]).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))
