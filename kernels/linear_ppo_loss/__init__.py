"""Log-probs and the policy loss from the last hidden states and the lm_head weight, without ever
materialising ``[tokens, vocab]`` logits (chunked; see ``chunked.py``)."""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from .._backend import Backend, resolve_backend
from .._checks import check_float, check_labels, check_positive, check_same_shape
from ..ppo_loss.checks import check_policy_inputs
from ..ppo_loss.reference import Gather, PolicyLossStats, objective_grads, policy_objective
from ..ppo_loss.settings import PolicyLossSettings, resolve_settings
from ..token_logprobs import launchers
from .chunked import backprop_chunks, default_chunk_bytes, fused_token_chunks, rows_per_chunk, scan_logprobs


def _chunk_rows(
    hidden_2d: torch.Tensor, weight: torch.Tensor, chunk_bytes: int | None, on_triton: bool
) -> int:
    """Token rows per chunk of ``chunk_bytes`` (None: the device's budget, ``default_chunk_bytes``);
    the reference launchers' fp32 temporaries count against it, the in-place Triton ones do not."""
    budget = default_chunk_bytes(hidden_2d.device) if chunk_bytes is None else chunk_bytes
    return rows_per_chunk(hidden_2d.shape[0], weight.shape[0], hidden_2d.dtype, budget, not on_triton)


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_same_shape("bias", bias, (weight.shape[0],), f"weight is {tuple(weight.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):  # the chunk matmuls do not mix dtypes
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise ValueError(
                f"{name} has dtype {tensor.dtype}, expected hidden's dtype {hidden.dtype} (cast one of them)"
            )


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy, impl, rows):
        logp, lse, entropy = scan_logprobs(
            hidden, weight, bias, labels, temperature, ignore_index, return_entropy, impl, rows
        )
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy if return_entropy else lse)
        ctx.settings = (temperature, ignore_index, return_entropy, impl, rows)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, return_entropy, impl, rows = ctx.settings
        grads = backprop_chunks(
            hidden,
            weight,
            bias,
            labels,
            lse,
            grad_logp,
            temperature,
            ignore_index,
            impl,
            rows,
            needs=ctx.needs_input_grad[:3],
            entropy=entropy if return_entropy else None,
            grad_entropy=grad_entropy if return_entropy else None,
        )
        # labels, temperature, ignore_index, return_entropy, impl, rows: not differentiable
        return (*grads, None, None, None, None, None, None)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_bytes: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[..., H]`` last hidden states (e.g. ``[N, H]``). weight: ``[V, H]`` (lm_head).
        labels: ``[...]`` int64. Differentiable w.r.t. hidden, weight and bias; under
            ``torch.no_grad()`` it is the cheap scorer for old and reference log-probs.
        chunk_bytes: memory budget of one chunk of logits; None: sized for the device
            (``chunked.default_chunk_bytes``).

    Returns:
        fp32 ``[...]`` log-probs (and entropy when asked).

    Example:
        >>> ref_logp = linear_token_logprobs(h, model.lm_head.weight, ids, temperature=0.7)
    """
    _check_linear(hidden, weight, bias)
    check_positive("temperature", temperature)
    check_same_shape("labels", labels, hidden.shape[:-1], f"hidden is {tuple(hidden.shape)}")
    check_labels(labels, weight.shape[0], ignore_index)
    lead = labels.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    impl = launchers(backend, hidden)
    on_triton = resolve_backend(backend, hidden) == "triton"
    rows = _chunk_rows(hidden_2d, weight, chunk_bytes, on_triton)
    out = _LinearTokenLogprobs.apply(
        hidden_2d,
        weight,
        bias,
        labels.reshape(-1).long(),
        temperature,
        ignore_index,
        return_entropy,
        impl,
        rows,
    )
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """How one ``linear_ppo_loss`` call runs, besides its tensors."""

    settings: PolicyLossSettings
    compute_entropy: bool  # entropy as a stat (the loss reads it anyway when settings.needs_entropy)
    impl: ModuleType  # Triton or reference token_logprobs launchers
    single_pass: bool  # Triton + token-local settings: fused kernel, three matmuls per chunk
    rows: int  # token rows per chunk
    gather: Gather | None = None  # across processes, for the top_entropy_quantile threshold

    @property
    def want_entropy(self) -> bool:
        return self.compute_entropy or self.settings.needs_entropy


def _grads_single_pass(
    hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, plan, needs
):
    """Triton, token-local: one chunk loop gives log-probs and the gradients (three matmuls per chunk)."""
    from ..ppo_loss.triton import TokenInputs  # imports triton: only on the Triton backend

    inputs = TokenInputs.build(labels, old_logprobs, advantages, mask, ref_logprobs, plan.settings)
    return fused_token_chunks(
        hidden, weight, bias, inputs, plan.settings, plan.want_entropy, plan.rows, needs
    )


def _grads_two_pass(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, plan, needs):
    """Log-probs (and entropy) first; dLoss/dlogp (and dLoss/dH) by autograd of the [B, T]
    objective; then rebuild each chunk's logits for its gradient (four matmuls per chunk). Serves
    settings that couple tokens, and the reference."""
    batch, length = labels.shape
    settings = plan.settings
    flat_labels = torch.where(mask.bool(), labels, -100).reshape(-1)
    logp, lse, entropy = scan_logprobs(
        hidden,
        weight,
        bias,
        flat_labels,
        settings.temperature,
        -100,
        plan.want_entropy,
        plan.impl,
        plan.rows,
    )
    if not any(needs):  # nothing to differentiate: one pass, no gradient work
        return logp, entropy, (None, None, None)
    shaped = None if entropy is None else entropy.reshape(batch, length)
    grad_logp, grad_entropy = objective_grads(
        logp.reshape(batch, length),
        shaped,
        old_logprobs,
        advantages,
        mask,
        settings,
        ref_logprobs,
        plan.gather,
    )
    grads = backprop_chunks(
        hidden,
        weight,
        bias,
        flat_labels,
        lse,
        grad_logp.reshape(-1),
        settings.temperature,
        -100,
        plan.impl,
        plan.rows,
        needs=needs,
        entropy=None if grad_entropy is None else entropy,
        grad_entropy=None if grad_entropy is None else grad_entropy.reshape(-1),
    )
    return logp, entropy, grads


class _LinearPolicyLoss(torch.autograd.Function):
    """The loss's gradient is known once the log-probs are: computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, plan):
        needs = tuple(ctx.needs_input_grad[:3])
        run = _grads_single_pass if plan.single_pass and any(needs) else _grads_two_pass
        logp, entropy, grads = run(
            hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, plan, needs
        )
        batch, length = labels.shape
        loss, stats = policy_objective(
            logp.reshape(batch, length),
            old_logprobs,
            advantages,
            mask,
            plan.settings,
            ref_logprobs,
            None if entropy is None else entropy.reshape(batch, length),
            plan.gather,
        )
        ctx.grads = grads  # held on ctx, not saved: backward scales them in place
        return loss.detach(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the linear policy loss's gradients are consumed by its first backward")
        # One host sync; skipping the scale when grad_loss == 1 saves a pass over grad_W [V, H].
        if bool(grad_loss != 1):
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_loss)  # fp32 scale: no bf16 rounding of grad_loss itself
        # labels, old_logprobs, advantages, mask, ref_logprobs, plan: not differentiable
        return (*grads, None, None, None, None, None, None)


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    compute_entropy: bool = False,
    chunk_bytes: int | None = None,
    gather: Gather | None = None,
    backend: Backend = "auto",
    **loss_settings: object,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``fused_policy_loss`` from ``hidden [B, T, H]`` and ``weight [V, H]`` (+ ``bias [V]``).

    Gradients flow to hidden, weight and bias (a tied embedding accumulates into the shared
    parameter). ``old_logprobs=None``: on-policy (ratio exactly 1), which saves the caller a
    separate scoring pass. ``settings``, ``gather`` and the ``loss_settings`` keywords as in
    ``fused_policy_loss``. Peak extra memory is one chunk of ``chunk_bytes``, independent of B * T
    (None: ``chunked.default_chunk_bytes``, 1 GiB on a GPU and 128 MiB on CPU).

    Example:
        >>> loss, stats = linear_ppo_loss(h, model.lm_head.weight, ids, old, adv, mask, loss_type="dapo")
    """
    settings = resolve_settings(settings, loss_settings)
    _check_linear(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    check_policy_inputs(
        tuple(hidden.shape[:2]),
        weight.shape[0],
        labels,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        settings.beta,
        f"hidden is {tuple(hidden.shape)}",
    )
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    impl = launchers(backend, hidden)
    # Triton + token-local settings: the fused kernel gives log-probs and dlogits in one launch per chunk.
    on_triton = resolve_backend(backend, hidden) == "triton"
    plan = LossPlan(
        settings,
        compute_entropy,
        impl,
        settings.token_local and on_triton,
        _chunk_rows(hidden_2d, weight, chunk_bytes, on_triton),
        gather,
    )
    return _LinearPolicyLoss.apply(
        hidden_2d, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, plan
    )
