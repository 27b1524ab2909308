"""A short GRPO run on the demo task, for tests/test_multiprocess.py: started once as one process and
once under ``accelerate launch --num_processes 2 --cpu`` with the same global batch.

Sampling is made independent of how rows are split across processes (a deterministic sampler: each
completion is a function of its prompt and its index in the group), so both runs train on the very
same completions and must agree on every logged loss and on the final weights.

PPO (``ALGO=ppo``) whitens advantages per process, as legacy TRL did, so it is not expected to equal
one process; every process must still end with the same weights (the gradients are averaged).

PHASE (GRPO: 4 steps of 2 passes over each rollout; PPO: the 4 steps of one rollout): ``full`` runs
them all; ``first`` stops after step 1, inside a rollout, with a checkpoint there; ``second`` resumes
from it. ``first`` then ``second`` must log what ``full`` logs.

Environment: ``SHARDED=1`` trains with ``fsdp=True`` (FSDP2 over the processes);
``SAMPLER=generate`` samples with ``model.generate`` instead (each process draws its own rows from its
own RNG, so a sharded and an unsharded two-process run sample the same completions).
``VALUE_MODEL=1`` gives PPO a separate value model (a sequence-classification Llama) as its critic.
``REWARD_MODEL=1`` scores with a sequence-classification Llama too (GRPO: beside the demo's reward
function; PPO: instead of it).
``NAN_ON_RANK1=1`` makes process 1's first GRPO minibatch loss NaN (process 0's stays finite).
``LOSS_OPTIONS`` (GRPO) adds TRL's loss options that read the batch across processes:
``top_entropy`` (the entropy quantile over every process's tokens) or ``adaptive_entropy`` (the
controller's entropy over every process; a target of 0 keeps the bonus off, so the runs train alike
and only the measurement is compared); the summary holds the controller's state.

After training, every run evaluates 11 prompts (an uneven split: the last process's share is padded);
``eval-<rank>.json`` holds what each process's ``evaluate()`` returned.

Usage: python data_parallel_run.py OUT_DIR PER_DEVICE_BATCH [grpo|ppo] [PHASE]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.distributed.tensor import DTensor
from transformers import LlamaForSequenceClassification, TrainerCallback

from fastppo import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
from fastppo.demo import build_dataset, build_policy, build_tokenizer, says_word
from fastppo.sharding import is_sharded

NUM_GENERATIONS = 4
EVAL_PROMPTS = 11  # not a multiple of the process count


class PromptHashSampler:
    """Completion ``j`` of a prompt: ``[(last prompt token + j) % V, (3 * last + j) % V, eos]``."""

    def __init__(self, vocab_size: int, eos_id: int):
        self.vocab_size, self.eos_id = vocab_size, eos_id

    def generate(self, prompt_ids, prompt_mask, n, settings):
        last = prompt_ids[:, -1].repeat_interleave(n)  # [P * n]
        j = torch.arange(n, device=prompt_ids.device).repeat(prompt_ids.shape[0])
        first = (last + j) % self.vocab_size
        second = (3 * last + j) % self.vocab_size
        eos = torch.full_like(first, self.eos_id)
        return torch.stack([first, second, eos], dim=1)


def sequence_classifier(policy, seed: int) -> LlamaForSequenceClassification:
    """A random one-output sequence-classification Llama of the policy's shape (no pad id set)."""
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(
        policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1, "pad_token_id": None})
    )


LOSS_OPTIONS = {
    "": {},
    "top_entropy": dict(top_entropy_quantile=0.5),
    "adaptive_entropy": dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=0.0),
}


def grpo_trainer(out_dir: str, per_device_batch: int, tokenizer, sampler, phase: str = "") -> GRPOTrainer:
    resume_test = dict(
        num_iterations=2,
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        sync_ref_model=True,
        ref_model_sync_steps=1,
    )  # the reference changes every step, so its (per-process, when sharded) weights must resume too
    resume_test = resume_test if phase else {}
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        num_generations=NUM_GENERATIONS,
        learning_rate=1e-2,
        beta=0.01,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        fsdp=os.environ.get("SHARDED") == "1",
        **{"max_completion_length": 3, "max_steps": 3, "save_strategy": "no", **resume_test},
        **LOSS_OPTIONS[os.environ.get("LOSS_OPTIONS", "")],
    )
    policy = build_policy(tokenizer, seed=0)
    with_model = os.environ.get("REWARD_MODEL") == "1"
    return GRPOTrainer(
        model=policy,
        reward_funcs=[says_word, sequence_classifier(policy, seed=2)] if with_model else says_word,
        reward_processing_classes=[None, tokenizer] if with_model else None,
        args=config,
        train_dataset=build_dataset(size=64, seed=0),
        eval_dataset=build_dataset(size=EVAL_PROMPTS, seed=1),
        processing_class=tokenizer,
        sampler=sampler,
    )


def ppo_trainer(out_dir: str, per_device_batch: int, tokenizer, sampler, phase: str = "") -> PPOTrainer:
    resume_test = dict(save_strategy="steps", save_steps=1) if phase else {}
    config = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_ppo_epochs=2,
        response_length=3,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        fsdp=os.environ.get("SHARDED") == "1",
        **{"save_strategy": "no", **resume_test},
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    policy = build_policy(tokenizer, seed=0)
    value_model = sequence_classifier(policy, seed=1) if os.environ.get("VALUE_MODEL") == "1" else None
    reward_model = sequence_classifier(policy, seed=2) if os.environ.get("REWARD_MODEL") == "1" else says_word
    return PPOTrainer(
        config,
        tokenizer,
        policy,
        reward_model=reward_model,
        train_dataset=build_dataset(size=64, seed=0),
        eval_dataset=build_dataset(size=EVAL_PROMPTS, seed=1),
        sampler=sampler,
        value_model=value_model,
    )


class StopAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def poison_first_loss_on_rank1(trainer: GRPOTrainer) -> None:
    clean, calls = trainer.policy_forward.policy_loss, []

    def policy_loss(*args, **kwargs):
        loss, stats = clean(*args, **kwargs)
        calls.append(None)
        if os.environ.get("RANK") == "1" and len(calls) == 1:
            loss = loss * float("nan")
        return loss, stats

    trainer.policy_forward.policy_loss = policy_loss


def main(out_dir: str, per_device_batch: int, algo: str, phase: str) -> None:
    tokenizer = build_tokenizer()
    sampler = (
        None
        if os.environ.get("SAMPLER") == "generate"
        else PromptHashSampler(len(tokenizer), tokenizer.eos_token_id)
    )
    if algo == "grpo":
        trainer = grpo_trainer(out_dir, per_device_batch, tokenizer, sampler, phase)
    else:
        trainer = ppo_trainer(out_dir, per_device_batch, tokenizer, sampler, phase)
    if os.environ.get("NAN_ON_RANK1") == "1":
        poison_first_loss_on_rank1(trainer)
    if phase == "first":
        trainer.add_callback(StopAfterFirstStep)
    trainer.train(resume_from_checkpoint=phase == "second")
    evaluation = trainer.evaluate()
    modules = trainer.trained_modules()
    whole = [p.full_tensor() if isinstance(p, DTensor) else p for m in modules for p in m.parameters()]
    checksum = sum(float(p.detach().double().sum()) for p in whole)
    rank = trainer.accelerator.process_index
    with open(f"{out_dir}/checksum-{rank}.json", "w") as f:
        json.dump(checksum, f)
    with open(f"{out_dir}/eval-{rank}.json", "w") as f:
        json.dump(evaluation, f)
    if trainer.accelerator.is_main_process:
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        reward_key = "reward" if algo == "grpo" else "objective/scores"
        rewards = [r[reward_key] for r in trainer.state.log_history if reward_key in r]
        with open(f"{out_dir}/summary.json", "w") as f:
            sharded = sum(is_sharded(m) for m in modules)  # trained modules sharded: policy, value model
            scorers = (
                [trainer.reward_model] if algo == "ppo" and trainer.reward_model else trainer.rewards.models()
            )
            skipped = trainer.guard.skipped
            json.dump(
                {
                    "losses": losses,
                    "rewards": rewards,
                    "checksum": checksum,
                    "sharded": sharded,
                    "reward_models_sharded": sum(is_sharded(m) for m in scorers),
                    "skipped": skipped,
                    "entropy_control": trainer.entropy_control.state_dict() if algo == "grpo" else None,
                },
                f,
            )
    trainer.accelerator.wait_for_everyone()  # no process tears down while another still communicates
    trainer.accelerator.end_training()  # the process group is destroyed before the interpreter exits


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(sys.argv[3:] + ["grpo", ""][len(sys.argv) - 3 :]))
    # Everything is written and the process group destroyed. Skip interpreter finalization, where
    # gloo's worker threads occasionally abort the process (SIGABRT, "terminate called without an
    # active exception"; pytorch/pytorch#179291) after a sharded run under load.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
