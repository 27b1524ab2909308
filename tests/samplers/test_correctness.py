"""Every sampler against the definition of sampling, on CPU in float64: completions end at the first
end token and are padded as the trainers expect; greedy decoding gives ``model.generate``'s tokens;
at a temperature, top-k and top-p the empirical distribution of the first token is
``softmax(logits / T)`` restricted as configured (Pearson's chi-square, with a check that the same
test rejects the unrestricted distribution); recorded log-probs equal a fresh scoring forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from fastppo.batch import PolicyBatch
from fastppo.config import ForwardPlan
from fastppo.policy_forward import PolicyForward
from fastppo.rollout import Completions, SamplingSettings, completion_mask, left_pad

from .conftest import EOS, PAD, SAMPLERS

PROMPTS = [[3, 7, 5], [4], [9, 2, 8, 6, 11], [13, 14]]  # ragged: left padding in every batch
STOP = (EOS, 14)  # two end tokens (EOS and, say, end-of-turn)


def ids_of(sampled) -> torch.Tensor:
    return sampled.ids if isinstance(sampled, Completions) else sampled


@pytest.mark.parametrize("kind", SAMPLERS)
def test_greedy_completions_are_generates_tokens_ended_and_padded(kind, peaked_model, build_sampler):
    """Rows end at the first of either end token (which they keep) and carry the pad id after it;
    the tokens are those ``model.generate`` picks greedily."""
    model = peaked_model()
    ids, mask = left_pad(PROMPTS, PAD)
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=10, eos_token_id=list(STOP), pad_token_id=PAD
        ),
    )[:, ids.shape[1] :]
    settings = SamplingSettings(max_new_tokens=10, do_sample=False)
    got = ids_of(build_sampler(kind, model, eos=STOP).generate(ids, mask, 1, settings))
    assert got.tolist() == reference.tolist()
    # the trainers' view: the mask covers each row up to and including its first end token
    rows, truncated = completion_mask(got, STOP)
    lengths = rows.sum(1).tolist()
    assert lengths == [1, 8, 3, 5] and truncated.tolist() == [False, False, False, False]
    for row, length in zip(got.tolist(), lengths, strict=True):
        assert row[length - 1] in STOP and set(row[length:]) <= {PAD}


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``softmax(logits / T)`` restricted as transformers' warpers restrict it, in their order
    (temperature, top-k, top-p: keep the smallest set of top tokens holding more than ``top_p``)."""
    scores = logits.double() / temperature
    if top_k:
        scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort()  # ascending
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return scores.softmax(-1)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value of ``counts`` [V] under ``probs`` [V]; tokens expected fewer
    than 5 times share one bin (the chi-square approximation needs about 5 per bin)."""
    expected = probs * counts.sum()
    small = expected < 5
    observed_bins, expected_bins = counts[~small].double(), expected[~small]
    if small.any():
        observed_bins = torch.cat([observed_bins, counts[small].sum()[None].double()])
        expected_bins = torch.cat([expected_bins, expected[small].sum()[None]])
    keep = expected_bins > 0
    statistic = ((observed_bins[keep] - expected_bins[keep]) ** 2 / expected_bins[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), statistic / 2))


SAMPLES = 3000
ALPHA = 1e-4  # a correct sampler fails one such test with probability 1e-4 (seeds are fixed, so never twice)
CASES = {
    "T0.7": dict(temperature=0.7, top_k=0, top_p=1.0),
    "topk4-T1.3": dict(temperature=1.3, top_k=4, top_p=1.0),
    "topp0.8-T0.9": dict(temperature=0.9, top_k=0, top_p=0.8),
}


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("case", list(CASES))
def test_first_token_distribution_is_the_configured_one(kind, case, peaked_model, build_sampler):
    """3000 first tokens of one prompt: never a token the restriction removes, counts consistent
    with the configured distribution (p > 1e-4), and inconsistent with softmax(logits) at T=1
    unrestricted (p < 1e-4), so the test can tell the two apart at this sample size."""
    model = peaked_model()
    knobs = CASES[case]
    prompt = torch.tensor([[3, 7, 5]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
    expected = sampling_distribution(logits, **knobs)
    settings = SamplingSettings(max_new_tokens=1, **knobs)
    sampled = ids_of(build_sampler(kind, model).generate(prompt, torch.ones_like(prompt), SAMPLES, settings))
    assert sampled.shape == (SAMPLES, 1)
    counts = torch.bincount(sampled[:, 0], minlength=logits.shape[-1])
    assert int(counts[expected == 0].sum()) == 0  # truncated tokens are never drawn
    assert chi_square_p_value(counts, expected) > ALPHA
    assert chi_square_p_value(counts, logits.double().softmax(-1)) < ALPHA


def fresh_scores(
    model, rollout_ids, prompt_ids, prompt_mask, temperature: float, fused: bool
) -> torch.Tensor:
    """``[B, Lc]`` log-probs of the completions under ``model``, by the trainers' scoring forward."""
    mask, _ = completion_mask(rollout_ids, [EOS])
    batch = PolicyBatch(prompt_ids, prompt_mask, rollout_ids, mask, mask, torch.arange(len(rollout_ids)))
    return PolicyForward(ForwardPlan(fused=fused)).score(model, batch, temperature), mask


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_continuous_batching_log_probs_equal_a_fresh_scoring_forward(fused, peaked_model, build_sampler):
    """The engine's log-probs of the tokens it drew (untruncated: softmax(logits / T)) equal the
    trainers' scoring forward in float64 up to the engine's float32 logits (|diff| ~ 1e-7 here;
    the tolerance 2e-6 is far below what one optimizer step or a wrong T changes, ~1e-2)."""
    model = peaked_model()
    ids, mask = left_pad(PROMPTS, PAD)
    settings = SamplingSettings(max_new_tokens=8, temperature=0.7)
    sampled = build_sampler("continuous_batching", model).generate(ids, mask, 3, settings)
    assert sampled.untruncated and sampled.logprobs.dtype == torch.float32
    scores, keep = fresh_scores(
        model, sampled.ids, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), 0.7, fused
    )
    recorded = sampled.logprobs.double().masked_fill(~keep.bool(), 0.0)
    assert keep.sum() > 3 * len(PROMPTS)  # several tokens per completion
    torch.testing.assert_close(recorded, scores.double(), rtol=0, atol=2e-6)


def test_truncated_log_probs_are_said_to_be_truncated(peaked_model, build_sampler):
    """With top-k the engine's log-probs are of the renormalised top-k distribution: not the
    training one, and flagged so (a trainer then refuses them as old log-probs)."""
    model = peaked_model()
    prompt = torch.tensor([[3, 7, 5]])
    settings = SamplingSettings(max_new_tokens=1, temperature=1.0, top_k=3)
    sampled = build_sampler("continuous_batching", model).generate(
        prompt, torch.ones_like(prompt), 8, settings
    )
    assert not sampled.untruncated
    with torch.no_grad():
        truncated = sampling_distribution(model(prompt).logits[0, -1], 1.0, 3, 1.0).log()
    torch.testing.assert_close(
        sampled.logprobs[:, 0].double(), truncated[sampled.ids[:, 0]], rtol=0, atol=2e-6
    )
