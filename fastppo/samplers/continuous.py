"""Transformers' continuous batching as a ``Sampler``: finished completions leave the batch and
waiting ones join, over a paged KV cache (``generate_batch``; ``paged|sdpa`` attention runs on CPU
too, a flash kernel is taken on GPU when installed).

TRL 1.16's names, honoured as TRL does: ``use_transformers_continuous_batching`` switches it on,
``transformers_continuous_batching_config`` holds ``ContinuousBatchingConfig`` keywords, with
``max_memory_percent`` 0.5 unless given (the engine's own 0.9 would leave no memory for training's
backward), each prompt is sent ``num_generations`` times (prefix sharing keeps one copy of its
cache), and ``generate_batch`` builds and frees its engine on every call. Differences, each so that
nothing is sampled other than configured or recorded silently:

- ``return_logprobs`` defaults to True: the log-probs the engine drew each token with come back
  (``Completions``); they are of the training distribution when only temperature processes the
  logits (``untruncated``), and only then can stand for the old policy's.
- Logits processors the engine would not apply as ``generate`` does (it drops the repetition
  penalty, builds no ``min_new_tokens``, hands others only the last token) are refused with a
  ValueError: temperature, top-k, top-p and min-p are what it applies faithfully.
- The policy keeps its weights (TRL casts it to bf16 for the call): a sampling dtype other than the
  policy's runs on a copy that ``sync_weights`` keeps in step (``samplers.weights``).
- On CPU, where the engine would size its cache from half of the free RAM (an attention mask of
  ``max_batch_tokens x cache tokens`` filled on every call), the cache is sized to the rollout
  unless the config sets ``page_size`` (``block_size`` before transformers 5.18), ``num_blocks``
  or ``max_batch_tokens``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import check_known_keys
from ..rollout import Completions, SamplingSettings, generation_kwargs
from .weights import SamplingWeights

MIN_TRANSFORMERS = "5.8.0"  # TRL 1.16's floor for use_transformers_continuous_batching
# How the cache is sized; tokens per page are ``page_size`` from transformers 5.18 on (``block_size``
# before, as in the GPU image's 5.17).
SIZE_KEYS = ("page_size", "block_size", "num_blocks", "max_batch_tokens")
CPU_CONCURRENT_REQUESTS = 64  # completions decoded at once on CPU (the rest wait for their cache)
# Processors the engine applies exactly as generate does without marking them supported: they read
# only the scores (the engine hands processors the last token, not the sequence).
SCORE_ONLY = ("MinPLogitsWarper",)


def check_available() -> None:
    """ImportError (TRL's) unless transformers has continuous batching as TRL 1.16 uses it."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"use_transformers_continuous_batching needs transformers>={MIN_TRANSFORMERS}, found "
            f"{transformers.__version__}: upgrade it (pip install --upgrade transformers)"
        )


def engine_kwargs(config: dict[str, Any] | None) -> dict[str, Any]:
    """``ContinuousBatchingConfig`` keywords from ``transformers_continuous_batching_config``: TRL's
    ``max_memory_percent`` default (0.5) and fastppo's ``return_logprobs`` default (True) under the
    user's own; unknown keywords and bad values are refused now, not at the first rollout."""
    check_available()
    from transformers.generation import ContinuousBatchingConfig

    kwargs = dict(config or {})
    known = [f.name for f in dataclasses.fields(ContinuousBatchingConfig)]
    check_known_keys("transformers_continuous_batching_config", kwargs, known)
    kwargs = {"max_memory_percent": 0.5, "return_logprobs": True, **kwargs}
    try:
        ContinuousBatchingConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"transformers_continuous_batching_config={config!r}: {error}") from error
    return kwargs


def page_size_key() -> str:
    """The installed transformers' name for the tokens one cache page holds."""
    from transformers.generation import ContinuousBatchingConfig

    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    return "page_size" if "page_size" in names else "block_size"


def cpu_cache_sizes(requests: int, longest_prompt: int, max_new_tokens: int) -> dict[str, int]:
    """A paged cache for one rollout on CPU: a page holds a whole completion (a power of two between
    the engine's bounds 4 and 256 tokens), room for ``CPU_CONCURRENT_REQUESTS`` completions at
    once, and batches of one prefill per admitted completion."""
    length = longest_prompt + max_new_tokens
    page = max(4, min(256, 1 << (length - 1).bit_length()))
    concurrent = min(requests, CPU_CONCURRENT_REQUESTS)
    return {
        page_size_key(): page,
        "num_blocks": concurrent * (math.ceil(length / page) + 1),
        "max_batch_tokens": min(8192, concurrent * (longest_prompt + 1)),
    }


class ContinuousBatchingSampler:
    """``generate_batch`` over the policy (or its copy in ``dtype``); see the module docstring.

    ``config``: ``transformers_continuous_batching_config`` (TRL's name). ``dtype``: the dtype to
    decode in, None for the policy's own (no copy).
    """

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        config: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.user_config = dict(config or {})
        self.kwargs = engine_kwargs(config)
        self.weights = SamplingWeights(model, dtype)
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)

    def sync_weights(self) -> None:
        """The copy (if any) takes the policy's current weights: called by the trainers before
        sampling whenever an optimizer step (or a resume) changed them."""
        self.weights.sync()

    def generation_config(self, settings: SamplingSettings) -> Any:
        from transformers import GenerationConfig

        return GenerationConfig(**generation_kwargs(settings, self.pad_token_id, self.eos_token_ids))

    def logits_processors(self, settings: SamplingSettings) -> list:
        """The processors ``generate`` would apply under ``settings``, all of which the engine applies
        as generate does; a ValueError names any other: the engine drops those it marks unsupported
        (repetition penalty), builds no length-based ones (``min_new_tokens``), and hands the rest
        only the last token instead of the sequence, so it would sample another distribution."""
        config = copy.deepcopy(self.generation_config(settings))
        # what generate prepares before listing them, so the end-token and length-based ones show too
        config._eos_token_tensor = torch.tensor(self.eos_token_ids, dtype=torch.long)
        processors = list(self.weights.model._get_logits_processor(config, input_ids_seq_length=1))
        unsafe = [
            type(p).__name__
            for p in processors
            if not (
                getattr(p, "supports_continuous_batching", None) is True or type(p).__name__ in SCORE_ONLY
            )
        ]
        if unsafe:
            raise ValueError(
                f"continuous batching would not apply {unsafe} (from repetition_penalty or generation_kwargs "
                "such as min_new_tokens) as generate does, so it would sample from another distribution than "
                "configured: remove those settings, or leave use_transformers_continuous_batching off"
            )
        return processors

    def check(self, settings: SamplingSettings) -> None:
        """Refuse now what ``generate`` would refuse at the first rollout."""
        self.logits_processors(settings)

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, settings: SamplingSettings
    ) -> Completions:
        from transformers.generation import ContinuousBatchingConfig
        from transformers.generation.logits_process import TemperatureLogitsWarper

        processors = self.logits_processors(settings)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, prompt_mask, strict=True)]
        inputs = [prompt for prompt in prompts for _ in range(n)]  # TRL's way; groups stay consecutive
        kwargs = dict(self.kwargs)
        model = self.weights.model
        if model.device.type == "cpu" and not any(key in self.user_config for key in SIZE_KEYS):
            kwargs.update(cpu_cache_sizes(len(inputs), max(map(len, prompts)), settings.max_new_tokens))
        was_training = model.training
        try:
            outputs = model.generate_batch(
                inputs,
                generation_config=self.generation_config(settings),
                continuous_batching_config=ContinuousBatchingConfig(**kwargs),
                progress_bar=False,
            )
        finally:
            model.train(was_training)  # the engine leaves the model in eval mode
        results = list(outputs.values())  # in the order of ``inputs``
        failed = [r.error for r in results if r.error is not None]
        if len(results) != len(inputs) or failed:
            raise RuntimeError(
                f"continuous batching returned {len(results) - len(failed)} of {len(inputs)} completions"
                + (f"; first error: {failed[0]}" if failed else " (see the log for the engine's error)")
            )
        ids, logprobs = pad_completions(results, self.pad_token_id, prompt_ids.device)
        sampled_untruncated = settings.do_sample and all(
            isinstance(p, TemperatureLogitsWarper) for p in processors
        )
        return Completions(ids, logprobs if kwargs["return_logprobs"] else None, sampled_untruncated)


def pad_completions(
    results: list, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [R, Lc], logprobs [R, Lc])`` from the engine's outputs, right-padded (pad id, log-prob 0)."""
    width = max(len(r.generated_tokens) for r in results)
    ids = torch.full((len(results), width), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros((len(results), width), dtype=torch.float32)
    for i, result in enumerate(results):
        ids[i, : len(result.generated_tokens)] = torch.tensor(result.generated_tokens, dtype=torch.long)
        if result.logprobs:
            logprobs[i, : len(result.logprobs)] = torch.tensor(result.logprobs, dtype=torch.float32)
    return ids.to(device), logprobs.to(device)
