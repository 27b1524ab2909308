"""What only the backends' own mechanics decide: overwrite_logits, old_logprobs=None (on-policy),
and (GPU only) the linear loss at a real vocabulary. The loss matrix on both backends against TRL's
formula in float64 is in tests/kernels/test_ppo_loss.py and test_linear_ppo_loss.py.
"""

from __future__ import annotations

import pytest
import torch
from fastppo.kernels import fused_policy_loss, linear_ppo_loss


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_overwrite_logits_refuses_rows_that_share_memory(backend):
    """An expanded [B, T, V] view has one row in memory for T of them: writing gradients in place
    would race. Refused on both backends (the bad input is the same), naming the strides."""
    row = torch.randn(1, 1, 129)
    logits = row.expand(2, 5, 129)
    args = (
        torch.randint(0, 129, (2, 5)),
        torch.full((2, 5), -4.8),
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 5),
    )
    with pytest.raises(ValueError, match=r"share memory .*strides \(0, 0, 1\)"):
        fused_policy_loss(logits, *args, overwrite_logits=True, backend=backend)
    fused_policy_loss(logits, *args, backend=backend)  # read-only use of the same view is fine


def test_overwriting_logits_a_graph_saved_fails_at_backward_instead_of_using_gradients():
    """exp saves its output for its backward; the Triton path overwrites that output with dlogits.
    The write bumps the autograd version, so backward refuses instead of multiplying by gradients."""
    x = torch.randn(2, 5, 129, requires_grad=True)
    logits = x.exp()  # ExpBackward keeps `logits`
    args = (
        torch.randint(0, 129, (2, 5)),
        torch.full((2, 5), -4.8),
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 5),
    )
    loss, _ = fused_policy_loss(logits, *args, overwrite_logits=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x.grad = None
    loss, _ = fused_policy_loss(x.exp(), *args, backend="triton")  # without overwrite: a fresh buffer
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
