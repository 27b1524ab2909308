"""GRPOTrainer end to end on a tiny local Llama: the TRL-shaped call, the reward-function convention,
accumulation equivalence, the three policies (current / old / reference), callbacks and saving."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from fastppo import GRPOConfig, GRPOTrainer
from fastppo.config import ForwardPlan
from fastppo.demo import build_policy, build_tokenizer
from fastppo.policy_forward import PolicyForward

PROMPTS = [
    "say : cat",
    "say : dog",
    "say : red",
    "say : sun",
    "say : moon",
    "say : tree",
    "say : fish",
    "say : star",
]


# The run every test here starts from (grpo_config adds a quiet short run around it).
SHAPE = dict(
    per_device_train_batch_size=8, num_generations=4, max_completion_length=5, max_steps=2, learning_rate=1e-3
)


def length_reward(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def cat_reward(completions, **kwargs):
    return [1.0 if "cat" in c.split() else None for c in completions]  # None: not applicable


def dataset(n: int = 8):
    return datasets.Dataset.from_dict({"prompt": PROMPTS[:n]})


def test_trl_shaped_script_runs_end_to_end(model_dir, tmp_path):
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=[length_reward, cat_reward],
        args=GRPOConfig(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=5,
            max_steps=3,
            logging_steps=1,
            learning_rate=1e-3,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
    )
    output = trainer.train()
    assert output.global_step == 3 and output.training_loss == output.training_loss  # TrainOutput, not NaN
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3]
    expected = {
        "reward",
        "reward_std",
        "rewards/length_reward/mean",
        "rewards/cat_reward/mean",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "loss",
        "grad_norm",
        "learning_rate",
        "tokens/s",
        "ratio/mean",
    }
    assert expected <= logs[-1].keys()
    assert "kl" not in logs[-1]  # beta == 0: no reference, nothing to measure
    assert all(r["ratio/mean"] == 1.0 for r in logs)  # on-policy: first (and only) update per rollout
    with open(trainer.metrics_file) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    assert os.path.getsize(trainer.reward_plot) > 0

    out = str(tmp_path / "saved")
    trainer.save_model(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, p), q in zip(trainer.model.named_parameters(), reloaded.parameters(), strict=True):
        torch.testing.assert_close(p.detach().cpu(), q, rtol=0, atol=0, msg=name)
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(trained[n], p) for n, p in initial.named_parameters())  # it did train

    metrics = trainer.evaluate(eval_dataset=dataset(4))
    assert {
        "eval_reward",
        "eval_rewards/length_reward/mean",
        "eval_completions/mean_length",
    } <= metrics.keys()
    assert metrics["eval_reward"] >= metrics["eval_rewards/length_reward/mean"]  # cat_reward adds >= 0


def test_reward_functions_get_trls_calling_convention(model_dir, grpo_config, id_reward):
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, kwargs=kwargs)
        return [None] * len(prompts)  # all None: every completion unscorable -> advantage 0, no crash

    data = datasets.Dataset.from_dict({"prompt": PROMPTS[:2], "word": ["cat", "dog"]})
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=[spy, id_reward],
        args=grpo_config(SHAPE, max_steps=1),
        train_dataset=data,
    )
    trainer.train()
    assert len(seen["prompts"]) == len(seen["completions"]) == len(seen["completion_ids"]) == 8
    assert sorted(seen["kwargs"]["word"]) == ["cat"] * 4 + ["dog"] * 4  # columns repeated per completion
    assert seen["prompts"][:4] == [seen["prompts"][0]] * 4  # a prompt's group is consecutive
    assert {"trainer_state", "log_metric", "log_extra"} <= seen["kwargs"].keys()
    assert all(isinstance(c, str) for c in seen["completions"])


def test_chat_prompts_become_chat_completions(model_dir, grpo_config):
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [0.0] * len(prompts)

    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:2]]})
    GRPOTrainer(
        model=model_dir, reward_funcs=spy, args=grpo_config(SHAPE, max_steps=1), train_dataset=data
    ).train()
    assert seen["prompts"][0][0]["role"] == "user"
    assert seen["completions"][0][0]["role"] == "assistant"


@pytest.mark.parametrize(
    "reward, message",
    [
        (lambda completions, **k: [float("nan")] * len(completions), r"'<lambda>' returned nan for sample 0"),
        (lambda completions, **k: [1.0], r"returned 1 rewards for 8 completions"),
    ],
)
def test_bad_reward_output_names_function_and_sample(model_dir, reward, message, grpo_config):
    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=reward, args=grpo_config(SHAPE, max_steps=1), train_dataset=dataset(2)
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()


def run_one_step(
    tmp_path, grpo_config, id_reward, loss_type: str, batch: int, accumulation: int, **fields
) -> dict[str, torch.Tensor]:
    """One optimizer step with SGD(lr=1) and no clipping: the update *is* the summed gradient."""
    tokenizer = build_tokenizer()
    model = build_policy(tokenizer, seed=3, hidden_size=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = grpo_config(
        SHAPE,
        output_dir=str(tmp_path / f"{loss_type}-{batch}x{accumulation}" / "out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        loss_type=loss_type,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        beta=0.04,
        **fields,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=id_reward,
        args=args,
        train_dataset=dataset(),
        processing_class=tokenizer,
        optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None),
    )
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


# Every loss type whose normaliser is global (bnpo's is each minibatch's own), with its fields as
# TRL recommends them (the KL term is ratio-weighted: use_bias_correction_kl's default).
GLOBAL_NORMALISERS = {
    "grpo": {},
    "dr_grpo": {},
    "dapo": {},
    "cispo": {"epsilon_high": 5.0},
    "sapo": {},
    "luspo": {"importance_sampling_level": "sequence"},
    "vespo": {},
}


@pytest.mark.parametrize("loss_type", list(GLOBAL_NORMALISERS))
def test_accumulation_equivalence(tmp_path, loss_type, grpo_config, id_reward):
    """Batch 8 x accumulation 1 updates exactly like 4 x 2 (field note 5) for global normalisers."""
    fields = GLOBAL_NORMALISERS[loss_type]
    whole = run_one_step(tmp_path, grpo_config, id_reward, loss_type, 8, 1, **fields)
    split = run_one_step(tmp_path, grpo_config, id_reward, loss_type, 4, 2, **fields)
    assert any(d.abs().max() > 1e-4 for d in whole.values())
    for name, delta in whole.items():
        torch.testing.assert_close(split[name], delta, rtol=1e-4, atol=1e-7, msg=name)


def test_bnpo_normalises_per_minibatch(tmp_path, grpo_config, id_reward):
    """bnpo divides by each minibatch's own token count (TRL documents it): 8 x 1 != 4 x 2. This
    also shows the equivalence test above can fail."""
    whole = run_one_step(tmp_path, grpo_config, id_reward, "bnpo", 8, 1)
    split = run_one_step(tmp_path, grpo_config, id_reward, "bnpo", 4, 2)
    assert not all(torch.allclose(split[n], d, rtol=1e-4, atol=1e-7) for n, d in whole.items())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_recorded_old_logprobs_give_ratio_exactly_one_on_first_pass(model_dir, fused, grpo_config, id_reward):
    """num_iterations=2 records old log-probs at sampling time; the first pass over the same
    minibatches with the same weights must see ratio == 1 bit for bit (else the record drifts)."""
    args = grpo_config(
        SHAPE,
        num_iterations=2,
        use_fused_kernels=fused,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    assert args.records_old_logprobs
    trainer = GRPOTrainer(model=model_dir, reward_funcs=id_reward, args=args, train_dataset=dataset())
    scores = trainer._score(trainer._rollout([dict(prompt=p) for p in PROMPTS[:2]]))
    trainer._advantages(scores)
    forward = PolicyForward(ForwardPlan(fused=fused, chunk_bytes=1 << 20))
    for mb in scores.minibatches:
        assert mb.old_logprobs is not None
        _, stats = forward.policy_loss(trainer.model, mb, trainer.args.loss_settings())
        assert float(stats.ratio_mean) == 1.0


def test_old_logprobs_follow_trls_rule(grpo_config):
    cases = {(1, 1, 1): False, (2, 1, 1): True, (1, 2, 1): True, (2, 2, 2): True, (1, 2, 2): False}
    for (iterations, steps_per_generation, accumulation), expected in cases.items():
        args = grpo_config(
            SHAPE,
            num_iterations=iterations,
            steps_per_generation=steps_per_generation,
            gradient_accumulation_steps=accumulation,
        )
        assert args.records_old_logprobs is expected, (iterations, steps_per_generation, accumulation)


def test_reference_only_with_beta_and_kl_logged(model_dir, grpo_config, id_reward):
    no_ref = GRPOTrainer(
        model=model_dir, reward_funcs=id_reward, args=grpo_config(SHAPE, max_steps=1), train_dataset=dataset()
    )
    assert no_ref.reference is None
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        train_dataset=dataset(),
        args=grpo_config(
            SHAPE,
            beta=0.1,
            sync_ref_model=True,
            ref_model_sync_steps=2,
            ref_model_mixup_alpha=0.5,
            max_steps=2,
        ),
    )
    ref = trainer.reference.model
    assert not any(p.requires_grad for p in ref.parameters())
    initial = {n: p.detach().clone() for n, p in ref.named_parameters()}
    trainer.train()
    assert "kl" in trainer.state.log_history[0] and trainer.state.log_history[0]["kl"] == 0.0  # ref == policy
    assert trainer.state.log_history[1]["kl"] > 0
    # after the sync at step 2: ref = 0.5 * policy + 0.5 * initial ref
    for name, p in trainer.model.named_parameters():
        expected = 0.5 * p.detach() + 0.5 * initial[name]
        torch.testing.assert_close(dict(ref.named_parameters())[name], expected, rtol=1e-6, atol=1e-7)


def test_mask_truncated_completions(model_dir, grpo_config, id_reward):
    args = grpo_config(SHAPE, mask_truncated_completions=True, max_completion_length=2)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=id_reward, args=args, train_dataset=dataset())
    rollout = trainer._rollout([dict(prompt=p) for p in PROMPTS[:2]])
    assert rollout.is_truncated.any()
    for mb in trainer._score(rollout).minibatches:
        truncated = rollout.is_truncated[mb.rows]
        assert (mb.loss_mask[truncated] == 0).all()
        assert torch.equal(mb.loss_mask[~truncated], mb.completion_mask[~truncated])


def test_report_to_tensorboard_logs_every_logged_step_through_transformers_integration(
    model_dir, tmp_path, monkeypatch, grpo_config
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=length_reward,
        args=grpo_config(SHAPE, max_steps=3, report_to="tensorboard"),
        train_dataset=dataset(),
    )
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    rewards = events.Scalars("train/reward")
    logged = [r for r in trainer.state.log_history if "reward" in r]
    assert [e.step for e in rewards] == [r["step"] for r in logged] == [1, 2, 3]
    assert [e.value for e in rewards] == pytest.approx([r["reward"] for r in logged])
    assert "train/step" not in events.Tags()["scalars"]  # the step is the x axis, not a metric


def test_callbacks_see_the_run_and_can_stop_it(model_dir, grpo_config, id_reward):
    events = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            events.append("begin")

        def on_log(self, args, state, control, logs=None, **kwargs):
            assert "step" not in logs  # as from transformers' Trainer: the step is state.global_step
            events.append(("log", state.global_step))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            events.append("end")

    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=grpo_config(SHAPE, max_steps=5),
        train_dataset=dataset(),
        callbacks=[Recorder()],
    )
    trainer.train()
    assert trainer.state.global_step == 2
    # the last log: train()'s summary row, before on_train_end as in Trainer
    assert events == ["begin", ("log", 1), ("log", 2), ("log", 2), "end"]


def test_checkpoints_are_saved_and_rotated(model_dir, grpo_config, id_reward):
    args = grpo_config(SHAPE, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=2)
    GRPOTrainer(model=model_dir, reward_funcs=id_reward, args=args, train_dataset=dataset()).train()
    found = sorted(d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-"))
    assert found == ["checkpoint-2", "checkpoint-3"]
    assert os.path.isfile(os.path.join(args.output_dir, "checkpoint-3", "trainer_state.json"))
    with open(os.path.join(args.output_dir, "checkpoint-3", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 3  # the state of the step it is named after


def test_lora_policy_uses_adapter_disabled_reference(model_dir, grpo_config, id_reward):
    from peft import LoraConfig

    from fastppo.reference import AdapterDisabledReference

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=grpo_config(SHAPE, beta=0.1, max_steps=1),
        train_dataset=dataset(),
        peft_config=lora,
    )
    assert isinstance(trainer.reference, AdapterDisabledReference)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    assert trainer.state.log_history[0]["kl"] == 0.0  # LoRA B starts at zero: policy == base
    with pytest.raises(ValueError, match="sync_ref_model"):
        GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            train_dataset=dataset(),
            peft_config=lora,
            args=grpo_config(SHAPE, beta=0.1, sync_ref_model=True),
        )


def test_prompts_longer_than_max_prompt_length_are_cut_from_the_left(model_dir, grpo_config, id_reward):
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=grpo_config(SHAPE, max_prompt_length=2),
        train_dataset=dataset(),
    )
    rollout = trainer._rollout([dict(prompt="say : cat"), dict(prompt="cat")])
    assert rollout.num_truncated_prompts == 1
    assert rollout.prompt_ids.shape[1] == 2
    assert rollout.prompt_ids[0].tolist() == trainer.processing_class(": cat")["input_ids"]


def test_bad_inputs_fail_before_training(model_dir, tmp_path, grpo_config, id_reward):
    with pytest.raises(ValueError, match="does not exist"):
        GRPOTrainer(
            model=str(tmp_path / "missing-model"),
            reward_funcs=id_reward,
            args=grpo_config(SHAPE),
            train_dataset=dataset(),
        )
    with pytest.raises(ValueError, match="'prompt' column"):
        GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            args=grpo_config(SHAPE),
            train_dataset=datasets.Dataset.from_dict({"question": PROMPTS}),
        )
    with pytest.raises(ValueError, match="one rollout needs"):
        GRPOTrainer(
            model=model_dir, reward_funcs=id_reward, args=grpo_config(SHAPE), train_dataset=dataset(1)
        )
    with pytest.raises(ValueError, match="reward_weights has 2 entries"):
        GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            args=grpo_config(SHAPE, reward_weights=[1.0, 2.0]),
            train_dataset=dataset(),
        )
    with pytest.raises(ValueError, match="tools"):
        GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            args=grpo_config(SHAPE),
            train_dataset=dataset(),
            tools=[print],
        )


@pytest.mark.parametrize("steps_per_generation, accumulation, rollouts", [(2, 1, 1), (1, 2, 4), (1, 1, 2)])
def test_rollouts_and_optimizer_steps_line_up(
    model_dir, steps_per_generation, accumulation, rollouts, grpo_config, id_reward
):
    """Two optimizer steps: one rollout feeding both (2 minibatches per rollout, no accumulation),
    four rollouts (accumulation across two rollouts per step), or one rollout per step."""
    calls = []

    def counting(completion_ids, **kwargs):
        calls.append(len(completion_ids))
        return id_reward(completion_ids)

    args = grpo_config(
        SHAPE,
        per_device_train_batch_size=4,
        steps_per_generation=steps_per_generation,
        gradient_accumulation_steps=accumulation,
    )
    trainer = GRPOTrainer(model=model_dir, reward_funcs=counting, args=args, train_dataset=dataset())
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(calls) == rollouts and set(calls) == {4 * steps_per_generation}


def test_num_train_epochs_sets_the_step_count(model_dir, grpo_config, id_reward):
    # 8 prompts, 2 per rollout (8 completions / 4 generations), one step per rollout: 4 steps an epoch
    args = grpo_config(SHAPE, max_steps=-1, num_train_epochs=1)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=id_reward, args=args, train_dataset=dataset())
    assert trainer.train().global_step == 4


def test_greedy_evaluation(model_dir, grpo_config, id_reward):
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=id_reward,
        args=grpo_config(SHAPE, eval_do_sample=False),
        train_dataset=dataset(),
        eval_dataset=dataset(3),
    )
    first, second = trainer.evaluate(), trainer.evaluate()
    for timing in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"):
        first.pop(timing), second.pop(timing)
    assert first == second  # greedy: deterministic
    assert first["eval_completions/mean_length"] > 0


def test_sampled_evaluation_does_not_change_training(model_dir, tmp_path, grpo_config, id_reward):
    """Evaluation samples from a forked RNG: a run evaluating every step trains exactly as one that
    never evaluates (so a resumed run with eval_on_start matches an uninterrupted one)."""
    logged = []
    for evaluating in (False, True):
        schedule = dict(eval_strategy="steps", eval_steps=1, eval_on_start=True) if evaluating else {}
        args = grpo_config(
            SHAPE,
            output_dir=str(tmp_path / str(evaluating) / "out"),
            max_steps=2,
            per_device_eval_batch_size=4,
            **schedule,
        )
        trainer = GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            args=args,
            train_dataset=dataset(),
            eval_dataset=dataset(2),
        )
        trainer.train()
        logged.append([(r["loss"], r["reward"]) for r in trainer.state.log_history if "loss" in r])
    assert any("eval_reward" in r for r in trainer.state.log_history)
    assert logged[0] == logged[1]


def test_evaluation_during_training_is_logged_apart(model_dir, grpo_config, id_reward):
    args = grpo_config(SHAPE, eval_strategy="steps", eval_steps=1, max_steps=2, per_device_eval_batch_size=4)
    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=id_reward, args=args, train_dataset=dataset(), eval_dataset=dataset(2)
    )
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_reward" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all("loss" not in r and "reward" not in r for r in evals)  # training metrics stay in their records
