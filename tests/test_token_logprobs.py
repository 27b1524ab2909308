"""token_logprobs against a float64 ground truth, on both backends (Triton runs interpreted on CPU).

Tolerances, relative to the largest magnitude of the compared tensor:
- log-probs / entropy: 2e-5 for fp32 and bf16 inputs (both are computed in fp32 from the given
  values, so bf16 inputs add no error of their own);
- gradients: 2e-5 for fp32, 1e-2 for bf16 (the gradient is stored in the logits' dtype: bf16
  rounding is 2^-8 relative).
"""

from __future__ import annotations

import pytest
import torch
from fastppo.kernels import token_logprobs
from fastppo.kernels.token_logprobs import launchers

BACKENDS = ["torch", "triton"]
VALUE_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}

CASES = [  # (rows, vocab, dtype, temperature)
    (37, 1000, torch.float32, 0.7),
    (5, 32003, torch.bfloat16, 1.0),
    (13, 1000, torch.bfloat16, 0.7),
    (9, 777, torch.float32, 1.0),
]


def case_id(case) -> str:
    n, v, dtype, t = case
    return (
        f"N{n}-V{v}-{str(dtype).split('.')[-1].replace('bfloat16', 'bf16').replace('float32', 'fp32')}-T{t}"
    )


def ground_truth(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int = -100):
    """Textbook float64 log_softmax + gather and entropy, differentiable."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    keep = labels != ignore_index
    logp = logp_all.gather(-1, torch.where(keep, labels, 0)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(actual).any(), "NaN in result"
    return (
        (actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-30)
    ).item()


def random_case(n: int, v: int, dtype: torch.dtype, lead: tuple[int, ...] | None = None):
    shape = lead or (n,)
    logits = (torch.randn(*shape, v) * 3).to(dtype)
    labels = torch.randint(0, v, shape)
    labels.view(-1)[1::4] = -100  # ignored positions scattered through the batch
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_values_and_gradients_match_float64(backend, case):
    n, v, dtype, temperature = case
    logits, labels = random_case(n, v, dtype)
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
    x64 = logits.double().requires_grad_()
    logp64, entropy64 = ground_truth(x64, labels, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert rel_err(logp, logp64) < VALUE_TOL
    assert rel_err(entropy, entropy64) < VALUE_TOL
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    torch.autograd.backward((logp, entropy), (g_logp, g_ent))
    torch.autograd.backward((logp64, entropy64), (g_logp.double(), g_ent.double()))
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, x64.grad) < GRAD_TOL[dtype]
    ignored = labels == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (x.grad[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_strided_input_without_entropy(backend):
    full = torch.randn(3, 8, 1001)
    logits = full[:, :-1]  # [3, 7, V]: rows not uniformly strided, as when dropping the last position
    labels = torch.randint(0, 1001, (3, 7))
    x = logits.clone().requires_grad_()
    out = token_logprobs(x[:, :], labels, temperature=0.7, backend=backend)
    x64 = logits.double().requires_grad_()
    expected, _ = ground_truth(x64, labels, 0.7)
    assert out.shape == (3, 7)
    assert rel_err(out, expected) < VALUE_TOL
    g = torch.randn(3, 7)
    out.backward(g)
    expected.backward(g.double())
    assert rel_err(x.grad, x64.grad) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_logits_do_not_overflow(backend):
    logits = torch.randn(6, 300)
    logits[0, :5] = 1e4
    logits[1] = -1e4
    logits[1, 7] = 1e4
    logits[2, ::3] = -1e4
    labels = torch.randint(0, 300, (6,))
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, labels, return_entropy=True, backend=backend)
    x64 = logits.double().requires_grad_()
    logp64, entropy64 = ground_truth(x64, labels, 1.0)
    # fp32 holds 1e4 to ~1e-3, and logp = z - lse cancels two such numbers: absolute 2e-3.
    assert torch.allclose(logp.double(), logp64, atol=2e-3, rtol=0)
    assert torch.allclose(entropy.double(), entropy64, atol=2e-3, rtol=0)
    g = torch.randn(6)
    logp.backward(g)
    logp64.backward(g.double())
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_give_nan_not_zero(backend):
    logits = torch.randn(4, 50)
    logits[1, 13] = float("nan")
    logits[2, 0] = float("inf")
    labels = torch.tensor([3, 4, 5, 6])
    logp, entropy = token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1])
    assert torch.isnan(logp[2])
    assert torch.isfinite(logp[[0, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_in_place_equals_out_of_place(backend):
    impl = launchers(backend, torch.empty(0))
    logits = torch.randn(7, 515).to(torch.bfloat16)
    labels = torch.randint(0, 515, (7,))
    logp, lse, entropy = impl.token_logprobs_fwd(logits, labels, 0.7, -100, True)
    g, g_ent = torch.randn(7), torch.randn(7)
    expected = impl.token_logprobs_bwd(logits, labels, lse, g, 0.7, -100, entropy=entropy, grad_entropy=g_ent)
    in_place = logits.clone()
    returned = impl.token_logprobs_bwd(
        in_place, labels, lse, g, 0.7, -100, entropy=entropy, grad_entropy=g_ent, out=in_place
    )
    assert returned.data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=torch.tensor([0, 10])), "label 10 is outside the vocabulary"),
        (dict(labels=torch.tensor([0, -5])), "label -5 is outside the vocabulary"),
        (dict(labels=torch.tensor([0, 1, 2])), "labels has shape"),
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=float("nan")), "temperature must be"),
        (dict(logits=torch.ones(2, 10, dtype=torch.long)), "logits must be a floating tensor"),
        (dict(labels=torch.tensor([0.0, 1.0])), "labels must be int64"),
    ],
)
def test_bad_input_names_the_value(kwargs, message):
    args = dict(logits=torch.randn(2, 10), labels=torch.tensor([0, 1]), temperature=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        token_logprobs(args.pop("logits"), args.pop("labels"), **args)


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        token_logprobs(torch.randn(2, 10), torch.tensor([0, 1]), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_with_trl_selective_log_softmax(backend):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = torch.randn(2, 5, 1003)
    labels = torch.randint(0, 1003, (2, 5))
    ours = token_logprobs(logits, labels, temperature=0.7, backend=backend)
    theirs = trl_utils.selective_log_softmax(logits, labels, temperature=0.7)
    assert torch.allclose(ours, theirs.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_cuda_kernel_matches_float64_at_benchmark_size(vocab):
    logits = (torch.randn(4096, vocab, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (4096,), device="cuda")
    labels[::7] = -100
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, labels, temperature=0.7, return_entropy=True)
    x64 = logits.double().requires_grad_()
    logp64, entropy64 = ground_truth(x64, labels, 0.7)
    assert rel_err(logp, logp64) < VALUE_TOL and rel_err(entropy, entropy64) < VALUE_TOL
    g, g_ent = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda")
    torch.autograd.backward((logp, entropy), (g, g_ent))
    torch.autograd.backward((logp64, entropy64), (g.double(), g_ent.double()))
    assert rel_err(x.grad, x64.grad) < GRAD_TOL[torch.bfloat16]
