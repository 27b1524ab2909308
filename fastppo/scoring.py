"""Forward passes over sampled sequences: per-token log-probs (old / reference, no grad) and the
policy loss (with grad), through the fused kernels or the plain PyTorch path.

Padding-free (``padding_free=True``, TRL SFTConfig's name): each forward runs the batch packed into
one row of its attended tokens, positions restarting per sequence (``memory.packing``), and the
per-position outputs are put back into the padded layout before the loss; values and gradients
equal the padded path's (tests/test_grpo_memory.py).

Fused path (``fused=True``): the decoder runs to the last hidden states of the completion positions
only, and ``fastppo.kernels`` computes log-probs and the loss against the lm_head weight one chunk
of tokens at a time, so ``[tokens, vocab]`` logits never exist. Plain path: full logits, textbook
``log_softmax(logits / T)`` + gather, then ``policy_objective``, the one definition of the loss both
paths share. Both give the same loss and gradients (tests/test_grpo_paths.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from .kernels import linear_ppo_loss, linear_token_logprobs
from .kernels.ppo_loss import PolicyLossSettings, PolicyLossStats, policy_objective
from .memory.packing import PackedBatch, pack, unpack
from .memory.trunk import Trunk, find_decoder, policy_top, run_trunk, unwrap_peft
from .rollout import Rollout
from .sharding import final_hidden_states, is_sharded, reshard

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


def logit_transform(model: nn.Module) -> str | None:
    """``"name=value"`` of the rescaling a model applies to its logits after lm_head, or None."""
    config = getattr(unwrap_peft(model), "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"{name}={value}"
    return None


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(decoder up to the final norm, lm_head) of a causal LM, checked for the fused path."""
    base = unwrap_peft(model)
    if (transform := logit_transform(base)) is not None:
        raise ValueError(
            f"{type(base).__name__} rescales its logits ({transform}); the fused path does not "
            "implement that: set use_fused_kernels=False"
        )
    decoder = find_decoder(base)
    head = base.get_output_embeddings()
    if decoder is None or type(head) is not nn.Linear:
        raise ValueError(
            f"use_fused_kernels needs a causal LM whose lm_head is a plain nn.Linear and whose decoder is "
            f"reachable (get_decoder()); got {type(base).__name__} with lm_head {type(head).__name__} "
            "(an adapter on lm_head?): set use_fused_kernels=False or leave lm_head out of the adapter"
        )
    return decoder, head


@dataclasses.dataclass
class ForwardInputs:
    """What one forward over a batch receives, padded or packed, and how to read its outputs back."""

    kwargs: dict  # for model(...) / decoder(...) / run_trunk(...): input_ids, positions, mask or packing
    packed: PackedBatch | None  # None: the padded [b, Lp + Lc] layout
    prompt_length: int  # Lp
    completion_length: int  # Lc

    def completion_positions(self, per_position: torch.Tensor) -> torch.Tensor:
        """``[b, Lc, ...]`` the outputs at the positions that predict the completion tokens, from
        ``[b, Lp + Lc, ...]`` (padded) or ``[1, N, ...]`` (packed; 0 where the padded layout has padding)."""
        if self.packed is not None:
            per_position = unpack(per_position, self.packed)
        start = self.prompt_length - 1  # the last prompt position predicts the first completion token
        return per_position[:, start : start + self.completion_length]


def forward_inputs(batch: PolicyBatch, padding_free: bool = False) -> ForwardInputs:
    """The batch's prompt + completion as model inputs: padded (``sequence_inputs``) or packed."""
    inputs = sequence_inputs(batch)
    lengths = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    if not padding_free:
        return ForwardInputs({**inputs, "use_cache": False}, None, *lengths)
    packed = pack(inputs["input_ids"], inputs["attention_mask"])
    return ForwardInputs(packed.model_inputs(), packed, *lengths)


def completion_hidden_states(
    model: nn.Module, batch: PolicyBatch, padding_free: bool = False, shared: TrunkPass | None = None
) -> torch.Tensor:
    """``[b, Lc, H]`` last hidden states at the positions that predict the completion tokens; with
    ``shared``, only the policy's own layers run, on that trunk pass's output."""
    decoder, _ = lm_parts(model)
    if shared is not None:
        return shared.inputs.completion_positions(policy_top(model, shared.trunk))
    inputs = forward_inputs(batch, padding_free)
    if is_sharded(model):  # through the model's own forward, no logits kept (fastppo.sharding)
        no_logits = torch.empty(0, dtype=torch.long, device=batch.completion_ids.device)
        return inputs.completion_positions(
            final_hidden_states(model, inputs.kwargs, logits_to_keep=no_logits)
        )
    return inputs.completion_positions(decoder(**inputs.kwargs).last_hidden_state)


def completion_logits(model: nn.Module, batch: PolicyBatch, padding_free: bool = False) -> torch.Tensor:
    """``[b, Lc, V]`` logits that predict the completion tokens (plain path only)."""
    return completion_logits_and_hidden(model, batch, padding_free, with_hidden=False)[0]


def completion_logits_and_hidden(
    model: nn.Module, batch: PolicyBatch, padding_free: bool = False, *, with_hidden: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain path: ``[b, Lc, V]`` logits predicting the completion tokens and, ``with_hidden``, the
    final hidden states ``[b, Lc, H]`` at the same positions, from one forward (a critic's head
    may read them)."""
    inputs = forward_inputs(batch, padding_free)
    if inputs.packed is not None:  # logits_to_keep counts from the end of the one packed row
        out = model(**inputs.kwargs, output_hidden_states=with_hidden)
        hidden = inputs.completion_positions(out.hidden_states[-1]) if with_hidden else None
        return inputs.completion_positions(out.logits), hidden
    length = batch.completion_ids.shape[1]
    out = model(**inputs.kwargs, logits_to_keep=length + 1, output_hidden_states=with_hidden)
    hidden = inputs.completion_positions(out.hidden_states[-1]) if with_hidden else None
    return out.logits[:, :-1], hidden


@dataclasses.dataclass
class TrunkPass:
    """One pass of the shared frozen trunk over a batch, and how to read the tops' outputs back."""

    trunk: Trunk  # hidden states after layer K-1 ([b, L, H] padded, [1, N, H] packed)
    inputs: ForwardInputs


def trunk_pass(
    model: nn.Module, batch: PolicyBatch, num_layers: int, padding_free: bool = False
) -> TrunkPass:
    """The shared frozen trunk (embedding + layers ``[0, num_layers)``) over the batch, once, for
    every top that reads it (the policy's own layers, a shared-trunk reference, a trunk critic).
    Nothing in it is trainable, so autograd records nothing here even outside ``no_grad``.

    Example (PPO with a ``TrunkValueModel`` critic, one trunk for the loss and the values):
        >>> shared = trunk_pass(policy, batch, K)
        >>> loss, stats = policy_loss(policy, batch, settings, fused=True, chunk_bytes=n, shared=shared)
        >>> values = shared.inputs.completion_positions(critic(shared.trunk))  # [b, Lc] fp32
    """
    inputs = forward_inputs(batch, padding_free)
    return TrunkPass(run_trunk(model, num_layers=num_layers, **inputs.kwargs), inputs)


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Score without dropout, like the sampler; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def plain_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Textbook ``log_softmax(logits / T)`` gathered at ``labels`` (fp32), and the entropy of that
    distribution when asked. Holds ``[b, Lc, V]`` fp32: the reference, not the fast path."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def head_logprobs(
    head: nn.Linear,
    hidden: torch.Tensor,  # [b, Lc, H] final (normed) hidden states predicting the completion
    batch: PolicyBatch,
    temperature: float,
    *,
    fused: bool,
    chunk_bytes: int,
) -> torch.Tensor:
    """``[b, Lc]`` fp32 log-probs of the completion tokens from hidden states and an lm_head, 0 where
    ``completion_mask`` is 0: chunked through the kernel (fused), or from full logits (plain)."""
    mask = batch.completion_mask.bool()
    hidden, weight, bias = head_operands(head, hidden)
    if fused:
        with _no_autocast(hidden.device.type):
            return linear_token_logprobs(
                hidden,
                weight,
                torch.where(mask, batch.completion_ids, -100),
                bias=bias,
                temperature=temperature,
                chunk_bytes=chunk_bytes,
            )
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logp, _ = plain_token_logprobs(logits, batch.completion_ids, temperature)
    return logp.masked_fill(~mask, 0.0)


@torch.no_grad()
def score_logprobs(
    model: nn.Module,
    batch: PolicyBatch,
    temperature: float,
    *,
    fused: bool,
    chunk_bytes: int,
    padding_free: bool = False,
) -> torch.Tensor:
    """``[b, Lc]`` fp32 log-probs of the completion tokens under ``model`` (old or reference scoring),
    0 where ``completion_mask`` is 0. Runs in eval mode (no dropout) like the sampler; a sharded
    model's gathered root is freed after (no backward follows to free it)."""
    with eval_mode(model):
        try:
            if fused:
                _, head = lm_parts(model)
                hidden = completion_hidden_states(model, batch, padding_free)
                return head_logprobs(head, hidden, batch, temperature, fused=True, chunk_bytes=chunk_bytes)
            logits = completion_logits(model, batch, padding_free)
            logp, _ = plain_token_logprobs(logits, batch.completion_ids, temperature)
            return logp.masked_fill(~batch.completion_mask.bool(), 0.0)
        finally:
            reshard(model)


def policy_loss(
    model: nn.Module,
    batch: PolicyBatch,
    settings: PolicyLossSettings,
    *,
    fused: bool,
    chunk_bytes: int,
    padding_free: bool = False,
    shared: TrunkPass | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Scalar clipped-ratio loss (+ beta * KL) of one minibatch and its statistics (with entropy).

    Without recorded ``old_logprobs`` the batch is on-policy: old = detached current log-probs, so
    the ratio is exactly 1 and only its gradient acts (the first update of a rollout, TRL #2769).
    ``shared``: a ``trunk_pass`` of this batch (frozen trunk) that a critic reads too; the policy
    then runs only its own layers.
    """
    if fused:
        hidden = completion_hidden_states(model, batch, padding_free, shared)
        return fused_policy_loss_from_hidden(model, hidden, batch, settings, chunk_bytes)
    if shared is None:
        logits = completion_logits(model, batch, padding_free)
    else:  # the trunk's tops apply the bare lm_head (no logit transforms: checked with the trunk)
        _, head = lm_parts(model)
        logits = head(completion_hidden_states(model, batch, shared=shared))
    return plain_policy_loss(logits, batch, settings)


def _loss_inputs(batch: PolicyBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(old, ref) log-probs with the rows dropped from the loss zeroed: they may hold any recorded
    value (mask_truncated_completions), and exp(logp - old) must stay finite there."""
    if batch.advantages is None:
        raise ValueError("the batch has no advantages; compute them before the loss")
    keep = batch.loss_mask.bool()
    old = None if batch.old_logprobs is None else batch.old_logprobs.masked_fill(~keep, 0.0)
    ref = None if batch.ref_logprobs is None else batch.ref_logprobs.masked_fill(~keep, 0.0)
    return old, ref


def fused_policy_loss_from_hidden(
    model: nn.Module,
    hidden: torch.Tensor,  # [b, Lc, H] final hidden states predicting the completion tokens
    batch: PolicyBatch,
    settings: PolicyLossSettings,
    chunk_bytes: int,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """The fused path's loss from hidden states the caller already has (a critic may read them)."""
    old, ref = _loss_inputs(batch)
    _, head = lm_parts(model)
    hidden, weight, bias = head_operands(head, hidden)
    with _no_autocast(hidden.device.type):
        # old None: on-policy; the kernel uses the detached current log-probs (ratio 1) from its own
        # scan, so no extra lm_head pass is spent on them.
        return linear_ppo_loss(
            hidden,
            weight,
            batch.completion_ids,
            old,
            batch.advantages,
            batch.loss_mask,
            bias=bias,
            ref_logprobs=ref,
            compute_entropy=True,
            chunk_bytes=chunk_bytes,
            **dataclasses.asdict(settings),
        )


def plain_policy_loss(
    logits: torch.Tensor, batch: PolicyBatch, settings: PolicyLossSettings
) -> tuple[torch.Tensor, PolicyLossStats]:
    """The plain path's loss from ``[b, Lc, V]`` logits: textbook log-softmax, then ``policy_objective``."""
    old, ref = _loss_inputs(batch)
    logp, entropy = plain_token_logprobs(
        logits, batch.completion_ids, settings.temperature, with_entropy=True
    )
    old = logp.detach() if old is None else old
    return policy_objective(logp, old, batch.advantages, batch.loss_mask, settings, ref, entropy)
