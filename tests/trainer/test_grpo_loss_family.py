"""TRL 1.16's loss family in GRPOTrainer (issue 19): every loss type and loss option trains, fused
exactly as plain, under TRL's metric names; the entropy bonus at TRL's scale under accumulation;
adaptive entropy control's rule, timing and exact resume; ``get_high_entropy_mask`` as TRL's.

Fused vs plain: the same rollout (one rollout feeds all four optimizer steps, so both sample it from
the same initial weights), then fp32 rounding of the chunked lm_head and its gradient pass only:
logged values to 1e-4 relative, weights to rtol 1e-4 / atol 1e-6 after four steps.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import datasets
import pytest
import torch

from fastppo import GRPOTrainer
from fastppo.config import ForwardPlan
from fastppo.demo import build_policy, build_tokenizer
from fastppo.policy_forward import PolicyForward, plain_token_logprobs

# One rollout of 4 prompts x 4 completions feeds 4 optimizer steps of one group each: old
# log-probs are recorded and the ratios leave 1 from step 2 on (clipping, gates, masks act).
SHAPE = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=5,
    steps_per_generation=4,
    max_steps=4,
    beta=0.04,
    max_grad_norm=0.0,
)
SGD_LR = 0.2
PROMPTS = ("say : cat", "say : dog", "say : sun", "say : red")
BASELINE = "dapo"
CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.01),  # a cap close to 1: some tokens reach it
    "sapo": dict(loss_type="sapo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "kl-uncorrected": dict(use_bias_correction_kl=False),
    "entropy-bonus": dict(entropy_coef=0.05),
    "adaptive-entropy": dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=100.0),
    "top-entropy": dict(top_entropy_quantile=0.5),
    "top-entropy-bonus": dict(top_entropy_quantile=0.5, entropy_coef=0.05),
    "off-policy-mask": dict(off_policy_mask_threshold=1e-4),
}
CLIP_METRICS = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
BONUS_METRICS = {"entropy_coef", "policy_loss"}


def expected_metrics(fields: dict) -> tuple[set[str], set[str]]:
    """(metrics each training record must have, metrics it must not) for a case, as TRL logs them."""
    loss_type = fields.get("loss_type", BASELINE)
    present, absent = {"loss", "entropy", "kl", "ratio/mean"}, set()
    clipped = loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    (present if clipped else absent).update(CLIP_METRICS)
    (present if loss_type == "cispo" else absent).add("cispo_clip_ratio")
    (present if loss_type == "vespo" else absent).add("vespo/phi_seq_mean")
    bonus = fields.get("entropy_coef", 0.0) != 0.0 or fields.get("use_adaptive_entropy", False)
    if bonus:
        present.update({"entropy_coef", "policy_loss"})
    else:
        absent.update(BONUS_METRICS)
    masked = "top_entropy_quantile" in fields
    (present if masked else absent).add("entropy_mask/kept_ratio")
    (present if "off_policy_mask_threshold" in fields else absent).add("off_policy_mask/kept_ratio")
    return present, absent


def build(grpo_config, id_reward, fused: bool = True, lr: float = SGD_LR, **fields) -> GRPOTrainer:
    """A trainer of SHAPE on a fresh tiny Llama, stepped by SGD: an update is then linear in the
    gradient, so two paths' updates differ by their gradients' rounding only (Adam's g / |g| would
    turn rounding in near-zero gradients into whole steps)."""
    tokenizer = build_tokenizer()
    model = build_policy(tokenizer, seed=0, hidden_size=32)
    return GRPOTrainer(
        model=model,
        reward_funcs=id_reward,
        args=grpo_config(SHAPE, use_fused_kernels=fused, **fields),
        train_dataset=datasets.Dataset.from_dict({"prompt": list(PROMPTS)}),
        processing_class=tokenizer,
        optimizers=(torch.optim.SGD(model.parameters(), lr=lr), None),
    )


def train(grpo_config, id_reward, fused: bool, **fields) -> tuple[list[dict], dict[str, torch.Tensor]]:
    trainer = build(grpo_config, id_reward, fused, **fields)
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    return records, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES))
def test_every_loss_type_and_option_trains_fused_as_plain(grpo_config, id_reward, case, device):
    """On the CPU the fused path is the chunked reference with its gradient pass; on a GPU (fp32,
    so the tolerances hold) it is the Triton kernels, single-pass where the settings are token-local."""
    on_device = dict(use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False)
    fields = dict(CASES[case], **on_device)
    fused_log, fused_weights = train(grpo_config, id_reward, True, **fields)
    plain_log, plain_weights = train(grpo_config, id_reward, False, **fields)
    assert [r["step"] for r in fused_log] == [1, 2, 3, 4]
    present, absent = expected_metrics(CASES[case])
    for fused, plain in zip(fused_log, plain_log, strict=True):
        assert present <= fused.keys() and not absent & fused.keys(), (
            present - fused.keys(),
            absent & fused.keys(),
        )
        assert fused.keys() == plain.keys()
        for name in present:
            assert fused[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-6), (name, fused["step"])
    for name, weight in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    last = plain_log[-1]
    assert last["ratio/mean"] != 1.0  # off-policy by step 4: the ratio-shaping branches act
    for kept in ("entropy_mask/kept_ratio", "off_policy_mask/kept_ratio"):  # masks drop some, not all
        if kept in present:
            assert 0 < sum(r[kept] for r in plain_log) / len(plain_log) < 1, kept
    if case != BASELINE:  # the option does something (the agreement above would hold if both ignored it)
        _, baseline = train(grpo_config, id_reward, False, **CASES[BASELINE], **on_device)
        assert any(not torch.allclose(plain_weights[n], w, rtol=1e-4, atol=1e-6) for n, w in baseline.items())


def records(trainer: GRPOTrainer) -> list[dict]:
    return [r for r in trainer.state.log_history if "loss" in r]


def spy_on_losses(trainer: GRPOTrainer) -> list[tuple]:
    """(minibatch, settings, stats) of every policy loss the trainer computes, in order."""
    seen, compute = [], trainer.policy_forward.policy_loss

    def policy_loss(model, batch, settings, gather=None):
        loss, stats = compute(model, batch, settings, gather)
        seen.append((batch, settings, stats))
        return loss, stats

    trainer.policy_forward.policy_loss = policy_loss
    return seen


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])  # loss scales 1 / accumulation and 1
def test_entropy_bonus_is_trls_mean_entropy_over_accumulation_steps(grpo_config, id_reward, loss_type):
    """TRL subtracts entropy_coef times each micro-batch's mean entropy over
    gradient_accumulation_steps, whatever the loss type's own normaliser: with SGD(lr=1) the bonus
    moves the weights by coef / accumulation times the sum of those means' gradients."""
    coef, accumulation = 0.1, 2
    fields = dict(
        loss_type=loss_type, gradient_accumulation_steps=accumulation, steps_per_generation=2, max_steps=1
    )
    moved, batches = {}, []
    for bonus in (coef, 0.0):
        trainer = build(grpo_config, id_reward, lr=1.0, entropy_coef=bonus, **fields)
        seen = spy_on_losses(trainer)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        moved[bonus] = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
        batches = [batch for batch, _, _ in seen]
    assert len(batches) == accumulation and batches[0].loss_mask.sum() != batches[1].loss_mask.sum()
    policy = build_policy(build_tokenizer(), seed=0, hidden_size=32)  # the weights both losses saw
    forward = PolicyForward(ForwardPlan(fused=False))
    for batch in batches:
        logits = forward.run(policy, batch).logits
        _, entropy = plain_token_logprobs(logits, batch.completion_ids, 1.0, with_entropy=True)
        mask = batch.loss_mask.float()
        ((entropy * mask).sum() / mask.sum()).backward()  # accumulates over the micro-batches
    for name, param in policy.named_parameters():
        expected = coef / accumulation * param.grad
        torch.testing.assert_close(moved[coef][name] - moved[0.0][name], expected, rtol=1e-3, atol=1e-6)


ADAPTIVE = dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_coef_delta=0.03)


def test_adaptive_entropy_rises_below_the_target_and_applies_from_the_second_step(grpo_config, id_reward):
    """TRL's rule and timing: no bonus in the first window (no measurement yet); each optimizer step
    moves the coefficient one delta up (entropy below the target), capped at the maximum; every
    window applies the coefficient the step before it left."""
    trainer = build(grpo_config, id_reward, **ADAPTIVE, entropy_coef_max=0.1, entropy_target=100.0)
    trainer.train()
    logged = records(trainer)
    assert [r["entropy_coef"] for r in logged] == pytest.approx([0.08, 0.1, 0.1, 0.1])
    for record, applied in zip(logged, [0.0, 0.08, 0.1, 0.1], strict=True):
        # one micro-batch per step of dapo: loss = policy_loss - applied * that micro-batch's entropy
        bonus = record["policy_loss"] - record["loss"]
        assert bonus == pytest.approx(applied * record["entropy"], rel=1e-5, abs=1e-9), record["step"]


def test_adaptive_entropy_falls_above_the_target_and_applies_nothing(grpo_config, id_reward):
    trainer = build(grpo_config, id_reward, **ADAPTIVE, entropy_coef_min=0.0, entropy_target=0.0)
    trainer.train()
    logged = records(trainer)
    assert [r["entropy_coef"] for r in logged] == pytest.approx([0.02, 0.0, 0.0, 0.0])
    assert all(r["policy_loss"] == r["loss"] for r in logged)  # above the target: never applied
    without = build(grpo_config, id_reward)
    without.train()
    assert [r["loss"] for r in records(without)] == [r["loss"] for r in logged]


def test_adaptive_entropy_measures_the_whole_window_over_its_tokens(grpo_config, id_reward):
    """The controller's entropy is the token-weighted mean over every micro-batch of the window, not
    the last micro-batch's (TRL accumulates sums and counts over the window)."""
    trainer = build(
        grpo_config, id_reward, **ADAPTIVE, gradient_accumulation_steps=2, steps_per_generation=2, max_steps=1
    )
    seen = spy_on_losses(trainer)
    trainer.train()
    means = [float(stats.entropy_mean) for _, _, stats in seen]
    tokens = [float(batch.loss_mask.sum()) for batch, _, _ in seen]
    assert len(seen) == 2 and tokens[0] != tokens[1] and means[0] != means[1]
    window = sum(m * n for m, n in zip(means, tokens, strict=True)) / sum(tokens)
    assert trainer.entropy_control.last_world_entropy == pytest.approx(window, rel=1e-6)
    assert trainer.entropy_control.last_world_entropy != pytest.approx(means[-1], rel=1e-6)


def test_adaptive_entropy_with_the_high_entropy_mask_measures_the_kept_tokens(grpo_config, id_reward):
    """With top_entropy_quantile < 1 the bonus acts on the kept tokens only, and the controller
    measures their mean entropy (TRL's effective_mask), not all tokens'; policy_loss adds back
    the bonus over those tokens."""
    trainer = build(
        grpo_config, id_reward, **ADAPTIVE, top_entropy_quantile=0.3, entropy_target=100.0, max_steps=2
    )
    seen = spy_on_losses(trainer)
    trainer.train()
    kept = [float(stats.acting_entropy_mean) for _, _, stats in seen]
    everyone = [float(stats.entropy_mean) for _, _, stats in seen]
    assert all(k > e for k, e in zip(kept, everyone, strict=True))  # the top 30% by entropy
    assert trainer.entropy_control.last_world_entropy == pytest.approx(kept[-1], rel=1e-6)
    logged = records(trainer)
    assert logged[1]["policy_loss"] - logged[1]["loss"] == pytest.approx(0.08 * kept[1], rel=1e-5)


def test_adaptive_entropy_resumes_exactly(grpo_config, id_reward):
    """A run resumed from its step-2 checkpoint (inside the rollout) logs steps 3 and 4 as the
    uninterrupted run: the coefficient and the last measurement travel in the checkpoint."""
    fields = dict(**ADAPTIVE, entropy_target=100.0, save_strategy="steps", save_steps=2)
    full = build(grpo_config, id_reward, **fields)
    full.train()
    resumed = build(grpo_config, id_reward, **fields)
    resumed.train(resume_from_checkpoint=os.path.join(full.args.output_dir, "checkpoint-2"))
    assert resumed.entropy_control.state_dict() == full.entropy_control.state_dict()
    expected, got = records(full)[2:], records(resumed)[2:]
    assert [r["step"] for r in got] == [3, 4]
    for want, have in zip(expected, got, strict=True):
        for name in ("loss", "policy_loss", "entropy_coef", "entropy", "grad_norm"):
            assert have[name] == pytest.approx(want[name], rel=1e-6), (name, have["step"])


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8, 1.0])
def test_get_high_entropy_mask_is_trls(threshold):
    """Over non-pad tokens only, ties at the threshold kept, nothing kept when all are masked."""
    trl_trainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    one_process = SimpleNamespace(
        accelerator=SimpleNamespace(pad_across_processes=lambda x, dim=0, pad_index=0: x, gather=lambda x: x)
    )
    g = torch.Generator().manual_seed(0)
    entropies = 3 * torch.rand(4, 6, generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    entropies[mask == 0] = 9.0  # padding with the highest entropy must never count or be kept
    for case, m in (("random", mask), ("ties", mask), ("all masked", torch.zeros_like(mask))):
        e = entropies.round() if case == "ties" else entropies
        want = trl_trainer.get_high_entropy_mask(one_process, e, m, threshold)
        got = GRPOTrainer.get_high_entropy_mask(e, m, threshold)
        assert got.dtype == torch.bool and torch.equal(got, want), case
        assert not got[m == 0].any()
