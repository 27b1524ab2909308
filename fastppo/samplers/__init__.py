"""Samplers beyond ``model.generate`` (``fastppo.rollout.GenerateSampler``, the default), behind the
``fastppo.rollout.Sampler`` protocol, and the choice GRPOConfig's (TRL's) names make between them:

  ``use_transformers_continuous_batching=True``  ->  ``ContinuousBatchingSampler`` (``continuous``)
  ``cache_implementation="static"``              ->  ``StaticCacheSampler`` (``static``): compiled decode
  otherwise                                      ->  ``GenerateSampler`` (dynamic cache)

``generate`` stays the default on CUDA too until a recorded GPU measurement (``fastppo bench step``'s
rollout table) shows another to be faster at the same distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..rollout import GenerateSampler, Sampler
from .continuous import ContinuousBatchingSampler
from .static import StaticCacheSampler
from .weights import model_dtype

__all__ = ["ContinuousBatchingSampler", "GenerateSampler", "StaticCacheSampler", "build_sampler"]


def sampling_dtype(args: Any, model: nn.Module) -> torch.dtype | None:
    """The dtype a sampler that cannot run under the trainer's autocast decodes in: the mixed
    precision's when the policy keeps fp32 master weights, else None (the policy's own)."""
    half = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return half if half is not None and model_dtype(model) == torch.float32 else None


def build_sampler(
    args: Any, model: nn.Module, pad_token_id: int, eos_token_ids: Sequence[int], sharded: bool
) -> Sampler:
    """The sampler a GRPOConfig asks for (see the module docstring), its settings checked now (for
    training and evaluation) rather than at the first rollout."""
    engine = "use_transformers_continuous_batching" if args.use_transformers_continuous_batching else None
    if engine is None and args.cache_implementation == "static":
        engine = "cache_implementation='static'"
    if engine is not None and sharded:
        raise ValueError(f"{engine} with fsdp is not supported yet; leave it off to sample with generate")
    if args.use_transformers_continuous_batching:
        sampler = ContinuousBatchingSampler(
            model,
            pad_token_id,
            eos_token_ids,
            args.transformers_continuous_batching_config,
            dtype=sampling_dtype(args, model),
        )
        for do_sample in {True, args.eval_do_sample}:
            sampler.check(args.sampling_settings(do_sample=do_sample))
        return sampler
    if args.cache_implementation == "static":
        return StaticCacheSampler(model, pad_token_id, eos_token_ids, args.max_prompt_length)
    return GenerateSampler(model, pad_token_id, eos_token_ids)
