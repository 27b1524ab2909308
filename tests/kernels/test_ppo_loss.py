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
paths are in tests/kernels/test_ppo_loss_cases.py, test_ppo_loss_backends.py, test_token_logprobs.py.
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
        parts += ["kl-ratio"] * s.kl_bias_correction + [f"ent{s.entropy_coef}"] * (s.entropy_coef != 0)
        parts += [f"topH{s.top_entropy_quantile}"] * (s.top_entropy_quantile < 1)
        parts += [f"offpol{s.off_policy_mask_threshold}"] * (s.off_policy_mask_threshold is not None)
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
    return cases + family_matrix()


def family_matrix() -> list[Case]:
    """The rest of TRL 1.16's loss family (cispo, sapo, luspo, vespo) at both importance levels, and
    the options around every loss type: the KL term times the ratio, the entropy bonus, the
    high-entropy token mask, the off-policy sequence mask. Token-local settings run the single
    Triton pass (the kernel forms their derivative); the masks and vespo take the two-pass path."""
    base = PolicyLossSettings(clip_low=0.2, clip_high=0.28, temperature=0.7, num_items_in_batch=17.0)
    k3_corrected = {"beta": 0.1, "kl_estimator": "k3", "kl_bias_correction": True}
    rows = [  # (loss_type, level, changes, advantages, on_policy, streamed)
        ("cispo", "token", {"clip_high": 1.3, **k3_corrected}, "B", False, False),
        ("cispo", "sequence", {"clip_high": 1.3, "entropy_coef": 0.02}, "BT", False, False),
        ("cispo", "token", {"clip_high": 1.3, "entropy_coef": 0.03}, "BT", False, True),
        ("sapo", "token", {"beta": 0.1, "kl_estimator": "k1", "entropy_coef": 0.01}, "B", False, False),
        ("sapo", "sequence", {"sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.2}, "BT", False, False),
        ("sapo", "token", k3_corrected, "B", True, True),
        ("luspo", "sequence", {"delta": 1.5, **k3_corrected}, "B", False, False),
        ("luspo", "token", {"temperature": 1.0}, "BT", False, True),
        ("vespo", "token", {"beta": 0.1, "kl_estimator": "k2"}, "B", False, False),
        ("vespo", "sequence", {"vespo_k_neg": 2.5, "vespo_lambda_pos": 2.0}, "BT", False, False),
        ("dapo", "token", {"entropy_coef": 0.02, "delta": 1.5}, "BT", False, False),
        ("grpo", "token", k3_corrected, "B", False, True),
        ("bnpo", "token", {"top_entropy_quantile": 0.43, "beta": 0.1}, "B", False, False),
        (
            "dr_grpo",
            "token",
            {"off_policy_mask_threshold": 0.05, "max_completion_length": 10},
            "B",
            False,
            False,
        ),
        ("dapo", "token", {"top_entropy_quantile": 0.33, "entropy_coef": 0.05}, "BT", False, True),
        ("grpo", "sequence", {"entropy_coef": 0.04, **k3_corrected}, "B", False, False),
        (
            "grpo",
            "token",
            {"off_policy_mask_threshold": 0.05, "top_entropy_quantile": 0.57},
            "BT",
            False,
            False,
        ),
    ]
    return [
        Case(
            dataclasses.replace(base, loss_type=loss_type, importance_sampling_level=level, **changes),
            advantages,
            on_policy,
            streamed,
        )
        for loss_type, level, changes, advantages, on_policy, streamed in rows
    ]


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
    logp_all = torch.log_softmax(x.to(torch.promote_types(compute, torch.float32)) / settings.temperature, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # differentiable: the entropy bonus's gradient
    terms = trl_policy_loss(logp, old, t["advantages"].to(compute), t["mask"], settings, ref, entropy)
    (terms.loss * upstream.to(compute)).backward()
    grad = x.grad if compute == torch.float64 else x.grad.to(t["logits"].dtype)
    return Textbook(terms, logp.detach(), entropy.detach(), grad)


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

    counted = {
        "ratio_mean": mean(terms.coef_1, per_sequence),
        "clip_low": mean(low, per_sequence),
        "clip_high": mean(high, per_sequence),
        "clip_region": mean(low | high, per_sequence),
        "kl_mean": mean(terms.per_token_kl),
        "entropy_mean": mean(truth.entropy),
    }
    if settings.loss_type == "cispo":  # TRL's cispo_clip_ratio
        counted["cispo_clip"] = mean(
            (terms.coef_1 > settings.upper_clip) & (terms.advantages > 0), per_sequence
        )
    if terms.phi_seq is not None:  # TRL's vespo/phi_seq_mean: [B, 1], over sequences
        counted["vespo_phi_mean"] = mean(terms.phi_seq, terms.phi_seq.shape[1] == 1)
    if terms.entropy_mask is not None:
        counted["entropy_kept"] = mean(terms.entropy_mask)
    acting = m if terms.entropy_mask is None else m * terms.entropy_mask.double()
    counted["acting_entropy_mean"] = ((truth.entropy * acting).sum() / acting.sum()).item()
    if terms.off_policy_mask is not None:
        counted["off_policy_kept"] = mean(terms.off_policy_mask, terms.off_policy_mask.shape[1] == 1)
    return counted


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
    counts = ("clip_low", "clip_high", "clip_region", "cispo_clip", "entropy_kept", "off_policy_kept")
    for name in counts:  # counts: equal, not close
        if name in counted:
            assert getattr(stats, name).item() == pytest.approx(counted[name], abs=1e-7), name
    for name in ("ratio_mean", "kl_mean", "entropy_mean", "vespo_phi_mean", "acting_entropy_mean"):
        if name in counted:
            got = getattr(stats, name).item()
            assert abs(got - counted[name]) <= STAT_TOL * max(1.0, abs(counted[name])), name
    clipped_family = settings.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    if clipped_family and not case.on_policy and case.advantages == "B":  # the case exercises both clip sides
        assert counted["clip_low"] > 0 and counted["clip_high"] > 0
    for name in ("entropy_kept", "off_policy_kept", "cispo_clip"):  # the masks and caps act on the case
        if name in counted:
            assert 0 < counted[name] < 1, (name, counted[name])


class _OneProcess:
    """The accelerate calls TRL's _compute_loss makes, for a single process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_compute_loss(logp, entropy, old, ref, advantages, mask, settings: PolicyLossSettings):
    """The installed TRL's own ``GRPOTrainer._compute_loss``, called unbound on a stand-in trainer
    whose per-token log-probs and entropies are ``logp`` and ``entropy``; returns (loss, logged metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    batch, length = logp.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, entropy, None),
        top_entropy_quantile=settings.top_entropy_quantile,
        off_policy_mask_threshold=settings.off_policy_mask_threshold,
        importance_sampling_level=settings.importance_sampling_level,
        beta=settings.beta,
        loss_type=settings.loss_type,
        epsilon_low=settings.clip_low,
        epsilon_high=settings.upper_clip,
        entropy_coef=settings.entropy_coef,
        use_adaptive_entropy=False,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        args=types.SimpleNamespace(
            use_bias_correction_kl=settings.kl_bias_correction,
            delta=settings.delta,
            steps_per_generation=1,
            sapo_temperature_pos=settings.sapo_temperature_pos,
            sapo_temperature_neg=settings.sapo_temperature_neg,
            vespo_k_pos=settings.vespo_k_pos,
            vespo_lambda_pos=settings.vespo_lambda_pos,
            vespo_k_neg=settings.vespo_k_neg,
            vespo_lambda_neg=settings.vespo_lambda_neg,
        ),
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=settings.max_completion_length,
        accelerator=_OneProcess(),
        _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=settings.entropy_coef != 0.0,
        aux_loss_enabled=False,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
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


def parity_cases() -> list[PolicyLossSettings]:
    """TRL's clipped family x level x delta, then the rest of its loss family and options."""
    base = PolicyLossSettings(
        clip_low=0.2,
        clip_high=0.28,
        beta=0.04,  # TRL's KL is k3
        max_completion_length=10,
        num_items_in_batch=17.0,
        temperature=0.7,
    )
    clipped = [
        dataclasses.replace(base, loss_type=loss_type, importance_sampling_level=level, delta=delta)
        for loss_type, level, delta in itertools.product(
            ("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"), (None, 1.5)
        )
    ]
    family = [
        {"loss_type": "cispo", "clip_high": 1.3, "kl_bias_correction": True},
        {"loss_type": "cispo", "clip_high": 1.3, "importance_sampling_level": "sequence"},
        {"loss_type": "sapo", "entropy_coef": 0.02},
        {"loss_type": "sapo", "importance_sampling_level": "sequence", "sapo_temperature_neg": 1.3},
        {"loss_type": "luspo", "importance_sampling_level": "sequence", "kl_bias_correction": True},
        {"loss_type": "luspo", "delta": 1.5},
        {"loss_type": "vespo", "vespo_k_pos": 1.5},
        {"loss_type": "vespo", "importance_sampling_level": "sequence", "entropy_coef": 0.05},
        {"loss_type": "dapo", "top_entropy_quantile": 0.41, "entropy_coef": 0.03},
        {"loss_type": "grpo", "off_policy_mask_threshold": 0.05, "kl_bias_correction": True},
        {"loss_type": "bnpo", "importance_sampling_level": "sequence", "top_entropy_quantile": 0.43},
    ]
    return clipped + [dataclasses.replace(base, **changes) for changes in family]


def parity_id(settings: PolicyLossSettings) -> str:
    defaults = PolicyLossSettings()
    return "-".join(
        f"{f.name}={getattr(settings, f.name)}"
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(defaults, f.name) and f.name not in ("temperature", "beta")
    )


@pytest.mark.parametrize("advantages", ["B", "BT"])
@pytest.mark.parametrize("settings", parity_cases(), ids=parity_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_with_installed_trl_compute_loss(backend, settings, advantages):
    """Loss, gradient and logged metrics against TRL's own code: its clip/KL/cispo/vespo metrics;
    [B, T] advantages at sequence level give per-token clip flags, which TRL averages over unmasked
    tokens. The entropy bonus differentiates the entropy too."""
    pytest.importorskip("trl")
    t = make_case(torch.float32, settings.temperature, advantages)
    x64 = t["logits"].double().requires_grad_()
    logp64 = eager_token_logprobs(x64, t["labels"], settings.temperature)
    logp_all = torch.log_softmax(x64 / settings.temperature, -1)
    entropy64 = -(logp_all.exp() * logp_all).sum(-1)
    theirs, metrics = trl_compute_loss(
        logp64,
        entropy64,
        t["old"].double(),
        t["ref"].double(),
        t["advantages"].double(),
        t["mask"].double(),
        settings,
    )
    theirs.backward()
    x = t["logits"].clone().requires_grad_()
    ours, stats = fused_policy_loss(
        x,
        t["labels"],
        t["old"],
        t["advantages"],
        t["mask"],
        settings,
        ref_logprobs=t["ref"],
        compute_entropy=True,
        backend=backend,
    )
    ours.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-5 * max(1.0, abs(theirs.item()))
    assert max_err(x.grad, x64.grad) <= 2e-5 * x64.grad.abs().max().item()
    names = [("kl_mean", "kl"), ("entropy_mean", "entropy")]
    if settings.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        names += [
            ("clip_low", "clip_ratio/low_mean"),
            ("clip_high", "clip_ratio/high_mean"),
            ("clip_region", "clip_ratio/region_mean"),
        ]
    if settings.loss_type == "cispo":
        names.append(("cispo_clip", "cispo_clip_ratio"))
    if settings.loss_type == "vespo":
        names.append(("vespo_phi_mean", "vespo/phi_seq_mean"))
    for ours_name, trl_name in names:
        assert getattr(stats, ours_name).item() == pytest.approx(metrics[trl_name], rel=1e-5, abs=1e-7), (
            ours_name
        )
    if (
        settings.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
        and settings.off_policy_mask_threshold is None
    ):
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
        ({"top_entropy_quantile": 1.5}, r"top_entropy_quantile must be in \[0, 1\], got 1.5"),
        ({"off_policy_mask_threshold": -0.1}, "off_policy_mask_threshold must be a finite number >= 0"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg must be a finite number > 0, got 0.0"),
        ({"entropy_coef": math.nan}, "entropy_coef must be a finite number, got nan"),
        ({"vespo_lambda_pos": math.inf}, "vespo_lambda_pos must be a finite number, got inf"),
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


def test_an_unknown_loss_setting_is_refused_with_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown loss setting\(s\) \['epsilon'\]; PolicyLossSettings has"):
        fused_policy_loss(
            *(GOOD[k] for k in ("logits", "labels", "old_logprobs", "advantages", "mask")), epsilon=0.2
        )
