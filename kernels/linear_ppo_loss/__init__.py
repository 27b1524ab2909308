"""Log-probs and the policy loss from the last hidden states and the lm_head weight, without ever
materialising ``[tokens, vocab]`` logits (chunked; see ``chunked.py``)."""

from __future__ import annotations

import torch

from .._backend import Backend, resolve_backend
from .._checks import check_float, check_labels, check_positive, check_same_shape
from ..ppo_loss.checks import check_policy_inputs
from ..ppo_loss.reference import PolicyLossStats, policy_objective
from ..ppo_loss.settings import PolicyLossSettings, loss_token_weights
from ..token_logprobs import launchers
from .chunked import DEFAULT_CHUNK_BYTES, backprop_chunks, fused_token_chunks, rows_per_chunk, scan_logprobs


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_same_shape("bias", bias, (weight.shape[0],), f"weight is {tuple(weight.shape)}")


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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[..., H]`` last hidden states (e.g. ``[N, H]``). weight: ``[V, H]`` (lm_head).
        labels: ``[...]`` int64. Differentiable w.r.t. hidden, weight and bias; under
            ``torch.no_grad()`` it is the cheap scorer for old and reference log-probs.

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
    rows = rows_per_chunk(hidden_2d.shape[0], weight.shape[0], hidden.dtype, chunk_bytes)
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


class _LinearPolicyLoss(torch.autograd.Function):
    """The loss's gradient is known once the log-probs are: computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, config):
        settings, compute_entropy, impl, single_pass, rows, stats_out = config
        batch, length = labels.shape
        needs = ctx.needs_input_grad[:3]
        if single_pass:
            adv = advantages[:, None].expand(batch, length) if advantages.dim() == 1 else advantages
            logp, entropy, grads = fused_token_chunks(
                hidden,
                weight,
                bias,
                torch.where(mask.bool(), labels, 0).reshape(-1).long(),
                None if old_logprobs is None else old_logprobs.float().reshape(-1),
                adv.float().reshape(-1),
                None if ref_logprobs is None else ref_logprobs.float().reshape(-1),
                loss_token_weights(mask, settings).reshape(-1).contiguous(),
                settings,
                compute_entropy,
                rows,
                needs,
            )
            loss, stats = policy_objective(
                logp.reshape(batch, length),
                old_logprobs,
                advantages,
                mask,
                settings,
                ref_logprobs,
                None if entropy is None else entropy.reshape(batch, length),
            )
        else:
            flat_labels = torch.where(mask.bool(), labels, -100).reshape(-1)
            logp, lse, entropy = scan_logprobs(
                hidden, weight, bias, flat_labels, settings.temperature, -100, compute_entropy, impl, rows
            )
            with torch.enable_grad():
                logp_leaf = logp.reshape(batch, length).requires_grad_()
                loss, stats = policy_objective(
                    logp_leaf,
                    old_logprobs,
                    advantages,
                    mask,
                    settings,
                    ref_logprobs,
                    None if entropy is None else entropy.reshape(batch, length),
                )
                (grad_logp,) = torch.autograd.grad(loss, logp_leaf)
            grads = backprop_chunks(
                hidden,
                weight,
                bias,
                flat_labels,
                lse,
                grad_logp.reshape(-1),
                settings.temperature,
                -100,
                impl,
                rows,
                needs=needs,
            )
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.present = tuple(g is not None for g in grads)
        stats_out.append(stats)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if present else None for present in ctx.present]
        # labels, old_logprobs, advantages, mask, ref_logprobs, config: not differentiable
        return (*grads, None, None, None, None, None, None)


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    temperature: float = 1.0,
    delta: float | None = None,
    compute_entropy: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``fused_policy_loss`` from ``hidden [B, T, H]`` and ``weight [V, H]`` (+ ``bias [V]``).

    Gradients flow to hidden, weight and bias (a tied embedding accumulates into the shared
    parameter). ``old_logprobs=None``: on-policy (ratio exactly 1), which saves the caller a
    separate scoring pass. Peak extra memory is one chunk of ``chunk_bytes``, independent of B * T.

    Example:
        >>> loss, stats = linear_ppo_loss(h, model.lm_head.weight, ids, old, adv, mask, loss_type="dapo")
    """
    settings = PolicyLossSettings(
        clip_low=clip_low,
        clip_high=clip_high,
        delta=delta,
        beta=beta,
        kl_estimator=kl_estimator,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        temperature=temperature,
    )
    _check_linear(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    check_policy_inputs(
        tuple(hidden.shape[:2]),
        labels,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        beta,
        f"hidden is {tuple(hidden.shape)}",
    )
    check_labels(torch.where(mask.bool(), labels, -100), weight.shape[0], -100)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    impl = launchers(backend, hidden)
    # Triton + token-level ratios: the fused kernel gives log-probs and dlogits in one launch per chunk.
    token_level = settings.importance_sampling_level == "token"
    single_pass = token_level and resolve_backend(backend, hidden) == "triton"
    rows = rows_per_chunk(hidden_2d.shape[0], weight.shape[0], hidden.dtype, chunk_bytes)
    stats_out: list[PolicyLossStats] = []
    loss = _LinearPolicyLoss.apply(
        hidden_2d,
        weight,
        bias,
        labels,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        (settings, compute_entropy, impl, single_pass, rows, stats_out),
    )
    return loss, stats_out[0]
