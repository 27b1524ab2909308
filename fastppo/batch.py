"""The batch every forward over sampled sequences reads: rows of a rollout (prompt + completion), with
what the loss needs attached as the trainer computes it (advantages, old and reference log-probs).

The three policies stay apart in its fields: ``old_logprobs`` were recorded at sampling time (None:
on-policy, the detached current ones serve), ``ref_logprobs`` come from the frozen reference (None
when there is no KL term); the current policy's log-probs are computed by each forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .rollout import Rollout


@dataclasses.dataclass
class PolicyBatch:
    """Rows of a rollout prepared for a forward pass (a minibatch, or the whole rollout)."""

    prompt_ids: torch.Tensor  # [b, Lp] left-padded
    prompt_mask: torch.Tensor  # [b, Lp]
    completion_ids: torch.Tensor  # [b, Lc]
    completion_mask: torch.Tensor  # [b, Lc] attention: 1 up to and including the first EOS
    loss_mask: torch.Tensor  # [b, Lc] tokens that count in the loss (completion_mask minus masked rows)
    rows: torch.Tensor  # [b] indices of these rows in the rollout
    advantages: torch.Tensor | None = None  # [b] (GRPO) or [b, Lc] (PPO)
    old_logprobs: torch.Tensor | None = None  # [b, Lc] recorded at sampling time; None: on-policy
    ref_logprobs: torch.Tensor | None = None  # [b, Lc] reference policy; None when beta == 0

    @classmethod
    def from_rollout(cls, rollout: Rollout, mask_truncated: bool) -> PolicyBatch:
        loss_mask = rollout.completion_mask
        if mask_truncated:  # DAPO: a completion cut at max length carries no reliable signal
            loss_mask = loss_mask * (~rollout.is_truncated)[:, None].long()
        rows = torch.arange(rollout.completion_ids.shape[0], device=rollout.completion_ids.device)
        return cls(
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            loss_mask,
            rows,
        )

    @property
    def num_tokens(self) -> int:  # prompt + completion tokens attended to (CPU sync)
        return int(self.prompt_mask.sum() + self.completion_mask.sum())

    def select(self, rows: torch.Tensor, pad_to_multiple_of: int | None = None) -> PolicyBatch:
        """The given rows, with all-padding columns cut (leading prompt, trailing completion columns),
        then padded back up to ``pad_to_multiple_of`` columns each (``pad_to_multiple``)."""
        picked = {
            f.name: None if (v := getattr(self, f.name)) is None else v[rows]
            for f in dataclasses.fields(self)
        }
        keep_prompt = picked["prompt_mask"].any(dim=0).nonzero()  # CPU sync: shapes depend on the data
        start = int(keep_prompt[0]) if keep_prompt.numel() else picked["prompt_mask"].shape[1] - 1
        keep_completion = picked["completion_mask"].any(dim=0).nonzero()
        end = int(keep_completion[-1]) + 1 if keep_completion.numel() else 1
        for name in ("prompt_ids", "prompt_mask"):
            picked[name] = picked[name][:, start:]
        for name in ("completion_ids", "completion_mask", "loss_mask", "old_logprobs", "ref_logprobs"):
            if picked[name] is not None:
                picked[name] = picked[name][:, :end]
        if picked["advantages"] is not None and picked["advantages"].dim() == 2:
            picked["advantages"] = picked["advantages"][:, :end]
        return pad_to_multiple(PolicyBatch(**picked), pad_to_multiple_of)

    def split(
        self, size: int, generator: torch.Generator | None = None, pad_to_multiple_of: int | None = None
    ) -> list[PolicyBatch]:
        """Shuffled minibatches of ``size`` rows (the last may be smaller), see ``select``."""
        n = self.completion_ids.shape[0]
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        return [self.select(chunk.to(self.rows.device), pad_to_multiple_of) for chunk in order.split(size)]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The fields as a dict of tensors (a checkpoint of the rollout being optimised)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> PolicyBatch:
        return cls(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()})


def pad_to_multiple(batch: PolicyBatch, multiple: int | None) -> PolicyBatch:
    """TRL's ``pad_to_multiple_of``: the prompt columns padded on the left and the completion columns
    on the right up to a multiple of ``multiple`` (kernels that want aligned shapes), None: as is.
    The added tokens are masked out everywhere (attention, loss, log-probs 0), so the loss does not
    change; their ids (0) are never attended to. Padding-free forwards drop them again."""
    if multiple is None:
        return batch
    left = -batch.prompt_ids.shape[1] % multiple
    right = -batch.completion_ids.shape[1] % multiple
    padded = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if f.name in ("prompt_ids", "prompt_mask"):
            value = torch.nn.functional.pad(value, (left, 0))
        elif value is not None and value.dim() == 2 and f.name != "rows":  # the [b, Lc] fields
            value = torch.nn.functional.pad(value, (0, right))
        padded[f.name] = value
    return PolicyBatch(**padded)


def sequence_inputs(batch: PolicyBatch) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / position_ids of prompt + completion.

    Positions count attended tokens only, as ``generate`` does with left padding, so scoring sees
    the same positions the sampler saw.
    """
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    return {
        "input_ids": torch.cat([batch.prompt_ids, batch.completion_ids], dim=1),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(dim=1) - 1).clamp(min=0),
    }
