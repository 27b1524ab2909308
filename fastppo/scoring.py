"""Forward passes over sampled sequences: per-token log-probs (old / reference, no grad) and the
policy loss (with grad), through the fused kernels or the plain PyTorch path.

Fused path (``fused=True``): the decoder runs to the last hidden states of the completion positions
only, and ``fastppo.kernels`` computes log-probs and the loss against the lm_head weight one chunk
of tokens at a time, so ``[tokens, vocab]`` logits never exist. Plain path: full logits, textbook
``log_softmax(logits / T)`` + gather, then ``policy_objective``, the one definition of the loss both
paths share. Both give the same loss and gradients (tests/test_grpo_paths.py).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .kernels import linear_ppo_loss, linear_token_logprobs
from .kernels.ppo_loss import PolicyLossSettings, PolicyLossStats, policy_objective
from .rollout import Rollout

# Config attributes that rescale logits after lm_head (Gemma-2 soft-capping, Cohere/Granite scales):
# the fused path multiplies hidden states by the bare lm_head weight, so it would silently differ.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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

    def select(self, rows: torch.Tensor) -> PolicyBatch:
        """The given rows, with all-padding columns cut (leading prompt, trailing completion columns)."""
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
        return PolicyBatch(**picked)

    def split(self, size: int, generator: torch.Generator | None = None) -> list[PolicyBatch]:
        """Shuffled minibatches of ``size`` rows (the last may be smaller)."""
        n = self.completion_ids.shape[0]
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        return [self.select(chunk.to(self.rows.device)) for chunk in order.split(size)]


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


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (its LoRA layers are injected in place)."""
    return (
        model.get_base_model()
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config")
        else model
    )


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(decoder up to the final norm, lm_head) of a causal LM, checked for the fused path."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{type(base).__name__} rescales its logits ({name}={value}); the fused path does not "
                "implement that: set use_fused_kernels=False"
            )
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings()
    if decoder is None or type(head) is not nn.Linear:
        raise ValueError(
            f"use_fused_kernels needs a causal LM whose lm_head is a plain nn.Linear and whose decoder is "
            f"reachable (get_decoder()); got {type(base).__name__} with lm_head {type(head).__name__} "
            "(an adapter on lm_head?): set use_fused_kernels=False or leave lm_head out of the adapter"
        )
    return decoder, head


def completion_hidden_states(model: nn.Module, batch: PolicyBatch) -> torch.Tensor:
    """``[b, Lc, H]`` last hidden states at the positions that predict the completion tokens."""
    decoder, _ = lm_parts(model)
    hidden = decoder(**sequence_inputs(batch), use_cache=False).last_hidden_state
    start = batch.prompt_ids.shape[1] - 1  # the last prompt position predicts the first completion token
    return hidden[:, start : start + batch.completion_ids.shape[1]]


def completion_logits(model: nn.Module, batch: PolicyBatch) -> torch.Tensor:
    """``[b, Lc, V]`` logits that predict the completion tokens (plain path only)."""
    length = batch.completion_ids.shape[1]
    logits = model(**sequence_inputs(batch), use_cache=False, logits_to_keep=length + 1).logits
    return logits[:, :-1]


def head_operands(
    head: nn.Linear, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) in one dtype: autocast's when it is on (bf16 training on GPU), else the
    weight's. The kernels then run with autocast off, so forward and backward agree on dtypes."""
    device_type = hidden.device.type
    dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else head.weight.dtype
    )
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.to(dtype), head.weight.to(dtype), bias


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, enabled=False)


def plain_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Textbook ``log_softmax(logits / T)`` gathered at ``labels`` (fp32), and the entropy of that
    distribution when asked. Holds ``[b, Lc, V]`` fp32: the reference, not the fast path."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


@torch.no_grad()
def score_logprobs(
    model: nn.Module, batch: PolicyBatch, temperature: float, *, fused: bool, chunk_bytes: int
) -> torch.Tensor:
    """``[b, Lc]`` fp32 log-probs of the completion tokens under ``model`` (old or reference scoring),
    0 where ``completion_mask`` is 0. Runs in eval mode (no dropout) like the sampler."""
    was_training = model.training
    model.eval()
    try:
        mask = batch.completion_mask.bool()
        if fused:
            hidden = completion_hidden_states(model, batch)
            _, head = lm_parts(model)
            hidden, weight, bias = head_operands(head, hidden)
            with _no_autocast(hidden.device.type):
                return linear_token_logprobs(
                    hidden,
                    weight,
                    torch.where(mask, batch.completion_ids, -100),
                    bias=bias,
                    temperature=temperature,
                    chunk_bytes=chunk_bytes,
                )
        logp, _ = plain_token_logprobs(completion_logits(model, batch), batch.completion_ids, temperature)
        return logp.masked_fill(~mask, 0.0)
    finally:
        model.train(was_training)


def policy_loss(
    model: nn.Module,
    batch: PolicyBatch,
    settings: PolicyLossSettings,
    *,
    fused: bool,
    chunk_bytes: int,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Scalar clipped-ratio loss (+ beta * KL) of one minibatch and its statistics (with entropy).

    Without recorded ``old_logprobs`` the batch is on-policy: old = detached current log-probs, so
    the ratio is exactly 1 and only its gradient acts (the first update of a rollout, TRL #2769).
    """
    if batch.advantages is None:
        raise ValueError("the batch has no advantages; compute them before the loss")
    # Rows dropped from the loss (mask_truncated_completions) may hold any recorded log-prob; zero
    # them so exp(logp - old) stays finite there (inf * weight 0 would be NaN).
    keep = batch.loss_mask.bool()
    old_recorded = None if batch.old_logprobs is None else batch.old_logprobs.masked_fill(~keep, 0.0)
    ref = None if batch.ref_logprobs is None else batch.ref_logprobs.masked_fill(~keep, 0.0)
    if fused:
        hidden = completion_hidden_states(model, batch)
        _, head = lm_parts(model)
        hidden, weight, bias = head_operands(head, hidden)
        with _no_autocast(hidden.device.type):
            # old_recorded None: on-policy; the kernel uses the detached current log-probs (ratio 1)
            # from its own scan, so no extra lm_head pass is spent on them.
            return linear_ppo_loss(
                hidden,
                weight,
                batch.completion_ids,
                old_recorded,
                batch.advantages,
                batch.loss_mask,
                bias=bias,
                ref_logprobs=ref,
                compute_entropy=True,
                chunk_bytes=chunk_bytes,
                **dataclasses.asdict(settings),
            )
    logp, entropy = plain_token_logprobs(
        completion_logits(model, batch), batch.completion_ids, settings.temperature, with_entropy=True
    )
    old = logp.detach() if old_recorded is None else old_recorded
    return policy_objective(logp, old, batch.advantages, batch.loss_mask, settings, ref, entropy)
