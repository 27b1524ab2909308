"""PPO's clipped value loss against an independent float64 loop written here."""

from __future__ import annotations

import pytest
import torch

from fastppo.critic import clipped_value_loss

F64 = torch.float64


def test_clipped_value_loss_matches_loop_and_gradient():
    b, t, eps = 4, 5, 0.2
    values = torch.randn(b, t, dtype=F64, requires_grad=True)
    old = values.detach() + torch.randn(b, t, dtype=F64) * 0.3
    returns = torch.randn(b, t, dtype=F64)
    mask = torch.rand(b, t) > 0.25
    out = clipped_value_loss(values, old, returns, mask, eps)
    out.loss.backward()
    total, clipped_count, n = 0.0, 0, int(mask.sum())
    grad = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            v, o, r = values[i, j].item(), old[i, j].item(), returns[i, j].item()
            vc = min(max(v, o - eps), o + eps)
            e1, e2 = (v - r) ** 2, (vc - r) ** 2
            total += max(e1, e2)
            clipped_count += e2 > e1
            if e2 > e1:  # gradient flows through the clipped branch only inside the clip range
                grad[i, j] = (vc - r) / n if o - eps < v < o + eps else 0.0
            else:
                grad[i, j] = (v - r) / n
    assert out.loss.item() == pytest.approx(0.5 * total / n, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(clipped_count / n, abs=1e-12)
    torch.testing.assert_close(values.grad, grad, rtol=1e-10, atol=1e-12)


def test_clipped_value_loss_rejects_bad_inputs():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cliprange_value"):
        clipped_value_loss(z, z, z, z, -0.1)
    with pytest.raises(ValueError, match="shape"):
        clipped_value_loss(z, z, torch.zeros(2, 4), z, 0.2)
