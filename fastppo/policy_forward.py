"""The one way fastppo runs a causal LM over sampled sequences, for both trainers, with gradient (the
loss) and without (old and reference log-probs).

``ForwardPlan`` is decided once from the config; ``PolicyForward`` follows it:
  ``run(model, batch)``        -> ``PolicyPass``: what one decoder pass left for the heads to read
  ``logprobs(pass, batch, T)`` -> ``[b, Lc]`` fp32 log-probs of the completion tokens
  ``loss(pass, batch, ...)``   -> the clipped-ratio loss and its statistics
  a critic reads the same pass (its final hidden states, or the shared trunk's output) and a
  reference sharing the trunk reads ``pass.trunk``, so one pass serves all of them.

Fused (``use_fused_kernels``): the decoder runs to the last hidden states of the completion positions
only, and ``fastppo.kernels`` computes log-probs and the loss against the lm_head weight one chunk of
tokens at a time, so ``[tokens, vocab]`` logits never exist. Plain: full logits, textbook
``log_softmax(logits / T)`` + gather, then ``policy_objective``, the one definition of the loss both
paths share. Both give the same loss and gradients (tests/test_policy_forward.py).

Padding-free (``padding_free``, TRL SFTConfig's name): each forward runs the batch packed into one
row of its attended tokens, positions restarting per sequence (``memory.packing``), and the
per-position outputs are put back into the padded layout; values and gradients equal the padded
path's. Frozen layers (``num_frozen_layers=K``): the policy runs the shared frozen trunk
(embedding + layers ``[0, K)``, ``memory.trunk``) and then its own layers on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from .adapters import unwrap_peft
from .batch import PolicyBatch, sequence_inputs
from .config import ForwardPlan
from .kernels import linear_ppo_loss, linear_token_logprobs
from .kernels.ppo_loss import Gather, PolicyLossSettings, PolicyLossStats, policy_objective
from .memory.packing import PackedBatch, pack, unpack
from .memory.trunk import Trunk, find_decoder, policy_top, run_trunk
from .sharding import final_hidden_states, is_sharded, reshard

# Config attributes that rescale logits after lm_head (Gemma-2 soft-capping, Cohere/Granite scales):
# the fused path multiplies hidden states by the bare lm_head weight, so it would silently differ.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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


@dataclasses.dataclass
class TrunkPass:
    """One pass of the shared frozen trunk over a batch, and how to read the tops' outputs back."""

    trunk: Trunk  # hidden states after layer K-1 ([b, L, H] padded, [1, N, H] packed)
    inputs: ForwardInputs


@dataclasses.dataclass
class PolicyPass:
    """What one pass of a causal LM over a batch leaves for the heads that read it."""

    model: nn.Module  # whose pass it is (its lm_head turns ``hidden`` into log-probs)
    hidden: torch.Tensor | None  # [b, Lc, H] final hidden states predicting the completion tokens
    logits: torch.Tensor | None  # [b, Lc, V] plain path without a trunk only (else None)
    trunk: TrunkPass | None  # the shared frozen trunk's pass (num_frozen_layers), else None


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


def head_operands(
    head: nn.Linear, hidden: torch.Tensor, fp32: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, weight, bias) in one dtype: fp32 when asked (``cast_lm_head_to_fp32``), else
    autocast's when it is on (bf16 training on GPU), else the weight's. The kernels then run with
    autocast off, so forward and backward agree on dtypes."""
    device_type = hidden.device.type
    dtype = (
        torch.float32
        if fp32
        else torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else head.weight.dtype
    )
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.to(dtype), head.weight.to(dtype), bias


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run without dropout, like the sampler; each model's previous mode is restored."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)


def plain_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Textbook ``log_softmax(logits / T)`` gathered at ``labels`` (fp32), and the entropy of that
    distribution when asked. Holds ``[b, Lc, V]`` fp32: the reference, not the fast path."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def _loss_inputs(batch: PolicyBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(old, ref) log-probs with the rows dropped from the loss zeroed: they may hold any recorded
    value (mask_truncated_completions), and exp(logp - old) must stay finite there."""
    if batch.advantages is None:
        raise ValueError("the batch has no advantages; compute them before the loss")
    keep = batch.loss_mask.bool()
    old = None if batch.old_logprobs is None else batch.old_logprobs.masked_fill(~keep, 0.0)
    ref = None if batch.ref_logprobs is None else batch.ref_logprobs.masked_fill(~keep, 0.0)
    return old, ref


class PolicyForward:
    """Forwards of a causal LM over ``PolicyBatch`` rows, as ``plan`` says (see the module docstring).

    Example (PPO: the loss, the critic's values and the reference's log-probs from one pass):
        >>> forward = PolicyForward(config.forward_plan())
        >>> policy_pass = forward.run(policy, batch, with_hidden=True)
        >>> loss, stats = forward.loss(policy_pass, batch, settings)
        >>> values = critic.values(batch, policy_pass)  # [b, Lc] fp32
    """

    def __init__(self, plan: ForwardPlan):
        self.plan = plan

    # --- passes ---------------------------------------------------------------------------------

    def inputs(self, batch: PolicyBatch) -> ForwardInputs:
        """The batch's prompt + completion as model inputs: padded (``sequence_inputs``) or packed."""
        inputs = sequence_inputs(batch)
        lengths = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
        if not self.plan.padding_free:
            return ForwardInputs({**inputs, "use_cache": False}, None, *lengths)
        packed = pack(inputs["input_ids"], inputs["attention_mask"])
        return ForwardInputs(packed.model_inputs(), packed, *lengths)

    def trunk_pass(self, model: nn.Module, batch: PolicyBatch) -> TrunkPass:
        """The shared frozen trunk (embedding + layers ``[0, K)``) over the batch, once, for every top
        that reads it (the policy's own layers, a shared-trunk reference, a trunk critic). Nothing in
        it is trainable, so autograd records nothing here even outside ``no_grad``."""
        if self.plan.num_frozen_layers is None:
            raise ValueError("a trunk pass needs num_frozen_layers (the layers the tops share)")
        inputs = self.inputs(batch)
        return TrunkPass(run_trunk(model, num_layers=self.plan.num_frozen_layers, **inputs.kwargs), inputs)

    def top(self, model: nn.Module, shared: TrunkPass) -> PolicyPass:
        """The policy's own layers (``K..`` and the final norm) on a trunk pass."""
        lm_parts(model)  # checked as on every path: the tops apply the bare lm_head
        hidden = shared.inputs.completion_positions(policy_top(model, shared.trunk))
        return PolicyPass(model, hidden, None, shared)

    def run(self, model: nn.Module, batch: PolicyBatch, with_hidden: bool = False) -> PolicyPass:
        """One pass of ``model`` over the batch: through the shared trunk and the policy's own layers
        (frozen layers), to the final hidden states (fused), or to the logits (plain; ``with_hidden``:
        the final hidden states too, from the same forward, for a critic's head)."""
        if self.plan.num_frozen_layers is not None:
            return self.top(model, self.trunk_pass(model, batch))
        if self.plan.fused:
            return PolicyPass(model, self._hidden_states(model, batch), None, None)
        logits, hidden = self._logits(model, batch, with_hidden)
        return PolicyPass(model, hidden, logits, None)

    def _hidden_states(self, model: nn.Module, batch: PolicyBatch) -> torch.Tensor:
        """``[b, Lc, H]`` last hidden states at the positions that predict the completion tokens."""
        decoder, _ = lm_parts(model)
        inputs = self.inputs(batch)
        if is_sharded(model):  # through the model's own forward, no logits kept (fastppo.sharding)
            no_logits = torch.empty(0, dtype=torch.long, device=batch.completion_ids.device)
            return inputs.completion_positions(
                final_hidden_states(model, inputs.kwargs, logits_to_keep=no_logits)
            )
        return inputs.completion_positions(decoder(**inputs.kwargs).last_hidden_state)

    def _logits(
        self, model: nn.Module, batch: PolicyBatch, with_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plain path: ``[b, Lc, V]`` logits predicting the completion tokens and, ``with_hidden``,
        the final hidden states ``[b, Lc, H]`` at the same positions, from one forward."""
        inputs = self.inputs(batch)
        if inputs.packed is not None:  # logits_to_keep counts from the end of the one packed row
            out = model(**inputs.kwargs, output_hidden_states=with_hidden)
            hidden = inputs.completion_positions(out.hidden_states[-1]) if with_hidden else None
            return inputs.completion_positions(out.logits), hidden
        length = batch.completion_ids.shape[1]
        out = model(**inputs.kwargs, logits_to_keep=length + 1, output_hidden_states=with_hidden)
        hidden = inputs.completion_positions(out.hidden_states[-1]) if with_hidden else None
        return out.logits[:, :-1], hidden

    # --- what the heads make of a pass --------------------------------------------------------------

    def head_logprobs(
        self,
        head: nn.Linear,
        hidden: torch.Tensor,  # [b, Lc, H] final (normed) hidden states predicting the completion
        batch: PolicyBatch,
        temperature: float,
    ) -> torch.Tensor:
        """``[b, Lc]`` fp32 log-probs of the completion tokens from hidden states and an lm_head, 0 where
        ``completion_mask`` is 0: chunked through the kernel (fused), or from full logits (plain)."""
        mask = batch.completion_mask.bool()
        hidden, weight, bias = head_operands(head, hidden, self.plan.lm_head_fp32)
        if self.plan.fused:
            with torch.autocast(hidden.device.type, enabled=False):
                return linear_token_logprobs(
                    hidden,
                    weight,
                    torch.where(mask, batch.completion_ids, -100),
                    bias=bias,
                    temperature=temperature,
                    chunk_bytes=self.plan.chunk_bytes,
                )
        with torch.autocast(hidden.device.type, enabled=False):  # operands already in their dtype
            logits = torch.nn.functional.linear(hidden, weight, bias)
        logp, _ = plain_token_logprobs(logits, batch.completion_ids, temperature)
        return logp.masked_fill(~mask, 0.0)

    def logprobs(self, policy_pass: PolicyPass, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        """``[b, Lc]`` fp32 log-probs of the completion tokens under the pass's model, 0 where
        ``completion_mask`` is 0."""
        if policy_pass.logits is None:
            _, head = lm_parts(policy_pass.model)
            return self.head_logprobs(head, policy_pass.hidden, batch, temperature)
        logp, _ = plain_token_logprobs(policy_pass.logits, batch.completion_ids, temperature)
        return logp.masked_fill(~batch.completion_mask.bool(), 0.0)

    def loss(
        self,
        policy_pass: PolicyPass,
        batch: PolicyBatch,
        settings: PolicyLossSettings,
        gather: Gather | None = None,
    ) -> tuple[torch.Tensor, PolicyLossStats]:
        """Scalar policy loss (+ beta * KL, - the entropy bonus) of one minibatch and its statistics
        (with entropy). ``gather``: all-gathers across processes, for the ``top_entropy_quantile``
        threshold over the whole batch (None: this process's tokens).

        Without recorded ``old_logprobs`` the batch is on-policy: old = detached current log-probs, so
        the ratio is exactly 1 and only its gradient acts (the first update of a rollout, TRL #2769).
        The plain path's entropy is differentiable (it comes from the logits), so an entropy bonus
        trains through it as the fused path's gradient pass does.
        """
        old, ref = _loss_inputs(batch)
        if self.plan.fused:
            _, head = lm_parts(policy_pass.model)
            hidden, weight, bias = head_operands(head, policy_pass.hidden, self.plan.lm_head_fp32)
            with torch.autocast(hidden.device.type, enabled=False):
                # old None: on-policy; the kernel uses the detached current log-probs (ratio 1) from
                # its own scan, so no extra lm_head pass is spent on them.
                return linear_ppo_loss(
                    hidden,
                    weight,
                    batch.completion_ids,
                    old,
                    batch.advantages,
                    batch.loss_mask,
                    settings,
                    bias=bias,
                    ref_logprobs=ref,
                    compute_entropy=True,
                    chunk_bytes=self.plan.chunk_bytes,
                    gather=gather,
                )
        logits = policy_pass.logits
        if logits is None:  # a trunk pass: the policy's top applies the bare lm_head
            _, head = lm_parts(policy_pass.model)
            operands = head_operands(head, policy_pass.hidden, self.plan.lm_head_fp32)
            with torch.autocast(operands[0].device.type, enabled=False):  # operands already in their dtype
                logits = torch.nn.functional.linear(*operands)
        logp, entropy = plain_token_logprobs(
            logits, batch.completion_ids, settings.temperature, with_entropy=True
        )
        old = logp.detach() if old is None else old
        return policy_objective(logp, old, batch.advantages, batch.loss_mask, settings, ref, entropy, gather)

    def policy_loss(
        self,
        model: nn.Module,
        batch: PolicyBatch,
        settings: PolicyLossSettings,
        gather: Gather | None = None,
    ) -> tuple[torch.Tensor, PolicyLossStats]:
        """``loss`` of one ``run`` of ``model`` over the batch (GRPO: nothing else reads the pass)."""
        return self.loss(self.run(model, batch), batch, settings, gather)

    # --- scoring without gradient ---------------------------------------------------------------

    @contextlib.contextmanager
    def scoring(self, model: nn.Module) -> Iterator[None]:
        """No grad, eval mode (no dropout, like the sampler); a sharded model's gathered root is
        freed after (no backward follows to free it)."""
        with torch.no_grad(), eval_mode(model):
            try:
                yield
            finally:
                reshard(model)

    def score(self, model: nn.Module, batch: PolicyBatch, temperature: float) -> torch.Tensor:
        """``[b, Lc]`` fp32 log-probs of the completion tokens under ``model`` (old or reference
        scoring), 0 where ``completion_mask`` is 0, under ``scoring``."""
        with self.scoring(model):
            return self.logprobs(self.run(model, batch), batch, temperature)
