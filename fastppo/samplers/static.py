"""``model.generate`` with a static KV cache of few fixed sizes, so the compiled decode step is built
once and replayed (``cache_implementation="static"``, TRL's name).

With a static cache transformers compiles the decode step itself on CUDA (``torch.compile``,
``reduce-overhead``: CUDA graphs replay each token's kernels in one launch). A graph holds for one
shape of the cache, ``[batch, cache length]``, and the cache length is prompt width + new tokens;
prompt widths change with every batch of prompts, which would compile again at every new width.
Here a batch's prompts are left-padded to a bucket width (the next power of two, from 16, at most
``max_prompt_length``) and the cache is pinned to bucket + ``max_new_tokens`` (or the longest any
earlier call used: transformers keeps that), so a run compiles once per (batch size, bucket), and a
shorter bucket after a longer one reuses the longer one's graph. Left padding changes nothing but
the padding (positions count attended tokens only). On CPU transformers does not compile (the
cache is static, the decode eager); tests force a compile with a counting backend to check it
happens once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..rollout import GenerateSampler, SamplingSettings

MIN_BUCKET = 16  # the smallest prompt width a batch is padded to


def bucket_width(width: int, max_prompt_length: int | None = None) -> int:
    """The width prompts of width ``width`` are padded to: the next power of two (at least
    ``MIN_BUCKET``), capped at ``max_prompt_length`` when the prompts fit in it."""
    bucket = max(MIN_BUCKET, 1 << max(width - 1, 0).bit_length())
    if max_prompt_length is not None and width <= max_prompt_length:
        bucket = min(bucket, max_prompt_length)
    return bucket


def pad_left(
    ids: torch.Tensor, mask: torch.Tensor, width: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` / ``mask`` ``[P, Lp]`` left-padded to ``[P, width]``."""
    extra = width - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return (
        torch.nn.functional.pad(ids, (extra, 0), value=pad_id),
        torch.nn.functional.pad(mask, (extra, 0), value=0),
    )


class StaticCacheSampler(GenerateSampler):
    """``GenerateSampler`` with prompts padded to a bucket and a static cache of bucket +
    ``max_new_tokens`` tokens (see the module docstring). ``compile_config``: transformers'
    ``CompileConfig`` of the decode step; None: on an accelerator its default (inductor, CUDA
    graphs) with static shapes (``dynamic=False``: the buckets keep the shapes few, and a
    shape-generic graph would be slower), on CPU none (transformers compiles only on
    accelerators)."""

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        max_prompt_length: int | None = None,
        compile_config: Any = None,
    ):
        super().__init__(model, pad_token_id, eos_token_ids)
        self.max_prompt_length = max_prompt_length
        self.compile_config = compile_config  # None: chosen at the first call, on the model's device

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, n, settings: SamplingSettings):
        width = bucket_width(prompt_ids.shape[1], self.max_prompt_length)
        ids, mask = pad_left(prompt_ids, prompt_mask, width, self.pad_token_id)
        fields = {"cache_implementation": "static", "max_cache_len": width + settings.max_new_tokens}
        if self.compile_config is None and self.model.device.type != "cpu":
            from transformers import CompileConfig

            self.compile_config = CompileConfig(dynamic=False)  # one object: transformers keeps its graph
        if self.compile_config is not None:
            fields["compile_config"] = self.compile_config
        config = self.generation_config(n, settings, **fields)
        return self.run(ids, mask, config)
