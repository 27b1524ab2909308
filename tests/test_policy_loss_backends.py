"""The Triton policy losses (logits in, hidden states in) against the float64 reference path.

Covers every loss_type x importance level x KL estimator, beta 0 / > 0, delta, T = 0.7 and a fully
masked sequence, with clip_high != clip_low and advantages of both signs. The in-kernel derivative
is an independent transcription of the loss's calculus, so this checks it against autograd of
``policy_objective``. Tolerance: 1e-5 relative to the largest gradient (fp32 inputs, fp32 math),
1e-6 absolute on the loss.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from fastppo.kernels import fused_policy_loss, linear_ppo_loss

GRAD_TOL = 1e-5
LOSS_TOL = 1e-6
MATRIX = list(
    itertools.product(
        ["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"], ["k1", "k2", "k3"], [0.0, 0.1]
    )
)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def near_policy_logprobs(logp_true: torch.Tensor, spread: float) -> torch.Tensor:
    """Old / reference log-probs near the current ones, so ratios land on both sides of the clip range."""
    return (logp_true + spread * torch.randn_like(logp_true)).float()


@pytest.mark.parametrize("loss_type, level, estimator, beta", MATRIX, ids=lambda v: str(v))
def test_logits_loss_matches_float64_reference(loss_type, level, estimator, beta):
    batch, length, vocab, temperature = 3, 6, 300, 0.7
    logits = torch.randn(batch, length, vocab) * 2
    labels = torch.randint(0, vocab, (batch, length))
    mask = (torch.rand(batch, length) > 0.3).float()
    mask[2] = 0  # a sequence with no completion tokens: no NaN, zero gradient
    with torch.no_grad():
        logp_true = torch.log_softmax(logits.double() / temperature, -1).gather(-1, labels[..., None])[..., 0]
    old = near_policy_logprobs(logp_true, 0.3)
    ref = near_policy_logprobs(logp_true, 0.2)
    advantages = torch.tensor([1.3, -0.7, 0.4])
    settings = dict(
        beta=beta,
        loss_type=loss_type,
        importance_sampling_level=level,
        kl_estimator=estimator,
        delta=1.5 if estimator == "k2" else None,
        temperature=temperature,
        clip_high=0.28,
        compute_entropy=True,
    )
    x = logits.clone().requires_grad_()
    loss, stats = fused_policy_loss(
        x, labels, old, advantages, mask, ref_logprobs=ref if beta else None, backend="triton", **settings
    )
    x64 = logits.double().requires_grad_()
    loss64, stats64 = fused_policy_loss(
        x64,
        labels,
        old.double(),
        advantages.double(),
        mask,
        ref_logprobs=ref.double() if beta else None,
        backend="torch",
        **settings,
    )
    upstream = torch.randn(())
    (loss * upstream).backward()
    (loss64 * upstream.double()).backward()
    assert abs(loss.item() - loss64.item()) < LOSS_TOL
    assert rel_err(x.grad, x64.grad) < GRAD_TOL
    assert (x.grad[2] == 0).all()
    for name in ("clip_low", "clip_high", "clip_region", "ratio_mean", "entropy_mean"):
        assert abs(getattr(stats, name).item() - getattr(stats64, name).item()) < 1e-5, name


@pytest.mark.parametrize(
    "loss_type, level, beta",
    [("grpo", "token", 0.1), ("dapo", "sequence", 0.0), ("bnpo", "token", 0.0), ("dr_grpo", "sequence", 0.1)],
)
def test_overwrite_logits_gives_the_same_gradient(loss_type, level, beta):
    logits = torch.randn(2, 5, 129)
    labels = torch.randint(0, 129, (2, 5))
    mask = torch.ones(2, 5)
    old = torch.full((2, 5), -4.8)
    ref = torch.full((2, 5), -4.9)
    kwargs = dict(
        ref_logprobs=ref, beta=beta, loss_type=loss_type, importance_sampling_level=level, backend="triton"
    )
    x = logits.clone().requires_grad_()
    fused_policy_loss(x, labels, old, torch.tensor([1.0, -1.0]), mask, **kwargs)[0].backward()
    buffer = logits.clone().requires_grad_()
    loss, _ = fused_policy_loss(
        buffer, labels, old, torch.tensor([1.0, -1.0]), mask, overwrite_logits=True, **kwargs
    )
    loss.backward()
    assert torch.equal(buffer.grad, x.grad)


@pytest.mark.parametrize(
    "loss_type, level, beta",
    [("grpo", "token", 0.1), ("dapo", "token", 0.0), ("bnpo", "sequence", 0.1), ("dr_grpo", "sequence", 0.0)],
)
def test_linear_loss_triton_matches_float64_reference(loss_type, level, beta):
    batch, length, hidden_size, vocab = 2, 5, 16, 257
    hidden = torch.randn(batch, length, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.5
    bias = torch.randn(vocab)
    labels = torch.randint(0, vocab, (batch, length))
    mask = (torch.rand(batch, length) > 0.3).float()
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T + bias.double()
        logp_true = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    old, ref = near_policy_logprobs(logp_true, 0.3), near_policy_logprobs(logp_true, 0.2)
    advantages = torch.randn(batch, length)
    results = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, stats = linear_ppo_loss(
            leaves[0],
            leaves[1],
            labels,
            old.to(dtype),
            advantages.to(dtype),
            mask,
            bias=leaves[2],
            ref_logprobs=ref.to(dtype) if beta else None,
            beta=beta,
            loss_type=loss_type,
            importance_sampling_level=level,
            temperature=0.7,
            compute_entropy=True,
            chunk_bytes=3000,
            backend=backend,
        )
        loss.backward()
        results.append((loss.item(), [leaf.grad for leaf in leaves], stats.entropy_mean.item()))
    (loss32, grads32, ent32), (loss64, grads64, ent64) = results
    assert abs(loss32 - loss64) < LOSS_TOL and abs(ent32 - ent64) < 1e-5
    for got, want in zip(grads32, grads64, strict=True):
        assert rel_err(got, want) < GRAD_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cuda_linear_loss_matches_float64(level):
    hidden = torch.randn(4, 256, 896, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(151936, 896, device="cuda") * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, 151936, (4, 256), device="cuda")
    mask = torch.ones(4, 256, device="cuda")
    old = torch.full((4, 256), -12.0, device="cuda")
    advantages = torch.randn(4, device="cuda")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, _ = linear_ppo_loss(h, w, labels, old, advantages, mask, importance_sampling_level=level)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64, _ = linear_ppo_loss(
        h64,
        w64,
        labels,
        old.double(),
        advantages.double(),
        mask,
        importance_sampling_level=level,
        backend="torch",
    )
    loss64.backward()
    assert abs(loss.item() - loss64.item()) < 1e-2 * max(1.0, abs(loss64.item()))
    assert rel_err(h.grad, h64.grad) < 3e-2  # bf16 operands and bf16 gradient storage
    assert rel_err(w.grad, w64.grad) < 3e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_old_logprobs_none_equals_recorded_current_logprobs(backend, level):
    """old_logprobs=None must act exactly like old = detached current log-probs (ratio 1)."""
    hidden = torch.randn(2, 4, 8)
    weight = torch.randn(97, 8)
    labels = torch.randint(0, 97, (2, 4))
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    advantages = torch.tensor([0.8, -1.1])
    with torch.no_grad():
        current = torch.log_softmax(hidden @ weight.T / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    results = []
    for old in (None, current):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = linear_ppo_loss(
            h,
            w,
            labels,
            old,
            advantages,
            mask,
            temperature=0.7,
            importance_sampling_level=level,
            backend=backend,
        )
        loss.backward()
        results.append((loss, stats.ratio_mean, h.grad, w.grad))
    for got, want in zip(*results, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert results[0][1].item() == 1.0
