"""token_logprobs (and the fused policy-loss kernel) against float64, on both backends.

Triton runs through its interpreter on CPU. Three-way comparisons: the implementation under test
(in the test dtype), a textbook eager implementation in fp32 (``log_softmax`` + ``gather``,
autograd, gradient cast to the test dtype like the kernel's) and a float64 ground truth. The error
against float64 must stay within ``FACTOR`` times the eager fp32 error plus a floor, both relative
to the largest magnitude of the float64 result. The floor covers fp32 summation-order noise only;
bf16/fp16 gradient rounding (2^-9 / 2^-12 relative) is charged to the eager error, which has it too.
Triton's interpreter truncates fp32 -> bf16 where compiled kernels round to nearest, so interpreted
bf16 gradients may be off by a whole ulp: ``FACTOR_INTERPRETED_BF16`` for them. An absolute ceiling
per dtype is asserted as well, so a broken eager reference cannot widen the gate:

| dtype | values (logp, entropy) | gradients |
|-------|------------------------|-----------|
| fp32  | 2e-5                   | 2e-5      |
| bf16  | 2e-5 (fp32 math)       | 1e-2      |
| fp16  | 2e-5 (fp32 math)       | 2e-3      |
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from fastppo.kernels import fused_policy_loss, token_logprobs
from fastppo.kernels.ppo_loss import PolicyLossSettings, policy_objective
from fastppo.kernels.token_logprobs import kernel_rows, launchers

BACKENDS = ["torch", "triton"]
FACTOR = 2.0
FACTOR_INTERPRETED_BF16 = 3.0
FLOOR = 1e-6  # relative: fp32 rounding of sums over up to 32k terms in another order
CEILING = {
    "values": {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5},
    "grad": {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3},
}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

CASES = [  # (rows, vocab, dtype, temperature): vocab never a multiple of the tile
    (37, 1000, torch.float32, 0.7),
    (5, 32003, torch.bfloat16, 1.0),
    (13, 1000, torch.bfloat16, 0.7),
    (6, 32003, torch.float32, 0.7),
    (9, 777, torch.float32, 1.0),
    (11, 1000, torch.float16, 0.7),
]


def case_id(case) -> str:
    n, v, dtype, t = case
    return f"N{n}-V{v}-{SHORT[dtype]}-T{t}"


def textbook(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int = -100):
    """log_softmax + gather and entropy in ``logits``' dtype: the eager peer, and in fp64 the truth."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    keep = labels != ignore_index
    logp = logp_all.gather(-1, torch.where(keep, labels, 0)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


def references(logits, labels, temperature, g_logp, g_ent, rows: int = 512):
    """(eager fp32, float64 truth), each (logp, entropy, grad); grads for upstream g_logp / g_ent.

    Row chunks keep the autograd temporaries small at GPU sizes. The eager gradient is cast to the
    logits' dtype, as the kernels store it.
    """
    out = {}
    for dtype in (torch.float32, torch.float64):
        parts = []
        for start in range(0, logits.shape[0], rows):
            sl = slice(start, start + rows)
            x = logits[sl].to(dtype).requires_grad_()
            logp, entropy = textbook(x, labels[sl], temperature)
            torch.autograd.backward((logp, entropy), (g_logp[sl].to(dtype), g_ent[sl].to(dtype)))
            grad = x.grad if dtype == torch.float64 else x.grad.to(logits.dtype)
            parts.append((logp.detach(), entropy.detach(), grad))
        out[dtype] = tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return out[torch.float32], out[torch.float64]


def max_err(actual: torch.Tensor, expected: torch.Tensor, rows: int = 512) -> float:
    return max(
        (actual[i : i + rows].double() - expected[i : i + rows].double()).abs().max().item()
        for i in range(0, actual.shape[0], rows)
    )


def assert_three_way(actual, eager, truth, dtype, kind: str, name: str, lse_rounding: float = 0.0) -> None:
    """``lse_rounding``: relative error allowed on top, for results formed from a stored fp32 lse."""
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    truncated = dtype == torch.bfloat16 and not actual.is_cuda and os.environ.get("TRITON_INTERPRET") == "1"
    factor = FACTOR_INTERPRETED_BF16 if truncated else FACTOR
    scale = truth.abs().max().item()
    err, eager_err = max_err(actual, truth), max_err(eager, truth)
    bound = factor * eager_err + (FLOOR + lse_rounding) * scale
    assert err <= bound, f"{name}: error {err:.3g} > {factor} x eager fp32 {eager_err:.3g} + floor"
    ceiling = (CEILING[kind][dtype] + lse_rounding) * scale
    assert err <= ceiling, f"{name}: relative error {err / scale:.3g}"


def random_case(n: int, v: int, dtype: torch.dtype, device: str = "cpu"):
    logits = (torch.randn(n, v, device=device) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    labels[1::4] = -100  # ignored positions scattered through the batch
    return logits, labels


def check_against_float64(logits, labels, temperature, backend, name: str, lse_rounding: float = 0.0) -> None:
    """Values, entropy and the gradient for random upstream gradients of both outputs.

    ``lse_rounding`` is allowed on the gradient (both backends) and on the reference's logp and
    entropy: they are formed from an fp32 lse; the Triton forward keeps max and log-sum apart.
    """
    n, dtype = labels.shape[0], logits.dtype
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
    g_logp, g_ent = torch.randn(n, device=x.device), torch.randn(n, device=x.device)
    torch.autograd.backward((logp, entropy), (g_logp, g_ent))
    eager, truth = references(logits, labels, temperature, g_logp, g_ent)
    assert logp.dtype == entropy.dtype == torch.float32 and x.grad.dtype == dtype
    value_rounding = lse_rounding if backend == "torch" else 0.0
    assert_three_way(logp, eager[0], truth[0], dtype, "values", f"{name} logp", value_rounding)
    assert_three_way(entropy, eager[1], truth[1], dtype, "values", f"{name} entropy", value_rounding)
    assert_three_way(x.grad, eager[2], truth[2], dtype, "grad", f"{name} grad", lse_rounding)
    ignored = labels == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (x.grad[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_values_and_gradients_match_float64(backend, case):
    n, v, dtype, temperature = case
    logits, labels = random_case(n, v, dtype)
    check_against_float64(logits, labels, temperature, backend, case_id(case))


def large_magnitude_case(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with 1e4 logits: a five-way tie at the top, one survivor among -1e4, every third -1e4,
    a flat top spanning two tiles of 256, and plain rows."""
    logits = torch.randn(6, 300, device=device)
    logits[0, :5] = 1e4
    logits[1] = -1e4
    logits[1, 7] = 1e4
    logits[2, ::3] = -1e4
    logits[3, 200:] = 1e4
    return logits, torch.tensor([0, 7, 1, 250, 5, 299], device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_large_magnitude_logits_do_not_overflow(backend, temperature):
    logits, labels = large_magnitude_case()
    # Eager log_softmax subtracts the max first and never rounds lse ~ 1e4 / T to fp32; a stored fp32
    # lse is off by up to half an ulp, 2^-24 |lse| (~6e-4 here), and so is anything formed from it.
    lse_rounding = 2**-24 * 1e4 / temperature
    check_against_float64(logits, labels, temperature, backend, f"1e4-T{temperature}", lse_rounding)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_3d_and_4d_inputs(backend):
    full = torch.randn(3, 8, 1001)
    logits = full[:, :-1]  # [3, 7, V]: rows not uniformly strided, as when dropping the last position
    labels = torch.randint(0, 1001, (3, 7))
    labels[0, 2] = -100
    x = logits.clone().requires_grad_()
    x_slice = x[:, 1:]  # strided again: the kernels read it through two leading strides
    out = token_logprobs(x_slice, labels[:, 1:], temperature=0.7, backend=backend)
    g = torch.randn(3, 6)
    out.backward(g)
    rows, row_labels = logits[:, 1:].reshape(-1, 1001), labels[:, 1:].reshape(-1)
    eager, truth = references(rows, row_labels, 0.7, g.reshape(-1), torch.zeros(18))
    assert out.shape == (3, 6)
    assert_three_way(out.reshape(-1), eager[0], truth[0], torch.float32, "values", "3-D logp")
    assert (x.grad[:, 0] == 0).all()
    assert_three_way(x.grad[:, 1:].reshape(-1, 1001), eager[2], truth[2], torch.float32, "grad", "3-D grad")
    four_d = torch.randn(2, 3, 4, 515)[:, :, :3]  # [2, 3, 3, V]: (2, 3) merge, 3 stays strided
    labels4 = torch.randint(0, 515, (2, 3, 3))
    got = token_logprobs(four_d, labels4, backend=backend)
    expected, _ = textbook(four_d.double(), labels4, 1.0)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=0)


def test_kernel_rows_views_strided_logits_instead_of_copying():
    full = torch.randn(3, 8, 100)
    view = kernel_rows(full[:, :-1])
    assert view.shape == (3, 7, 100) and view.data_ptr() == full.data_ptr()
    assert kernel_rows(full).shape == (24, 100)  # contiguous leading dims collapse to [N, V]
    four_d = torch.randn(2, 3, 4, 100)[:, :, :3]
    assert kernel_rows(four_d).shape == (6, 3, 100) and kernel_rows(four_d).data_ptr() == four_d.data_ptr()
    three_strides = torch.randn(2, 3, 4, 100)[:, :2, :3]
    assert kernel_rows(three_strides).is_contiguous() and kernel_rows(three_strides).shape == (12, 100)
    transposed = torch.randn(100, 5).t()  # strided vocabulary dim: copied contiguous
    assert kernel_rows(transposed).stride() == (100, 1)
    assert kernel_rows(torch.randn(1, 1, 100)).shape == (1, 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits_give_nan_not_zero(backend):
    logits = torch.randn(5, 50)
    logits[1, 13] = float("nan")
    logits[2, 0] = float("inf")
    logits[4, 9] = float("nan")  # ignored row: 0 by definition, whatever its logits hold
    labels = torch.tensor([3, 4, 5, 6, -100])
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, labels, return_entropy=True, backend=backend)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1])
    assert torch.isnan(logp[2]) and torch.isnan(entropy[2])
    assert torch.isfinite(logp[[0, 3]]).all() and logp[4] == 0 and entropy[4] == 0
    logp[:4].sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isnan(x.grad[2]).all()
    assert torch.isfinite(x.grad[[0, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_in_place_equals_out_of_place(backend):
    impl = launchers(backend, torch.empty(0))
    logits = torch.randn(7, 515).to(torch.bfloat16)
    labels = torch.randint(0, 515, (7,))
    labels[3] = -100
    logp, lse, entropy = impl.token_logprobs_fwd(logits, labels, 0.7, -100, True)
    g, g_ent = torch.randn(7), torch.randn(7)
    expected = impl.token_logprobs_bwd(logits, labels, lse, g, 0.7, -100, entropy=entropy, grad_entropy=g_ent)
    in_place = logits.clone()
    returned = impl.token_logprobs_bwd(
        in_place, labels, lse, g, 0.7, -100, entropy=entropy, grad_entropy=g_ent, out=in_place
    )
    assert returned.data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, expected)
    assert (in_place[3] == 0).all()


def test_triton_backward_in_place_into_a_strided_slice():
    impl = launchers("triton", torch.empty(0))
    full = torch.randn(2, 6, 300)
    rows = full[:, 1:]  # [2, 5, V] view
    labels = torch.randint(0, 300, (10,))
    logp, lse, _ = impl.token_logprobs_fwd(rows, labels, 1.0, -100, False)
    expected_logp, _ = textbook(rows.reshape(-1, 300).double(), labels, 1.0)
    assert torch.allclose(logp.double(), expected_logp, atol=1e-5, rtol=0)
    g = torch.randn(10)
    expected = impl.token_logprobs_bwd(rows.contiguous(), labels, lse, g, 1.0, -100)
    untouched = full[:, 0].clone()
    impl.token_logprobs_bwd(rows, labels, lse, g, 1.0, -100, out=rows)
    assert torch.equal(full[:, 1:], expected) and torch.equal(full[:, 0], untouched)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=torch.tensor([0, 10])), "label 10 is outside the vocabulary"),
        (dict(labels=torch.tensor([0, -5])), "label -5 is outside the vocabulary"),
        (dict(labels=torch.tensor([0, 1, 2])), "labels has shape"),
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1.0), "temperature must be a finite number > 0, got -1.0"),
        (dict(temperature=float("nan")), "temperature must be"),
        (dict(logits=torch.ones(2, 10, dtype=torch.long)), "logits must be a floating tensor"),
        (dict(labels=torch.tensor([0.0, 1.0])), "labels must be int64"),
        (dict(logits=torch.ones(2, 0)), "non-empty vocabulary"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_value(backend, kwargs, message):
    args = dict(logits=torch.randn(2, 10), labels=torch.tensor([0, 1]), temperature=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        token_logprobs(args.pop("logits"), args.pop("labels"), backend=backend, **args)


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


# --- The fused policy-loss kernel: its in-kernel dLoss/dlogp against autograd of policy_objective.
# (The loss matrix against TRL's formula is tests/kernels/test_ppo_loss.py; TRL has no KL clamp, so the
# clamped KL gradient, ties at the clip bounds and single-tile vs streamed rows are pinned here.)

LOSS_CASES = {
    "on-policy-ties": dict(old=None, settings=PolicyLossSettings(clip_high=0.28)),
    "delta-cap-k3-clamped": dict(
        old=0.5, settings=PolicyLossSettings(delta=1.3, beta=0.1, kl_estimator="k3", loss_type="bnpo")
    ),
    "k2-dapo-T0.7": dict(
        old=0.3, settings=PolicyLossSettings(beta=0.2, kl_estimator="k2", loss_type="dapo", temperature=0.7)
    ),
    "sequence-level": dict(
        old=0.3, settings=PolicyLossSettings(importance_sampling_level="sequence", beta=0.05)
    ),
    # the kernel's other LOSS branches, the ratio-weighted KL and the entropy bonus's gradient
    "cispo-kl-ratio": dict(
        old=0.5,
        settings=PolicyLossSettings(loss_type="cispo", clip_high=1.2, beta=0.1, kl_bias_correction=True),
    ),
    "sapo-entropy-T0.7": dict(
        old=0.5, settings=PolicyLossSettings(loss_type="sapo", entropy_coef=0.05, temperature=0.7)
    ),
    "luspo-delta-k1-ratio": dict(
        old=0.5,
        settings=PolicyLossSettings(
            loss_type="luspo", delta=1.3, beta=0.1, kl_estimator="k1", kl_bias_correction=True
        ),
    ),
    "on-policy-entropy-k2-ratio": dict(
        old=None,
        settings=PolicyLossSettings(
            loss_type="dapo", entropy_coef=-0.03, beta=0.1, kl_estimator="k2", kl_bias_correction=True
        ),
    ),
}


def loss_inputs(batch: int, length: int, vocab: int, old_spread: float | None, device: str = "cpu"):
    logits = torch.randn(batch, length, vocab, device=device) * 2
    labels = torch.randint(0, vocab, (batch, length), device=device)
    mask = (torch.rand(batch, length, device=device) > 0.25).float()
    mask[-1] = 0  # a sequence with no completion tokens
    mask[0, :2] = 1  # the tokens whose reference log-prob is pushed past the KL clamp below
    with torch.no_grad():
        logp = textbook(logits.double(), labels, 1.0)[0]
    old = None if old_spread is None else (logp + old_spread * torch.randn_like(logp)).float()
    ref = (logp + 0.3 * torch.randn_like(logp)).float()
    ref[0, :2] = logp[0, :2] + 30.0  # log-ratio beyond the +-20 KL clamp: that term has zero gradient
    advantages = torch.randn(batch, device=device)
    return logits, labels, old, advantages, mask, ref


def loss_kwargs(settings: PolicyLossSettings) -> dict:
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}


def float64_policy_grad(logits, labels, old, advantages, mask, ref, settings, upstream):
    """Loss and dLoss/dlogits by autograd of policy_objective on float64 log-probs."""
    x = logits.double().requires_grad_()
    logp, entropy = textbook(x, torch.where(mask.bool(), labels, -100), settings.temperature)
    loss, stats = policy_objective(
        logp,
        None if old is None else old.double(),
        advantages.double(),
        mask,
        settings,
        ref.double() if settings.beta else None,
        entropy if settings.needs_entropy else None,
    )
    (loss * upstream).backward()
    return loss.detach(), stats, x.grad


@pytest.mark.parametrize("single_tile", [True, False], ids=["single-tile", "streamed"])
@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_policy_kernel_gradient_matches_autograd_of_the_objective(name, single_tile, monkeypatch):
    from fastppo.kernels.token_logprobs import triton as token_kernels

    monkeypatch.setattr(token_kernels, "MAX_BLOCK_V", 256)  # V = 1000 streams 4 tiles ...
    monkeypatch.setattr(token_kernels, "SINGLE_TILE_MAX_V", 1024 if single_tile else 0)  # ... or one
    case = LOSS_CASES[name]
    settings = case["settings"]
    logits, labels, old, advantages, mask, ref = loss_inputs(3, 5, 1000, case["old"])
    x = logits.clone().requires_grad_()
    loss, stats = fused_policy_loss(
        x, labels, old, advantages, mask, ref_logprobs=ref, backend="triton", **loss_kwargs(settings)
    )
    upstream = torch.tensor(-0.37)
    (loss * upstream).backward()
    loss64, stats64, grad64 = float64_policy_grad(
        logits, labels, old, advantages, mask, ref, settings, upstream
    )
    assert abs(loss.item() - loss64.item()) <= 1e-6 * max(1.0, abs(loss64.item()))
    assert torch.allclose(stats.logprobs.double(), stats64.logprobs.double(), atol=1e-5, rtol=0)
    assert max_err(x.grad, grad64) <= 1e-5 * grad64.abs().max().item()
    assert (x.grad[-1] == 0).all() and (x.grad[mask == 0] == 0).all()


def test_policy_kernel_overwrites_a_strided_slice_in_place_and_skips_work_without_grad():
    settings = PolicyLossSettings(beta=0.1)
    logits, labels, old, advantages, mask, ref = loss_inputs(2, 6, 700, 0.3)
    full = torch.cat([logits, torch.randn(2, 1, 700)], dim=1)  # [B, T + 1, V], as a model returns
    kwargs = dict(ref_logprobs=ref, backend="triton", **loss_kwargs(settings))
    with torch.no_grad():
        loss_nograd, _ = fused_policy_loss(
            full[:, :-1], labels, old, advantages, mask, overwrite_logits=True, **kwargs
        )
    assert torch.equal(full[:, :-1], logits)  # nothing to differentiate: nothing written
    upstream = torch.tensor(2.5)
    loss64, _, grad64 = float64_policy_grad(logits, labels, old, advantages, mask, ref, settings, upstream)
    leaf = full.clone().requires_grad_()
    sliced = leaf[:, :-1]
    loss, _ = fused_policy_loss(sliced, labels, old, advantages, mask, overwrite_logits=True, **kwargs)
    (loss * upstream).backward()
    for value in (loss, loss_nograd):  # the k3 term at the +-20 clamp makes the loss ~1e7
        assert abs(value.item() - loss64.item()) <= 1e-6 * abs(loss64.item())
    assert max_err(leaf.grad[:, :-1], grad64) <= 1e-5 * grad64.abs().max().item()
    assert (leaf.grad[:, -1] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 151936])
def test_cuda_kernels_match_float64_at_benchmark_size(vocab):
    """Compiled kernels (not the interpreter) at benchmark sizes: bf16, N = 4096, T = 0.7."""
    torch.manual_seed(0)
    logits, labels = random_case(4096, vocab, torch.bfloat16, device="cuda")
    check_against_float64(logits, labels, 0.7, "auto", f"cuda-N4096-V{vocab}-bf16-T0.7")
    settings = PolicyLossSettings(beta=0.04, clip_high=0.28, temperature=0.7)
    logits, labels, old, advantages, mask, ref = loss_inputs(8, 512, vocab, 0.3, device="cuda")
    x = logits.to(torch.bfloat16).requires_grad_()
    loss, _ = fused_policy_loss(x, labels, old, advantages, mask, ref_logprobs=ref, **loss_kwargs(settings))
    loss.backward()
    loss64, _, grad64 = float64_policy_grad(x.detach(), labels, old, advantages, mask, ref, settings, 1.0)
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    assert max_err(x.grad, grad64) <= 1e-2 * grad64.abs().max().item()  # bf16 gradient rounding


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_cuda_large_magnitude_logits_keep_their_accuracy(temperature):
    """The interpreter's case on compiled kernels: there the compiler may contract a multiply and
    an add into one FMA, which can bring back the rounding that subtracting the max first avoids.
    Same gate as on CPU (values exact to fp32 noise; lse rounding allowed on the gradient only)."""
    logits, labels = large_magnitude_case("cuda")
    check_against_float64(
        logits, labels, temperature, "auto", f"cuda-1e4-T{temperature}", 2**-24 * 1e4 / temperature
    )
    settings = PolicyLossSettings(beta=0.04, temperature=temperature)
    inputs = loss_inputs(6, 1, 300, 0.3, device="cuda")
    mask = torch.ones(6, 1, device="cuda")
    x = logits[:, None].clone().requires_grad_()
    loss, _ = fused_policy_loss(
        x, labels[:, None], inputs[2], inputs[3], mask, ref_logprobs=inputs[5], **loss_kwargs(settings)
    )
    loss.backward()
    loss64, _, grad64 = float64_policy_grad(
        x.detach(), labels[:, None], inputs[2], inputs[3], mask, inputs[5], settings, 1.0
    )
    assert torch.isfinite(x.grad).all()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item()))
    assert max_err(x.grad, grad64) <= (1e-5 + 2**-24 * 1e4 / temperature) * grad64.abs().max().item()


@pytest.mark.gpu
def test_cuda_offsets_past_int32_and_strided_in_place():
    """16384 x 151936 bf16 logits hold 2.5e9 elements: rows past 2^31 need int64 offsets. A strided
    slice, overwritten in place, must give bit for bit what a contiguous copy gives."""
    vocab = 151936
    impl = launchers("auto", torch.empty(0, device="cuda"))
    logits = torch.randn(16384, vocab, device="cuda").to(torch.bfloat16)
    labels = torch.randint(0, vocab, (16384,), device="cuda")
    logp, lse, _ = impl.token_logprobs_fwd(logits, labels, 1.0, -100, False)
    tail = slice(-64, None)
    tail_logits, tail_labels = logits[tail].clone(), labels[tail]
    g = torch.randn(16384, device="cuda")
    impl.token_logprobs_bwd(logits, labels, lse, g, 1.0, -100, out=logits)
    eager, truth = references(tail_logits, tail_labels, 1.0, g[tail], torch.zeros(64, device="cuda"))
    assert_three_way(logp[tail], eager[0], truth[0], torch.bfloat16, "values", "tail logp")
    assert_three_way(logits[tail], eager[2], truth[2], torch.bfloat16, "grad", "tail grad")
    del logits
    settings = PolicyLossSettings(beta=0.04, temperature=0.7)
    inputs = loss_inputs(4, 257, vocab, 0.3, device="cuda")
    full = torch.cat([inputs[0], inputs[0][:, :1]], dim=1).to(torch.bfloat16)  # [4, 258, V]
    kwargs = dict(ref_logprobs=inputs[5], **loss_kwargs(settings))
    copy = full[:, :-1].contiguous().requires_grad_()
    loss, _ = fused_policy_loss(copy, *inputs[1:5], **kwargs)
    loss.backward()
    leaf = full.requires_grad_()
    loss_strided, _ = fused_policy_loss(leaf[:, :-1], *inputs[1:5], overwrite_logits=True, **kwargs)
    loss_strided.backward()
    assert torch.equal(loss, loss_strided) and torch.equal(leaf.grad[:, :-1], copy.grad)
