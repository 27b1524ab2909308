"""Rewards with TRL's calling convention: plain functions, reward models, or a mix, with weights.

A reward function is called as ``func(prompts=..., completions=..., completion_ids=..., **columns)``
(every other dataset column arrives as a keyword list, one entry per completion, plus
``trainer_state``, ``log_metric`` and ``log_extra``) and returns one float or ``None`` per completion.
``None`` means "not applicable" and becomes NaN; the weighted sum over functions ignores NaN
(``nansum``) and a completion no function scored stays NaN, so it gets advantage 0 (TRL 1.16's
"unscorable" rows), and TRL's warning naming that sample's inputs is logged.

Bad reward output is an error naming the function and the sample (``RewardFunctionError``): a
function that raises, returns the wrong number of rewards, or a NaN/inf/non-number. With
``skip_invalid=True`` (the configs' ``skip_invalid_rewards``) a sample whose reward is NaN/inf/not a
number, or on which the function raises, is *invalid* instead: all its rewards become NaN (advantage
0, left out of its group's statistics), ``RewardScores.valid`` marks it for the trainer to drop from
the loss, and ``rewards/invalid_samples`` (per rollout) is logged. A wrong-length output is always an
error: it cannot be pinned to samples.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .sharding import reshard

RewardFunc = Callable[..., Sequence[float | None]]
INVALID_METRIC = "rewards/invalid_samples"
# The trainer's own reward kwargs, left out of the all-None warning's sample (TRL's rule).
TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric")

logger = logging.getLogger(__name__)


class RewardFunctionError(ValueError):
    """A reward function raised or returned something unusable; the message names it and the sample."""


@dataclasses.dataclass
class RewardScores:
    """Rewards of N completions by F functions."""

    per_func: torch.Tensor  # [N, F] fp32; NaN where a function returned None, whole row NaN if invalid
    valid: torch.Tensor  # [N] bool; False: an invalid sample (skip_invalid) to drop from the loss

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())


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
        try:
            return self.model(**inputs).logits[:, 0].float().tolist()
        finally:
            reshard(self.model)  # sharded: free the root unit FSDP keeps gathered for a backward


@dataclasses.dataclass
class RewardSet:
    """The reward functions of a run, their metric names and weights."""

    funcs: list[RewardFunc]
    names: list[str]
    weights: torch.Tensor  # [F] fp32
    # [F] TRL's ``reward_processing_classes``: each reward model's tokenizer, as given for functions
    processing_classes: list[Any] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.funcs)

    def models(self) -> list[nn.Module]:
        """The reward models among the functions (what fsdp shards)."""
        return [f.model for f in self.funcs if isinstance(f, RewardModelScorer)]


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
    if tokenizers is None:
        tokenizers = [None] * len(funcs_in)
    elif not isinstance(tokenizers, (list, tuple)):  # one tokenizer is a list of one, as in TRL
        tokenizers = [tokenizers]
    if len(tokenizers) != len(funcs_in):
        raise ValueError(
            f"The number of reward processing classes ({len(tokenizers)}) must match the number of reward "
            f"functions ({len(funcs_in)}): pass a list with one entry per reward function (None for plain "
            "functions and for reward models that use their checkpoint's tokenizer)"
        )
    tokenizers = list(tokenizers)
    funcs: list[RewardFunc] = []
    for i, (func, tokenizer) in enumerate(zip(funcs_in, tokenizers, strict=True)):
        if isinstance(func, str):
            kwargs = {"trust_remote_code": trust_remote_code, **(model_init_kwargs or {})}
            func = AutoModelForSequenceClassification.from_pretrained(func, num_labels=1, **kwargs)
        if isinstance(func, nn.Module):
            if tokenizer is None:
                name = func.config._name_or_path
                if not name:
                    raise ValueError(
                        f"reward model {i} ({type(func).__name__}) was not loaded from a path, so its "
                        "tokenizer cannot be found: give it in reward_processing_classes"
                    )
                tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            check_vocab(func, tokenizer, f"reward model {callable_name(func)!r}")
            func.config.pad_token_id = tokenizer.pad_token_id
            tokenizers[i] = tokenizer
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
    return RewardSet(funcs, names, torch.tensor(list(weights), dtype=torch.float32), tokenizers)


def check_vocab(model: nn.Module, tokenizer: Any, what: str) -> None:
    """ValueError when the tokenizer has ids the model's embedding table lacks (an index error, or a
    device-side assert on GPU, mid-run otherwise). A larger table is normal (padded vocabularies)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{what}: its tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
            f"{rows} rows; use the tokenizer the model was trained with"
        )


def check_reward_output(
    name: str, output: Any, expected: int, skip_invalid: bool = False
) -> list[float | None]:
    """One reward per completion: a finite number, or None -> NaN ("not applicable").

    A NaN/inf/non-number at sample i is a ``RewardFunctionError`` naming ``name`` and i, or with
    ``skip_invalid`` None in the returned list (an invalid sample). A wrong length always raises.
    """
    if inspect.isawaitable(output):
        output = asyncio.run(_await(output))
    try:
        values = list(output)
    except TypeError:
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(output).__name__}, expected a list"
        ) from None
    if len(values) != expected:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} rewards for {expected} completions "
            "(one per prompt-completion pair expected)"
        )
    checked: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(math.nan)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and math.isfinite(number):
            checked.append(number)
        elif skip_invalid:
            checked.append(None)
        elif number is None:
            raise RewardFunctionError(
                f"reward function {name!r} returned {value!r} for sample {i}; expected a number or None"
            )
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned {number} for sample {i}; rewards must be finite "
                "(return None for 'not applicable', or set skip_invalid_rewards=True to drop such samples)"
            )
    return checked


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _call_reward(
    func: RewardFunc, name: str, kwargs: dict[str, Any], n: int, skip_invalid: bool
) -> list[float | None]:
    """``func`` on all n samples; when it raises, find the sample it raises on by calling it on one
    sample at a time (the error path only), so the message can name it. With ``skip_invalid`` the
    samples it raises on are invalid (None) and the others keep their one-sample rewards."""
    try:
        return check_reward_output(name, func(**kwargs), n, skip_invalid)
    except RewardFunctionError:
        raise
    except Exception as batch_exc:
        per_sample: list[float | None] = []
        for i in range(n):
            one = {k: v[i : i + 1] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}
            try:
                output = func(**one)
            except Exception as exc:
                if skip_invalid:
                    per_sample.append(None)
                    continue
                raise RewardFunctionError(
                    f"reward function {name!r} raised {type(exc).__name__} on sample {i}: {exc}"
                ) from exc
            per_sample.extend(check_reward_output(name, output, 1, skip_invalid))
        if not skip_invalid:  # every sample alone was fine: it fails on the batch only
            raise RewardFunctionError(
                f"reward function {name!r} raised {type(batch_exc).__name__} on the batch of {n} "
                f"completions (each sample alone succeeds): {batch_exc}"
            ) from batch_exc
        return per_sample


def score_rewards(
    rewards: RewardSet,
    prompts: list,  # [N] text or chat messages, repeated per completion
    completions: list,  # [N] text, or [{"role": "assistant", "content": ...}] for chat prompts
    completion_ids: list[list[int]],  # [N] unpadded token ids
    columns: dict[str, list],  # other dataset columns, [N] each
    extra: dict[str, Any],  # trainer_state, log_metric, log_extra
    skip_invalid: bool = False,
) -> RewardScores:
    """Every reward function on every completion; see the module docstring for invalid samples.
    With ``skip_invalid`` the count of invalid samples goes to ``extra["log_metric"]`` when given."""
    n = len(prompts)
    out = torch.empty(n, len(rewards), dtype=torch.float32)
    valid = torch.ones(n, dtype=torch.bool)
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extra)
    for j, (func, name) in enumerate(zip(rewards.funcs, rewards.names, strict=True)):
        values = _call_reward(func, name, kwargs, n, skip_invalid)
        valid &= torch.tensor([v is not None for v in values], dtype=torch.bool)
        out[:, j] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
    out[~valid] = math.nan
    warn_unscored(out, valid, prompts, completions, columns)
    if skip_invalid and "log_metric" in extra:
        extra["log_metric"](INVALID_METRIC, float((~valid).sum()))
    return RewardScores(out, valid)


def warn_unscored(
    per_func: torch.Tensor, valid: torch.Tensor, prompts: list, completions: list, columns: dict[str, list]
) -> None:
    """TRL's warning when every function returned None for a sample (invalid samples aside: they
    are counted in ``rewards/invalid_samples``), naming the first such sample's inputs."""
    unscored = (torch.isnan(per_func).all(dim=1) & valid).nonzero(as_tuple=True)[0]
    if not unscored.numel():
        return
    i = int(unscored[0])
    row = {key: value[i] for key, value in columns.items() if key not in TRAINER_KWARGS}
    row["prompt"], row["completion"] = prompts[i], completions[i]
    logger.warning(
        f"All reward functions returned None for the following kwargs:\n{row}\n"
        "Please ensure that at least one reward function returns a valid reward."
    )


def score_completions(
    rewards: RewardSet,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    extra: dict[str, Any],
) -> torch.Tensor:
    """``[N, F]`` fp32 rewards, raising on any invalid one (``score_rewards`` with skip_invalid=False)."""
    return score_rewards(rewards, prompts, completions, completion_ids, columns, extra).per_func


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over functions ``[N, F] -> [N]`` ignoring NaN; NaN where no function scored."""
    total = (per_func * weights.to(per_func.device)[None, :]).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))
