"""``train()`` ends as transformers' Trainer does (``_finalize_training``), for GRPO and PPO: it
returns ``TrainOutput(global_step, training_loss, metrics)`` and logs HF's summary row to
``state.log_history`` and the callbacks' ``on_log``; ``training_loss`` is the mean step loss over the
steps that call trained (a resumed run: those after its checkpoint). metrics.jsonl keeps one record
per logged step."""

from __future__ import annotations

import json
import os

import pytest
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from fastppo import PPOTrainer
from fastppo.demo import build_dataset, build_policy, build_tokenizer, says_word

# The keys of HF Trainer's summary row (total_flos: 0, fastppo counts no FLOPs, as TRL's GRPO
# whose inputs have no input_ids for transformers' estimate).
HF_SUMMARY = {
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "total_flos",
    "train_loss",
    "epoch",
    "step",
}


class LogSpy(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def check_summary(trainer, output: TrainOutput, spy: LogSpy, steps: int, samples_per_step: int) -> None:
    *records, summary = trainer.state.log_history
    assert summary.keys() == HF_SUMMARY and summary["step"] == steps and summary["total_flos"] == 0
    losses = [r["loss"] for r in records if "loss" in r]  # logging_steps=1: one per step
    assert len(losses) == steps
    assert isinstance(output, TrainOutput) and output.global_step == steps
    assert output.training_loss == summary["train_loss"] == pytest.approx(sum(losses) / steps, rel=1e-6)
    assert output.metrics == {k: v for k, v in summary.items() if k != "step"}
    assert spy.logs[-1] == output.metrics  # on_log saw it, as from Trainer.log
    runtime = summary["train_runtime"]
    assert summary["train_steps_per_second"] == pytest.approx(steps / runtime, rel=1e-2)
    assert summary["train_samples_per_second"] == pytest.approx(steps * samples_per_step / runtime, rel=1e-2)
    with open(os.path.join(trainer.args.output_dir, "metrics.jsonl")) as f:
        written = [json.loads(line) for line in f]
    assert written == records  # the summary row is not a step's record


def test_grpo_train_returns_and_logs_hf_summary(grpo_trainer):
    trainer = grpo_trainer(max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    spy = LogSpy()
    trainer.add_callback(spy)
    output = trainer.train()
    check_summary(trainer, output, spy, steps=3, samples_per_step=4 * 2)
    assert trainer.reward_plot is not None and os.path.exists(trainer.reward_plot)


def test_ppo_train_returns_and_logs_hf_summary(ppo_config):
    tokenizer = build_tokenizer()
    args = ppo_config(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=1,
        response_length=4,
        max_steps=2,
    )
    spy = LogSpy()
    trainer = PPOTrainer(
        args,
        tokenizer,
        build_policy(tokenizer, seed=1),
        reward_model=says_word,
        train_dataset=build_dataset(size=16, seed=2),
        callbacks=[spy],
    )
    output = trainer.train()
    check_summary(trainer, output, spy, steps=2, samples_per_step=4 * 2)


def test_a_resumed_run_reports_the_mean_loss_of_its_own_steps(grpo_trainer):
    """As HF: the resumed train() call's training_loss is over the steps it trained (3 and 4), not
    the checkpoint's steps 1 and 2."""

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    run = dict(max_steps=4, save_strategy="steps", save_steps=2)
    first = grpo_trainer(**run)
    first.add_callback(StopAtTwo)
    assert first.train().global_step == 2
    resumed = grpo_trainer(**run)
    output = resumed.train(resume_from_checkpoint=True)
    losses = {r["step"]: r["loss"] for r in resumed.state.log_history if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    assert output.training_loss == pytest.approx((losses[3] + losses[4]) / 2, rel=1e-6)
    assert resumed.state.log_history[-1]["train_loss"] == output.training_loss
    assert resumed.state.log_history[-1]["train_steps_per_second"] == pytest.approx(
        2 / resumed.state.log_history[-1]["train_runtime"], rel=1e-2
    )


def test_a_log_override_written_for_hf_trainer_keeps_training_records(grpo_trainer):
    """A subclass with HF Trainer's signature, ``log(self, logs, start_time=None)`` calling
    ``super().log(logs, start_time)``, must still get the training metrics added (start_time None
    once read as training=False)."""
    from fastppo import GRPOTrainer

    class Tagged(GRPOTrainer):
        def log(self, logs, start_time=None):
            super().log({**logs, "tag": 1.0}, start_time)

    trainer = grpo_trainer(max_steps=2, logging_steps=1, cls=Tagged)
    trainer.train()
    steps = [r for r in trainer.state.log_history if "tag" in r and "train_loss" not in r]
    assert len(steps) == 2 and all("loss" in r and "learning_rate" in r for r in steps)
