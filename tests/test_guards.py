"""Numeric guards: a non-finite loss or gradient norm skips the optimizer step (weights, optimizer
state and learning-rate schedule untouched), is counted as ``skipped_steps``, and a streak of
``max_consecutive_nonfinite_steps`` stops training with a message naming the step and the causes."""

from __future__ import annotations

import math

import pytest
import torch

from fastppo.guards import NonFiniteGuard, NonFiniteTrainingError

NAN, INF = float("nan"), float("inf")


# grpo_trainer's run, on two prompts and for four optimizer steps.
PROMPTS = ("say : cat", "say : dog")


def drive(trainer, steps: int, poison: dict[int, str]) -> list[dict[str, torch.Tensor]]:
    """Train ``steps`` optimizer steps on a fixed batch through the base's backward / optimizer_step /
    after_step (one micro-batch per step);
    ``poison[step]`` = "loss" (NaN loss) or "grad" (finite loss, inf gradient on one weight).
    Returns the weights after each step."""
    trainer.begin_training(steps, "guard")
    batch = torch.tensor([[2, 3, 4, 5, 6]])
    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    after = []
    for step in range(1, steps + 1):
        handle = weight.register_hook(lambda g: g * INF) if poison.get(step) == "grad" else None
        loss = trainer.model(input_ids=batch).logits.float().logsumexp(-1).mean()
        if poison.get(step) == "loss":
            loss = loss * NAN
        trainer.backward(loss)
        if handle is not None:
            handle.remove()
        trainer.optimizer_step()
        stop = trainer.after_step()
        after.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        if stop:
            break
    return after


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_nonfinite_step_is_skipped_and_counted(kind, grpo_trainer):
    trainer = grpo_trainer(prompts=PROMPTS, max_steps=4)
    after = drive(trainer, 4, {2: kind})
    for name, value in after[1].items():
        assert torch.equal(value, after[0][name]), name  # step 2 changed nothing
        assert torch.isfinite(value).all(), name
    assert any(not torch.equal(after[2][n], after[1][n]) for n in after[1])  # step 3 trained again
    assert trainer.state.global_step == 4
    assert trainer.lr_scheduler.scheduler.last_epoch == 3  # the schedule counts applied updates only
    logs = {r["step"]: r for r in trainer.state.log_history}
    assert [logs[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(math.isfinite(logs[s]["loss"]) for s in (1, 3, 4))
    assert "loss" not in logs[2] if kind == "loss" else math.isfinite(logs[2]["loss"])
    assert trainer.guard.consecutive == 0 and trainer.guard.skipped == 1


def test_a_streak_stops_training_with_the_causes(grpo_trainer):
    trainer = grpo_trainer(prompts=PROMPTS, max_steps=4, max_consecutive_nonfinite_steps=2)
    with pytest.raises(NonFiniteTrainingError) as info:
        drive(trainer, 4, {2: "grad", 3: "loss", 4: "loss"})
    message = str(info.value)
    assert "optimizer step 3" in message and "2 steps in a row" in message and "loss nan" in message
    for cause in (
        "learning rate",
        "NaN/inf",
        "skip_invalid_rewards",
        "fp16",
        "max_consecutive_nonfinite_steps",
    ):
        assert cause in message


def test_guard_policy_unit():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(1.0, 2.0, step=1).apply
    assert not guard.check(NAN, 1.0, step=2).apply
    assert not guard.check(1.0, INF, step=3).apply
    assert guard.check(1.0, 1.0, step=4).apply and guard.consecutive == 0  # a good step ends the streak
    # fp16: a finite loss with an inf gradient is loss-scale overflow, handled by the GradScaler
    for step in range(5, 15):
        verdict = guard.check(1.0, INF, step=step, scaler_overflow_ok=True)
        assert not verdict.apply and "overflow" in verdict.reason
    assert guard.consecutive == 0 and guard.skipped == 12
    guard.check(NAN, NAN, step=15, scaler_overflow_ok=True)  # a NaN loss is never overflow
    guard.check(-INF, 1.0, step=16)
    with pytest.raises(NonFiniteTrainingError, match=r"step 17: 3 steps in a row had a non-finite loss nan"):
        guard.check(NAN, 1.0, step=17)
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.consecutive, restored.skipped) == (3, 15)


def test_grpo_run_with_poisoned_gradients_stops(grpo_trainer):
    """End to end: every gradient poisoned -> GRPO stops at step 3 (default limit) with finite weights."""
    trainer = grpo_trainer(prompts=PROMPTS, max_steps=5)
    trainer.model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * NAN)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteTrainingError, match="optimizer step 3"):
        trainer.train()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name
