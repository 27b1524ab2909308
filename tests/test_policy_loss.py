"""fused_policy_loss (logits in), both backends, against TRL's loss in float64 and against TRL's own
``GRPOTrainer._compute_loss``.

Ground truth: ``log_softmax(logits / T).gather`` then TRL GRPOTrainer's loss formula as plain math
(``fastppo.kernels.ppo_loss.trl_formula.trl_policy_loss``, written from TRL's code, not from
``policy_objective``), in float64 autograd on the very logits under test, so a wrong
``policy_objective`` or normaliser fails here. Stats are counted from the same float64 terms.

Tolerances. Loss, stats and fp32 gradients are three-way: the error against float64 must stay
within ``FACTOR`` x the error of the same formula run eagerly in fp32 plus a floor, and under a
ceiling, relative to max(1, |loss|) or to the largest float64 gradient. bf16 gradients are bounded
element by element in bf16 roundings (2^-8 relative each): the eager peer and the torch backend
round once; the Triton path twice (the gradient is stored in the forward, then rescaled by the
upstream gradient in backward); interpreted Triton truncates instead of rounding (up to 2^-7), so
three there.

| logits | loss, ratio/KL/entropy means | dlogits                         | clip fractions |
|--------|------------------------------|---------------------------------|----------------|
| fp32   | 1e-6 floor, 1e-5 ceiling     | 2 x eager + 1e-6, 2e-5 ceiling  | exact counts   |
| bf16   | 1e-6 floor, 1e-5 ceiling     | 1 / 2 / 3 roundings (see above) | exact counts   |

Hand-worked clipping, the KL clamp at +-100 log-ratios, overwrite_logits and the kernel's own tile
paths are in tests/test_policy_loss_cases.py, test_policy_loss_backends.py, test_token_logprobs.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
from collections import defaultdict

import pytest
import torch
from fastppo.kernels import fused_policy_loss
from fastppo.kernels.ppo_loss import PolicyLossSettings
from fastppo.kernels.ppo_loss.trl_formula import TrlLossTerms, trl_policy_loss
from fastppo.kernels.token_logprobs.reference import eager_token_logprobs

BACKENDS = ["torch", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FACTOR = 2.0
FLOOR = 1e-6  # relative: fp32 rounding of the same sums in another order
CEILING = {"loss": 1e-5, "fp32 grad": 2e-5}  # the loss is fp32 math for both dtypes
BF16_ROUNDING = 2.0**-8  # relative error of one round-to-nearest into bf16
BF16_ROUNDINGS = {"eager": 1, "torch": 1, "triton": 2, "triton-interpreted": 3}
STAT_TOL = 2e-5  # ratio / KL / entropy means (fp32 math)
BATCH, LENGTH, VOCAB = 4, 7, 1000  # V not a multiple of any tile; sequence 3 is fully masked


@dataclasses.dataclass(frozen=True)
class Case:
    settings: PolicyLossSettings
    advantages: str  # "B": one per sequence, "BT": one per token
    on_policy: bool = False  # old_logprobs=None
    streamed: bool = False  # Triton: rows streamed in tiles (two reads) instead of held on chip

    @property
    def id(self) -> str:
        s = self.settings
        kl = f"{s.kl_estimator}-beta{s.beta}" if s.beta else "beta0"
        parts = [s.loss_type, s.importance_sampling_level, kl, f"adv{self.advantages}", f"T{s.temperature}"]
        parts += ["delta"] * (s.delta is not None) + ["on-policy"] * self.on_policy
        return "-".join(parts + ["streamed"] * self.streamed)


def matrix() -> list[Case]:
    """Every loss_type x level x (beta 0, k1, k2, k3), clip_high != clip_low; the other options
    cycle with co-prime periods so each meets every loss type and level."""
    cases = []
    combos = itertools.product(
        ("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"), (None, "k1", "k2", "k3")
    )
    for i, (loss_type, level, estimator) in enumerate(combos):
        settings = PolicyLossSettings(
            clip_low=0.2,
            clip_high=0.28,
            delta=1.5 if i % 3 == 0 else None,
            beta=0.0 if estimator is None else 0.1,
            kl_estimator=estimator or "k3",
            loss_type=loss_type,
            importance_sampling_level=level,
            max_completion_length=10 if i % 2 else None,
            num_items_in_batch=17.0 if i % 2 else None,
            temperature=1.0 if i % 5 == 4 else 0.7,
        )
        cases.append(Case(settings, "BT" if i % 2 else "B", streamed=i % 7 in (1, 4)))
    on_policy = PolicyLossSettings(clip_high=0.28, beta=0.05, temperature=0.7)
    cases.append(Case(on_policy, "B", on_policy=True))
    cases.append(Case(dataclasses.replace(on_policy, importance_sampling_level="sequence"), "BT", True))
    return cases


def policy_inputs(logp_true: torch.Tensor, advantages: str) -> dict:
    """old / ref log-probs near the true ones and advantages of both signs, so that both clip sides
    are hit: sequence 0 has ratios above 1 + eps with A > 0, sequence 1 below 1 - eps with A < 0."""
    batch, length = logp_true.shape
    shift = torch.tensor([-0.45, 0.45, 0.0, 0.0], dtype=torch.float64)[:batch, None]
    old = (logp_true + shift + 0.3 * torch.randn_like(logp_true)).float()
    ref = (logp_true + 0.3 * torch.randn_like(logp_true)).float()
    if advantages == "B":
        adv = torch.tensor([1.3, -0.7, 0.4, 0.9])[:batch]
    else:
        adv = torch.randn(batch, length) + torch.tensor([1.0, -1.0, 0.0, 0.0])[:batch, None]
    return {"old": old, "ref": ref, "advantages": adv}


def make_case(dtype: torch.dtype, temperature: float, advantages: str) -> dict:
    logits = (torch.randn(BATCH, LENGTH, VOCAB) * 2).to(dtype)
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH))
    mask = (torch.rand(BATCH, LENGTH) > 0.25).float()
    mask[:3, :2] = 1  # every live sequence has tokens
    mask[3] = 0  # a sequence with no completion tokens: no NaN, zero gradient
    with torch.no_grad():
        logp_true = eager_token_logprobs(logits.double(), labels, temperature)
    return {"logits": logits, "labels": labels, "mask": mask, **policy_inputs(logp_true, advantages)}


def loss_kwargs(settings: PolicyLossSettings) -> dict:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


@dataclasses.dataclass
class Textbook:
    terms: TrlLossTerms
    logp: torch.Tensor  # [B, T]
    entropy: torch.Tensor  # [B, T]
    grad: torch.Tensor  # dlogits, in the logits' dtype (fp64 for the truth)


def textbook(t: dict, case: Case, compute: torch.dtype, upstream: torch.Tensor) -> Textbook:
    """TRL's loss in ``compute`` precision on the case's logits, with its autograd gradient."""
    settings = case.settings
    x = t["logits"].to(compute).requires_grad_()
    logp = eager_token_logprobs(x, t["labels"], settings.temperature)
    old = None if case.on_policy else t["old"].to(compute)
    ref = t["ref"].to(compute)
    terms = trl_policy_loss(logp, old, t["advantages"].to(compute), t["mask"], settings, ref)
    (terms.loss * upstream.to(compute)).backward()
    with torch.no_grad():
        logp_all = torch.log_softmax(x / settings.temperature, -1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    grad = x.grad if compute == torch.float64 else x.grad.to(t["logits"].dtype)
    return Textbook(terms, logp.detach(), entropy, grad)


def counted_stats(truth: Textbook, mask: torch.Tensor, settings: PolicyLossSettings) -> dict[str, float]:
    """TRL's logged metrics (grpo_trainer.py, ``global_masked_mean``): clip flags with one value per
    sequence (GSPO with [B] advantages) are averaged over sequences, [B, T] ones (a GSPO ratio
    broadcast against [B, T] advantages included) over unmasked tokens. TRL logs no ratio mean;
    ours divides by the same items as the clip fractions."""
    terms, m = truth.terms, mask.double()
    low = (terms.coef_1 < 1 - settings.clip_low) & (terms.advantages < 0)
    high = (terms.coef_1 > 1 + settings.upper_clip) & (terms.advantages > 0)
    per_sequence = low.shape[1] == 1

    def mean(x: torch.Tensor, per_sequence: bool = False) -> float:
        x = x.double()
        return x.mean().item() if per_sequence else ((x * m).sum() / m.sum()).item()

    return {
        "ratio_mean": mean(terms.coef_1, per_sequence),
        "clip_low": mean(low, per_sequence),
        "clip_high": mean(high, per_sequence),
        "clip_region": mean(low | high, per_sequence),
        "kl_mean": mean(terms.per_token_kl),
        "entropy_mean": mean(truth.entropy),
    }


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_three_way(name: str, actual, eager, truth, ceiling: float, scale: float) -> None:
    actual, eager, truth = (torch.as_tensor(v) for v in (actual, eager, truth))
    assert torch.isfinite(actual).all(), f"{name}: NaN/inf"
    err, eager_err = max_err(actual, truth), max_err(eager, truth)
    assert err <= FACTOR * eager_err + FLOOR * scale, (
        f"{name}: error {err:.3g} > {FACTOR} x eager fp32 error {eager_err:.3g} + floor"
    )
    assert err <= ceiling * scale, f"{name}: relative error {err / scale:.3g} > {ceiling}"


def assert_bf16_roundings(name: str, actual: torch.Tensor, truth: torch.Tensor, roundings: int) -> None:
    """Each element within ``roundings`` bf16 roundings of the float64 truth (+ the fp32 floor)."""
    assert torch.isfinite(actual).all(), f"{name}: NaN/inf"
    err = (actual.double() - truth).abs()
    bound = roundings * BF16_ROUNDING * truth.abs() + FLOOR * truth.abs().max()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name}: an element is {worst:.3g} x its bound of {roundings} bf16 roundings"


@pytest.fixture
def streamed_tiles(monkeypatch):
    """Make the Triton kernels stream V = 1000 in four 256-wide tiles instead of one on-chip tile."""
    from fastppo.kernels.token_logprobs import triton as token_kernels

    monkeypatch.setattr(token_kernels, "MAX_BLOCK_V", 256)
    monkeypatch.setattr(token_kernels, "SINGLE_TILE_MAX_V", 0)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", matrix(), ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_grad_and_stats_match_trl_formula_in_float64(backend, case, dtype, request):
    dtype = DTYPES[dtype]
    if case.streamed and backend == "triton":
        request.getfixturevalue("streamed_tiles")
    settings = case.settings
    t = make_case(dtype, settings.temperature, case.advantages)
    upstream = torch.randn(()) * 2  # backward must scale by it, not assume 1
    x = t["logits"].clone().requires_grad_()
    loss, stats = fused_policy_loss(
        x,
        t["labels"],
        None if case.on_policy else t["old"],
        t["advantages"],
        t["mask"],
        ref_logprobs=t["ref"],
        compute_entropy=True,
        backend=backend,
        **loss_kwargs(settings),
    )
    (loss * upstream).backward()
    truth = textbook(t, case, torch.float64, upstream)
    eager = textbook(t, case, torch.float32, upstream)

    loss_scale = max(1.0, abs(truth.terms.loss.item()))
    assert_three_way("loss", loss, eager.terms.loss, truth.terms.loss, CEILING["loss"], loss_scale)
    assert x.grad.dtype == dtype
    if dtype == torch.float32:
        grad_scale = truth.grad.abs().max().item()
        assert_three_way("dlogits", x.grad, eager.grad, truth.grad, CEILING["fp32 grad"], grad_scale)
    else:
        assert_bf16_roundings("eager dlogits", eager.grad, truth.grad, BF16_ROUNDINGS["eager"])
        interpreted = backend == "triton" and not x.is_cuda
        roundings = BF16_ROUNDINGS[f"{backend}-interpreted" if interpreted else backend]
        assert_bf16_roundings("dlogits", x.grad, truth.grad, roundings)
    assert (x.grad[3] == 0).all() and (x.grad[t["mask"] == 0] == 0).all()  # masked: exactly zero

    mask = t["mask"].bool()
    assert torch.allclose(stats.logprobs[mask].double(), truth.logp[mask], atol=1e-5, rtol=0)
    assert (stats.logprobs[~mask] == 0).all()
    counted = counted_stats(truth, t["mask"], settings)
    for name in ("clip_low", "clip_high", "clip_region"):  # counts: equal, not close
        assert getattr(stats, name).item() == pytest.approx(counted[name], abs=1e-7), name
    for name in ("ratio_mean", "kl_mean", "entropy_mean"):
        got = getattr(stats, name).item()
        assert abs(got - counted[name]) <= STAT_TOL * max(1.0, abs(counted[name])), name
    if not case.on_policy and case.advantages == "B":  # the case exercises both clip sides
        assert counted["clip_low"] > 0 and counted["clip_high"] > 0


class _OneProcess:
    """The accelerate calls TRL's _compute_loss makes, for a single process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_compute_loss(logp, old, ref, advantages, mask, settings: PolicyLossSettings):
    """The installed TRL's own ``GRPOTrainer._compute_loss``, called unbound on a stand-in trainer
    whose per-token log-probs are ``logp``; returns (loss, logged metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    batch, length = logp.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=settings.importance_sampling_level,
        beta=settings.beta,
        loss_type=settings.loss_type,
        epsilon_low=settings.clip_low,
        epsilon_high=settings.upper_clip,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        args=types.SimpleNamespace(
            use_bias_correction_kl=False, delta=settings.delta, steps_per_generation=1
        ),
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=settings.max_completion_length,
        accelerator=_OneProcess(),
        _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
    )
    inputs = {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(settings.num_items_in_batch),
    }
    try:
        loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    except (AttributeError, KeyError) as error:
        pytest.fail(f"TRL's _compute_loss needs more than this stand-in trainer gives ({error!r}): update it")
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("advantages", ["B", "BT"])
@pytest.mark.parametrize("delta", [None, 1.5])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_with_installed_trl_compute_loss(backend, loss_type, level, delta, advantages):
    """Loss, gradient and logged clip/KL metrics; [B, T] advantages at sequence level give per-token
    clip flags, which TRL averages over unmasked tokens."""
    pytest.importorskip("trl")
    settings = PolicyLossSettings(
        clip_low=0.2,
        clip_high=0.28,
        delta=delta,
        beta=0.04,  # TRL's KL is k3
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=10,
        num_items_in_batch=17.0,
        temperature=0.7,
    )
    t = make_case(torch.float32, settings.temperature, advantages)
    x64 = t["logits"].double().requires_grad_()
    logp64 = eager_token_logprobs(x64, t["labels"], settings.temperature)
    theirs, metrics = trl_compute_loss(
        logp64, t["old"].double(), t["ref"].double(), t["advantages"].double(), t["mask"].double(), settings
    )
    theirs.backward()
    x = t["logits"].clone().requires_grad_()
    ours, stats = fused_policy_loss(
        x,
        t["labels"],
        t["old"],
        t["advantages"],
        t["mask"],
        ref_logprobs=t["ref"],
        backend=backend,
        **loss_kwargs(settings),
    )
    ours.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item()))
    assert max_err(x.grad, x64.grad) <= 2e-5 * x64.grad.abs().max().item()
    for ours_name, trl_name in [
        ("clip_low", "clip_ratio/low_mean"),
        ("clip_high", "clip_ratio/high_mean"),
        ("clip_region", "clip_ratio/region_mean"),
        ("kl_mean", "kl"),
    ]:
        assert getattr(stats, ours_name).item() == pytest.approx(metrics[trl_name], rel=1e-5, abs=1e-7)
    assert metrics["clip_ratio/region_mean"] > 0  # the case clips


GOOD = {
    "logits": torch.randn(2, 3, 11),
    "labels": torch.zeros(2, 3, dtype=torch.long),
    "old_logprobs": torch.zeros(2, 3),
    "advantages": torch.zeros(2),
    "mask": torch.ones(2, 3),
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": torch.full((2, 3), 11)}, "label 11 is outside the vocabulary"),
        ({"labels": torch.full((2, 3), -5)}, "label -5 is outside the vocabulary"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, r"labels has shape \(2, 4\), expected \(2, 3\)"),
        ({"old_logprobs": torch.zeros(2, 4)}, r"old_logprobs has shape \(2, 4\), expected \(2, 3\)"),
        ({"mask": torch.ones(3, 3)}, r"mask has shape \(3, 3\)"),
        ({"advantages": torch.zeros(3)}, r"advantages has shape \(3,\), expected \[B\] = \(2,\)"),
        ({"ref_logprobs": torch.zeros(2, 4), "beta": 0.1}, r"ref_logprobs has shape \(2, 4\)"),
        ({"ref_logprobs": torch.full((2, 3), math.nan), "beta": 0.1}, "ref_logprobs contains NaN"),
        ({"old_logprobs": torch.full((2, 3), math.nan)}, "old_logprobs contains NaN"),
        ({"advantages": torch.full((2, 3), math.inf)}, "advantages contains NaN or inf"),
        ({"logits": torch.zeros(2, 3, 11, dtype=torch.long)}, "logits must be a floating tensor"),
        ({"logits": torch.randn(2, 3)}, r"logits must be \[B, T, V\], got shape \(2, 3\)"),
        ({"beta": 0.1}, "beta=0.1 > 0 needs ref_logprobs"),
        ({"clip_high": -0.1}, "clip_high must be a finite number > 0 or None, got -0.1"),
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level must be one of"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
        ({"clip_low": 1.0}, "clip_low must be < 1"),
        ({"clip_low": -0.2}, "clip_low must be a finite number > 0, got -0.2"),
        ({"delta": 1.0}, "delta must be a finite number > 1"),
        ({"beta": -0.1}, "beta must be a finite number >= 0, got -0.1"),
        ({"max_completion_length": 0}, "max_completion_length must be > 0"),
        ({"num_items_in_batch": 0.0}, "num_items_in_batch must be > 0"),
        ({"backend": "cuda"}, "backend must be 'auto', 'triton' or 'torch', got 'cuda'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_value_on_both_backends(backend, change, message):
    """Every check runs before either backend's code (an out-of-vocabulary label would be read out of
    bounds by the Triton kernel)."""
    args = {"backend": backend, **GOOD, **change}
    tensors = [args.pop(name) for name in ("logits", "labels", "old_logprobs", "advantages", "mask")]
    if tensors[0].is_floating_point():
        tensors[0] = tensors[0].clone().requires_grad_()  # the Triton path's autograd Function too
    with pytest.raises(ValueError, match=message):
        fused_policy_loss(*tensors, **args)
