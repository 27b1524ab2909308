"""linear_ppo_loss and linear_token_logprobs (hidden states in), both backends, against TRL's loss
in float64 on ``hidden @ W^T + b``; chunking that is really bounded; bad input.

Ground truth: ``F.linear`` -> ``log_softmax(. / T).gather`` -> TRL GRPOTrainer's loss as plain math
(``fastppo.kernels.ppo_loss.trl_formula.trl_policy_loss``, independent of ``policy_objective``), float64
autograd on the very inputs under test. Three-way: the error against float64 must stay within
``FACTOR[dtype]`` x the error of the eager peer in the test dtype (``F.linear`` in that dtype,
log-softmax in fp32, autograd) plus a floor, and under a ceiling, all relative (loss: to
max(1, |loss|); gradients: to their largest float64 entry):

| dtype | FACTOR | floor | loss, entropy ceiling | gradient ceiling (hidden, weight, bias) |
|-------|--------|-------|-----------------------|-----------------------------------------|
| fp32  | 3      | 1e-6  | 1e-5         | 2e-5                                    |
| bf16  | 3      | 1e-3  | 2e-2         | 2e-2                                    |

fp32: the kernels round in another order than eager (base-2 exponents, fused multiply-adds), so
on one draw a log-prob of magnitude 16 may carry 1.5 ulp where eager's carries 0.5; a GSPO
sequence's shared dLoss/dlogp passes that on to every token's gradient. Over 6 seeds x 8 cases
the kernels' median error is 0.2 of the 2x bound (eager's own rounding is the 1x), the largest
1.0: hence 3x. The ceiling is the gate that does not move.

bf16: both paths round the chunk's logits to bf16, so the loss errors are alike; the gradients
differ by one more bf16 rounding of dlogits (stored in the forward, interpreted Triton truncates)
and by the weight gradient being accumulated in bf16 over chunks: hence 3x.
Tied embeddings and the on-policy path are in tests/kernels/test_ppo_loss_cases.py and
test_ppo_loss_backends.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from fastppo.kernels import linear_ppo_loss, linear_token_logprobs
from fastppo.kernels.linear_ppo_loss import chunked
from fastppo.kernels.linear_ppo_loss.reference import linear_policy_loss_reference
from fastppo.kernels.ppo_loss import PolicyLossSettings
from fastppo.kernels.ppo_loss.trl_formula import trl_policy_loss
from fastppo.kernels.token_logprobs.reference import eager_token_logprobs

BACKENDS = ["torch", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FACTOR = {torch.float32: 3.0, torch.bfloat16: 3.0}
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
CEILING = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}  # (loss, gradients)
BATCH, LENGTH, HIDDEN, VOCAB = 3, 7, 16, 1000  # sequence 2 is fully masked
ROWS_PER_CHUNK = 6  # 21 rows: chunks of 6, 6, 6 and a ragged 3


def chunk_bytes_for(rows: int, dtype: torch.dtype, backend: str = "torch") -> int:
    """A chunk_bytes budget that gives ``rows`` token rows per chunk (see chunked.rows_per_chunk):
    the reference counts two fp32 temporaries per logit, the in-place Triton launchers none."""
    return rows * VOCAB * (torch.finfo(dtype).bits // 8 + (0 if backend == "triton" else 8))


@dataclasses.dataclass(frozen=True)
class Case:
    settings: PolicyLossSettings
    advantages: str  # "B" or "BT"

    @property
    def id(self) -> str:
        s = self.settings
        kl = f"{s.kl_estimator}-beta{s.beta}" if s.beta else "beta0"
        extras = ["delta"] * (s.delta is not None) + ["kl-ratio"] * s.kl_bias_correction
        extras += [f"ent{s.entropy_coef}"] * (s.entropy_coef != 0)
        extras += [f"topH{s.top_entropy_quantile}"] * (s.top_entropy_quantile < 1)
        extras += [f"offpol{s.off_policy_mask_threshold}"] * (s.off_policy_mask_threshold is not None)
        return "-".join([s.loss_type, s.importance_sampling_level, kl, f"adv{self.advantages}", *extras])


def cases() -> list[Case]:
    """Every loss_type x level; estimators, delta and the advantage shape cycle through them."""
    out = []
    combos = itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"))
    for i, (loss_type, level) in enumerate(combos):
        estimator = (None, "k1", "k2", "k3")[i % 4]
        settings = PolicyLossSettings(
            clip_low=0.2,
            clip_high=0.28,
            delta=1.5 if i % 3 == 0 else None,
            beta=0.0 if estimator is None else 0.1,
            kl_estimator=estimator or "k3",
            loss_type=loss_type,
            importance_sampling_level=level,
            max_completion_length=10 if i % 2 else None,
            num_items_in_batch=13.0 if i % 2 else None,
            temperature=0.7,
        )
        out.append(Case(settings, "BT" if i % 3 == 1 else "B"))
    # the rest of TRL's loss family and its options: the fused chunk kernel for token-local ones
    # (cispo, sapo, luspo, the ratio-weighted KL, the entropy bonus), two passes for the others
    base = PolicyLossSettings(clip_low=0.2, clip_high=0.28, temperature=0.7, num_items_in_batch=13.0)
    family = [
        ({"loss_type": "cispo", "clip_high": 1.3, "beta": 0.1, "kl_bias_correction": True}, "B"),
        ({"loss_type": "sapo", "entropy_coef": 0.03}, "BT"),
        ({"loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.5}, "B"),
        ({"loss_type": "luspo", "beta": 0.1, "kl_estimator": "k1", "kl_bias_correction": True}, "BT"),
        ({"loss_type": "vespo", "beta": 0.1, "kl_estimator": "k2"}, "B"),
        ({"loss_type": "dapo", "top_entropy_quantile": 0.43, "entropy_coef": 0.02}, "BT"),
        ({"loss_type": "grpo", "off_policy_mask_threshold": 0.05}, "B"),
    ]
    return out + [Case(dataclasses.replace(base, **changes), adv) for changes, adv in family]


def make_case(dtype: torch.dtype, temperature: float, advantages: str) -> dict:
    """Inputs whose ratios land on both clip sides: sequence 0 above 1 + eps with A > 0, sequence 1
    below 1 - eps with A < 0; old / ref log-probs near the true ones."""
    hidden = torch.randn(BATCH, LENGTH, HIDDEN).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.5).to(dtype)
    bias = torch.randn(VOCAB).to(dtype)
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH))
    mask = (torch.rand(BATCH, LENGTH) > 0.25).float()
    mask[:2, :2] = 1
    mask[2] = 0  # no completion tokens: no NaN, zero gradient
    with torch.no_grad():
        logp = eager_token_logprobs(
            F.linear(hidden.double(), weight.double(), bias.double()), labels, temperature
        )
    shift = torch.tensor([-0.45, 0.45, 0.0], dtype=torch.float64)[:, None]
    adv = torch.tensor([1.3, -0.7, 0.4]) if advantages == "B" else torch.randn(BATCH, LENGTH)
    return {
        "params": (hidden, weight, bias),
        "labels": labels,
        "mask": mask,
        "old": (logp + shift + 0.3 * torch.randn_like(logp)).float(),
        "ref": (logp + 0.3 * torch.randn_like(logp)).float(),
        "advantages": adv,
    }


def loss_kwargs(settings: PolicyLossSettings) -> dict:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def textbook(t: dict, settings: PolicyLossSettings, dtype: torch.dtype, upstream: torch.Tensor):
    """(TRL's terms, [grad hidden, weight, bias], mean entropy over unmasked tokens): eager in
    ``dtype``, fp64 = truth."""
    leaves = [p.to(dtype).requires_grad_() for p in t["params"]]
    logits = F.linear(*leaves)
    logp = eager_token_logprobs(logits, t["labels"], settings.temperature)
    compute = logp.dtype
    logp_all = torch.log_softmax(logits.to(compute) / settings.temperature, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # differentiable: the entropy bonus's gradient
    terms = trl_policy_loss(
        logp,
        t["old"].to(compute),
        t["advantages"].to(compute),
        t["mask"],
        settings,
        t["ref"].to(compute),
        entropy,
    )
    (terms.loss * upstream.to(compute)).backward()
    with torch.no_grad():
        entropy_mean = (entropy * t["mask"]).sum() / t["mask"].sum()
    return terms, [leaf.grad for leaf in leaves], entropy_mean


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_three_way(name, actual, eager, truth, dtype: torch.dtype, ceiling: float, scale: float) -> None:
    actual, eager, truth = (torch.as_tensor(v) for v in (actual, eager, truth))
    assert torch.isfinite(actual).all(), f"{name}: NaN/inf"
    err, eager_err = max_err(actual, truth), max_err(eager, truth)
    bound = FACTOR[dtype] * eager_err + FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > {FACTOR[dtype]} x eager error {eager_err:.3g} + floor"
    assert err <= ceiling * scale, f"{name}: relative error {err / scale:.3g} > {ceiling}"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_grads_match_trl_formula_in_float64(backend, case, dtype):
    dtype = DTYPES[dtype]
    settings = case.settings
    t = make_case(dtype, settings.temperature, case.advantages)
    upstream = torch.randn(()) * 2
    hidden, weight, bias = (p.clone().requires_grad_() for p in t["params"])
    loss, stats = linear_ppo_loss(
        hidden,
        weight,
        t["labels"],
        t["old"],
        t["advantages"],
        t["mask"],
        bias=bias,
        ref_logprobs=t["ref"],
        compute_entropy=True,
        chunk_bytes=chunk_bytes_for(ROWS_PER_CHUNK, dtype, backend),
        backend=backend,
        **loss_kwargs(settings),
    )
    (loss * upstream).backward()
    truth, truth_grads, truth_entropy = textbook(t, settings, torch.float64, upstream)
    eager, eager_grads, eager_entropy = textbook(t, settings, dtype, upstream)

    loss_ceiling, grad_ceiling = CEILING[dtype]
    scale = max(1.0, abs(truth.loss.item()))
    assert_three_way("loss", loss, eager.loss, truth.loss, dtype, loss_ceiling, scale)
    entropy_scale = max(1.0, truth_entropy.item())
    assert_three_way(
        "entropy_mean", stats.entropy_mean, eager_entropy, truth_entropy, dtype, loss_ceiling, entropy_scale
    )
    for name, got, want, peer in zip(
        ("hidden", "weight", "bias"),
        (hidden.grad, weight.grad, bias.grad),
        truth_grads,
        eager_grads,
        strict=True,
    ):
        assert got.dtype == dtype, name
        assert_three_way(f"grad {name}", got, peer, want, dtype, grad_ceiling, want.abs().max().item())
    assert (hidden.grad[2] == 0).all() and (hidden.grad[t["mask"] == 0] == 0).all()
    if dtype == torch.float32:  # clip fractions counted from the float64 terms (bf16 logits move ratios)
        m = t["mask"].double()
        high = (truth.coef_1 > 1 + settings.upper_clip) & (truth.advantages > 0)
        counted = high.double().mean() if high.shape[1] == 1 else (high * m).sum() / m.sum()
        assert stats.clip_high.item() == pytest.approx(counted.item(), abs=1e-7)


@pytest.fixture
def chunk_log(monkeypatch) -> list[tuple[int, int]]:
    """(rows, bytes) of every chunk of logits the chunk loops make."""
    log: list[tuple[int, int]] = []
    original = chunked.chunk_logits

    def spy(hidden, weight, bias, rows):
        for sl, logits in original(hidden, weight, bias, rows):
            log.append((logits.shape[0], logits.numel() * logits.element_size()))
            yield sl, logits

    monkeypatch.setattr(chunked, "chunk_logits", spy)
    return log


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_stay_within_the_budget_and_do_not_change_the_result(backend, level, chunk_log):
    t = make_case(torch.float32, 0.7, "B")
    settings = dataclasses.replace(cases()[0].settings, importance_sampling_level=level, beta=0.1)
    results = []
    for budget in (2**30, chunk_bytes_for(3, torch.float32, backend)):  # one chunk; then chunks of 3 rows
        chunk_log.clear()
        params = [p.clone().requires_grad_() for p in t["params"]]
        loss, stats = linear_ppo_loss(
            params[0],
            params[1],
            t["labels"],
            t["old"],
            t["advantages"],
            t["mask"],
            bias=params[2],
            ref_logprobs=t["ref"],
            chunk_bytes=budget,
            backend=backend,
            **loss_kwargs(settings),
        )
        (loss * 1.7).backward()
        results.append([loss.detach(), stats.logprobs] + [p.grad for p in params])
        chunk_rows = [rows for rows, _ in chunk_log]
        assert max(chunk_rows) <= min(BATCH * LENGTH, budget // (VOCAB * (4 if backend == "triton" else 12)))
        assert max(size for _, size in chunk_log) <= budget
    # 21 rows in 7 chunks per pass: Triton at token level is one fused pass, otherwise a log-prob
    # scan then a gradient pass.
    passes = 1 if backend == "triton" and level == "token" else 2
    assert chunk_rows.count(3) == 7 * passes and len(chunk_rows) == 7 * passes
    # Chunking only reorders fp32 sums (and GSPO couples a sequence's tokens through them): a few
    # roundings of the largest entry, far below a chunk dropped or counted twice.
    for one, many in zip(*results, strict=True):
        assert max_err(one, many) <= 1e-5 * one.abs().max().item()


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_paths_equal_the_unchunked_reference(backend, level):
    """The readable definition beside the op (reference.py: F.linear, then the logits-in reference)
    and the chunked paths compute one function: loss, stats and gradients to fp32 rounding."""
    t = make_case(torch.float32, 0.7, "BT")
    settings = dataclasses.replace(cases()[1].settings, importance_sampling_level=level)
    results = []
    for run in ("reference", "chunked"):
        hidden, weight, bias = (p.clone().requires_grad_() for p in t["params"])
        args = (hidden, weight, t["labels"], t["old"], t["advantages"], t["mask"], settings)
        if run == "reference":
            loss, stats = linear_policy_loss_reference(*args, bias, t["ref"], compute_entropy=True)
        else:
            loss, stats = linear_ppo_loss(
                *args,
                bias=bias,
                ref_logprobs=t["ref"],
                compute_entropy=True,
                chunk_bytes=chunk_bytes_for(ROWS_PER_CHUNK, torch.float32, backend),
                backend=backend,
            )
        (loss * 1.3).backward()
        results.append([loss, stats.logprobs, stats.ratio_mean, stats.entropy_mean, hidden.grad, weight.grad])
    for want, got in zip(*results, strict=True):
        assert max_err(got, want) <= 2e-6 * max(1.0, want.abs().max().item())


def test_chunk_rows_are_even_whole_gemm_tiles_within_the_budget():
    """The fewest chunks the budget allows, of even size, in multiples of 256 rows where that fits:
    16384 tokens of a 152k vocabulary in 1 GiB (bf16, in place) are 5 chunks of 3328 (13 x 256),
    not four of 3532 and a ragged 2256."""
    vocab, per_row = 151936, 151936 * 2
    for budget_gib, rows in ((1, 3328), (2, 5632), (4, 8192)):  # 5 x 3328, 3 x 5632, 2 x 8192
        assert chunked.rows_per_chunk(16384, vocab, torch.bfloat16, budget_gib * 2**30, False) == rows
    assert chunked.rows_per_chunk(300, vocab, torch.bfloat16, 2**30, False) == 300  # one chunk, as is
    assert chunked.rows_per_chunk(5000, vocab, torch.bfloat16, 2**30, False) == 2560  # 2 x 2560
    for n_rows, budget in itertools.product((1, 255, 300, 5000, 16384, 16385), (2**26, 2**28, 2**30, 2**32)):
        rows = chunked.rows_per_chunk(n_rows, vocab, torch.bfloat16, budget, fp32_temporaries=False)
        most = max(1, min(n_rows, budget // per_row))
        assert 1 <= rows <= most, (n_rows, budget, rows)
        assert math.ceil(n_rows / rows) == math.ceil(n_rows / most), (n_rows, budget, rows)
        even = math.ceil(n_rows / math.ceil(n_rows / most))
        if 256 <= math.ceil(even / 256) * 256 <= most:
            assert rows % 256 == 0, (n_rows, budget, rows)
        else:
            assert rows == even, (n_rows, budget, rows)


@pytest.mark.parametrize("shape", [(BATCH * LENGTH,), (BATCH, LENGTH)], ids=["N-H", "B-T-H"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_with_and_without_grad(backend, shape):
    hidden, weight, bias = make_case(torch.float32, 0.7, "B")["params"]
    hidden = hidden.reshape(*shape, HIDDEN)
    labels = torch.randint(0, VOCAB, shape)
    labels.view(-1)[::5] = -100  # ignored positions: 0 and no gradient
    keep = labels != -100
    kwargs = {"bias": bias, "temperature": 0.7, "chunk_bytes": chunk_bytes_for(4, torch.float32, backend)}
    with torch.no_grad():
        logp_nograd = linear_token_logprobs(hidden, weight, labels, backend=backend, **kwargs)
    assert not logp_nograd.requires_grad and logp_nograd.shape == shape

    params = [p.clone().requires_grad_() for p in (hidden, weight, bias)]
    logp, entropy = linear_token_logprobs(
        params[0], params[1], labels, return_entropy=True, backend=backend, **{**kwargs, "bias": params[2]}
    )
    g_logp, g_ent = torch.randn(shape), torch.randn(shape)
    torch.autograd.backward((logp, entropy), (g_logp, g_ent))

    truth = [p.double().requires_grad_() for p in (hidden, weight, bias)]
    z = F.linear(*truth) / 0.7
    logp_all = torch.log_softmax(z, -1)
    logp64 = torch.where(keep, logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    entropy64 = torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    torch.autograd.backward((logp64, entropy64), (g_logp.double(), g_ent.double()))

    assert torch.equal(logp_nograd, logp.detach())
    assert max_err(logp, logp64) <= 1e-5 and max_err(entropy, entropy64) <= 1e-5
    assert (logp[~keep] == 0).all() and (entropy[~keep] == 0).all()
    for name, got, want in zip(("hidden", "weight", "bias"), params, truth, strict=True):
        assert max_err(got.grad, want.grad) <= 2e-5 * want.grad.abs().max().item(), name
    assert (params[0].grad[~keep] == 0).all()


GOOD = {
    "hidden": torch.randn(2, 3, 8),
    "weight": torch.randn(11, 8),
    "labels": torch.zeros(2, 3, dtype=torch.long),
    "old_logprobs": torch.zeros(2, 3),
    "advantages": torch.zeros(2),
    "mask": torch.ones(2, 3),
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden": torch.randn(6, 8)}, r"hidden must be \[B, T, H\], got shape \(6, 8\)"),
        ({"weight": torch.randn(11, 9)}, r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 8"),
        ({"bias": torch.zeros(10)}, r"bias has shape \(10,\), expected \(11,\)"),
        ({"labels": torch.full((2, 3), 11)}, "label 11 is outside the vocabulary"),
        ({"labels": torch.zeros(3, 3, dtype=torch.long)}, r"labels has shape \(3, 3\), expected \(2, 3\)"),
        ({"advantages": torch.zeros(2, 4)}, r"advantages has shape \(2, 4\)"),
        ({"advantages": torch.tensor([0.0, math.nan])}, "advantages contains NaN"),
        ({"weight": torch.zeros(11, 8, dtype=torch.long)}, "weight must be a floating tensor"),
        (
            {"weight": torch.randn(11, 8, dtype=torch.bfloat16)},
            "weight has dtype torch.bfloat16, expected hidden's",
        ),
        ({"bias": torch.zeros(11, dtype=torch.float64)}, "bias has dtype torch.float64, expected hidden's"),
        ({"beta": 0.1}, "beta=0.1 > 0 needs ref_logprobs"),
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level must be one of"),
        ({"clip_high": 0.0}, "clip_high must be a finite number > 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_loss_bad_input_names_the_value(backend, change, message):
    args = {"backend": backend, **GOOD, **change}
    tensors = [args.pop(n) for n in ("hidden", "weight", "labels", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match=message):
        linear_ppo_loss(*tensors, **args)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, r"labels has shape \(2, 4\), expected \(2, 3\)"),
        ({"labels": torch.full((2, 3), -7)}, "label -7 is outside the vocabulary"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"weight": torch.randn(11, 9)}, r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 8"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_linear_token_logprobs_bad_input_names_the_value(change, message):
    args = {"hidden": GOOD["hidden"], "weight": GOOD["weight"], "labels": GOOD["labels"], **change}
    with pytest.raises(ValueError, match=message):
        linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_default_chunk_is_sized_for_the_device(monkeypatch):
    """chunk_bytes=None: 128 MiB of logits (+ the reference's fp32 temporaries) on CPU, where a larger
    chunk only adds resident memory; 1 GiB on a GPU. 160 rows of a 152k vocabulary (fp32, reference)
    are 292 MB, so on CPU they run as three chunks of at most 54 rows where 1 GiB takes them in one."""
    assert chunked.default_chunk_bytes(torch.device("cpu")) == chunked.CPU_CHUNK_BYTES == 128 * 2**20
    assert chunked.default_chunk_bytes(torch.device("cuda", 0)) == chunked.DEFAULT_CHUNK_BYTES == 2**30
    seen = []

    def spy(hidden, weight, bias, rows):
        seen.append(rows)
        yield from chunk_logits(hidden, weight, bias, rows)

    chunk_logits = chunked.chunk_logits
    monkeypatch.setattr(chunked, "chunk_logits", spy)
    hidden, weight = torch.randn(160, 8), torch.randn(151936, 8) * 0.1
    labels = torch.randint(0, 151936, (160,))
    logp = linear_token_logprobs(hidden, weight, labels, backend="torch")
    assert seen == [54]
    whole = linear_token_logprobs(hidden, weight, labels, chunk_bytes=2**30, backend="torch")
    assert seen == [54, 160]  # an explicit budget is the caller's
    torch.testing.assert_close(logp, whole)  # rows are independent: chunking changes no result
