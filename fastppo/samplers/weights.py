"""The weights a sampler decodes with: the policy itself, or a copy of it in another dtype.

A copy pays for itself where the sampler cannot borrow the trainer's mixed precision: transformers'
continuous batching decodes in a thread of its own, and autocast is thread-local, so fp32 master
weights would decode in fp32 (twice the bytes per step, and no flash attention). A copy is a
second set of weights, so it must follow every optimizer step; ``sync`` copies the policy's
current values into it (``Sampler.sync_weights``, which the trainers call before sampling once the
weights have changed).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..sharding import is_sharded


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's floating-point weights (its first floating parameter's)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameters to sample with")


class SamplingWeights:
    """``model``: what the sampler runs, the policy itself when ``dtype`` is None or already its
    dtype (nothing to keep in step), else a frozen copy cast to ``dtype`` that ``sync`` refreshes."""

    def __init__(self, policy: nn.Module, dtype: torch.dtype | None = None):
        self.policy = policy
        self.shared = dtype is None or dtype == model_dtype(policy)
        if self.shared:
            self.model = policy
            return
        if is_sharded(policy):
            raise ValueError(
                "a sampler with weights of its own cannot copy a sharded (FSDP) policy; sample with the "
                "policy's own dtype, or train unsharded"
            )
        self.model = copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)
        for param in self.model.parameters():
            param.grad = None  # the copy never trains: no gradients kept from the policy

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's current parameters and buffers into the copy (cast to its dtype)."""
        if self.shared:
            return
        for source, target in (
            (self.policy.named_parameters(), self.model.named_parameters()),
            (self.policy.named_buffers(), self.model.named_buffers()),
        ):
            for (name, src), (copy_name, dst) in zip(source, target, strict=True):
                if name != copy_name:  # the copy was made from this policy: a mismatch is a bug
                    raise RuntimeError(f"sampler weights out of step: {name} vs {copy_name}")
                dst.copy_(src)
