"""PPOTrainer end to end on the embedded task's tiny Llama: fused and plain paths agree, the first
update's ratio is exactly 1, the score rises, critics and inputs of every documented kind work.

Tolerances (fp32 on CPU): the fused path computes log-probs chunk by chunk from hidden states, the
plain path from full logits; both in fp32, so losses agree to 1e-5 relative and gradients to 1e-4 of
their largest entry (accumulation order differs).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from fastppo import PPOTrainer
from fastppo.batch import PolicyBatch
from fastppo.critic import OwnLayersCritic, SeparateValueModel, clipped_value_loss
from fastppo.data import PromptBatches
from fastppo.demo import build_dataset, build_policy, build_tokenizer, run_demo, says_word
from fastppo.policy_forward import PolicyForward
from fastppo.reference import SharedTrunkReference
from fastppo.reward_model import completion_scores
from fastppo.rollout import concat_rollouts
from fastppo.trainer.ppo import EpochPasses

# The run every test here starts from (ppo_config adds a quiet short run around it).
SHAPE = dict(
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    num_mini_batches=2,
    num_ppo_epochs=2,
    response_length=4,
    temperature=1.0,
    kl_coef=0.05,
    learning_rate=1e-3,
    max_steps=2,
    seed=3,
)


@pytest.fixture
def trainer(ppo_config):
    """``trainer(tokenizer=None, *, policy=None, reward_model=says_word, train_dataset=None, **options)``:
    PPO of this file's run on the demo task (its tiny Llama unless ``policy``); ``options`` are
    PPOTrainer's ``value_model`` / ``optimizers`` / ``eval_dataset`` or PPOConfig fields."""

    def make(
        tokenizer=None, *, policy=None, reward_model=says_word, train_dataset=None, **options
    ) -> PPOTrainer:
        tokenizer = tokenizer or build_tokenizer()
        given = {k: options.pop(k) for k in ("value_model", "optimizers", "eval_dataset") if k in options}
        return PPOTrainer(
            ppo_config(SHAPE, **options),
            tokenizer,
            policy if policy is not None else build_policy(tokenizer, seed=1),
            reward_model=reward_model,
            train_dataset=train_dataset if train_dataset is not None else build_dataset(size=32, seed=2),
            **given,
        )

    return make


@pytest.fixture
def value_model(tiny_model):
    """``value_model(tokenizer)``: a one-layer sequence-classification Llama of the tokenizer's
    vocabulary (seed 5): a separate critic, or a reward model."""

    def build(tokenizer) -> torch.nn.Module:
        torch.manual_seed(5)
        return tiny_model(
            head="sequence_classification", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
        )

    return build


def use_path(t: PPOTrainer, fused: bool) -> None:
    """The policy's forwards fused or plain from now on (the reference keeps the path it was built with)."""
    t.policy_forward = PolicyForward(dataclasses.replace(t.policy_forward.plan, fused=fused))


def loss_and_grads(t: PPOTrainer, record, fused: bool):
    """One micro-batch's PPO loss (policy + vf_coef * value) and the gradient of every trained tensor."""
    use_path(t, fused)
    mb = record.batch.select(torch.arange(8))
    for module in t.trained_modules():
        module.zero_grad(set_to_none=True)
    pg_loss, stats, values = t._loss_and_values(mb)
    width = mb.completion_ids.shape[1]
    vloss = clipped_value_loss(
        values, record.values[mb.rows, :width], record.returns[mb.rows, :width], mb.loss_mask, 0.2
    )
    loss = pg_loss + t.args.vf_coef * vloss.loss
    loss.backward()
    grads = {
        name: p.grad.clone()
        for module in t.trained_modules()
        for name, p in module.named_parameters()
        if p.grad is not None
    }
    return loss.detach(), stats, grads


@pytest.mark.parametrize(
    "critic, memory",
    [
        ("policy_head", {}),
        ("value_model", {}),
        ("own_layers", {"num_frozen_layers": 1}),  # shared-trunk reference and critic, one trunk pass
        ("policy_head", {"num_frozen_layers": 1, "padding_free": True}),
    ],
)
def test_fused_and_plain_paths_give_the_same_record_loss_and_gradients(critic, memory, value_model, trainer):
    tokenizer = build_tokenizer()
    own = {"critic": "own_layers"} if critic == "own_layers" else {}
    critic_model = value_model(tokenizer) if critic == "value_model" else None
    t = trainer(tokenizer, value_model=critic_model, **memory, **own)
    if memory:
        assert isinstance(t.reference, SharedTrunkReference)
    if critic == "own_layers":
        assert isinstance(t.critic, OwnLayersCritic)
    rollout = t._rollout([t.train_dataset[i] for i in range(16)])
    records = {}
    for fused in (True, False):
        use_path(t, fused)
        records[fused] = t._record(rollout)
        t._rewards_and_advantages(records[fused])
    for name in ("values", "returns", "kl"):
        torch.testing.assert_close(
            getattr(records[True], name), getattr(records[False], name), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(
        records[True].batch.old_logprobs, records[False].batch.old_logprobs, rtol=1e-5, atol=1e-5
    )
    loss_f, stats_f, grads_f = loss_and_grads(t, records[True], fused=True)
    loss_p, stats_p, grads_p = loss_and_grads(t, records[True], fused=False)
    assert torch.isfinite(loss_f) and loss_f != 0
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_f.entropy_mean, stats_p.entropy_mean, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) > 5
    for name, grad in grads_f.items():
        scale = max(grad.abs().max().item(), 1e-12)
        assert (grad - grads_p[name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("fused", [True, False])
def test_first_update_ratio_is_exactly_one(fused, trainer):
    """Old log-probs are recorded by the weights that sampled, in other chunks than the training
    minibatches (16 vs 8 rows): on the first minibatch the ratio must be 1 to float rounding."""
    t = trainer(
        use_fused_kernels=fused,
        local_rollout_forward_batch_size=16,
        max_steps=1,
        learning_rate=0.5,  # a large step: any later minibatch would show a ratio far from 1
    )
    t.train()
    first = t.state.log_history[0]
    assert first["step"] == 1
    assert abs(first["val/ratio"] - 1.0) < 1e-6
    assert first["policy/approxkl_avg"] < 1e-12
    assert first["policy/clipfrac_avg"] == 0.0


def test_metrics_carry_legacy_trl_names(trainer):
    t = trainer(max_steps=2, logging_steps=2)  # one record over two minibatches
    t.train()
    record, _summary = t.state.log_history  # the step's record, then train()'s summary row
    legacy = (
        "objective/kl objective/entropy objective/non_score_reward objective/rlhf_reward objective/scores "
        "policy/approxkl_avg policy/clipfrac_avg loss/policy_avg loss/value_avg val/clipfrac_avg "
        "policy/entropy_avg val/ratio val/ratio_var val/num_eos_tokens lr episode val/explained_variance"
    ).split()
    missing = [name for name in legacy if name not in record]
    assert not missing, missing
    assert record["episode"] == 16 and record["objective/kl"] >= -1e-6
    assert record["objective/rlhf_reward"] == pytest.approx(
        record["objective/scores"] + record["objective/non_score_reward"]
    )


@pytest.mark.slow  # learning: 100 PPO steps
def test_score_rises_on_the_demo_task(tmp_path):
    summary = run_demo(output_dir=str(tmp_path), algo="ppo", max_steps=100, progress=False)
    assert summary["reward_start"] < 0.45
    assert summary["reward_end"] > summary["reward_start"] + 0.25
    assert os.path.getsize(summary["reward_plot"]) > 0  # the curve of objective/scores


def test_separate_value_model_trains_and_is_saved(tmp_path, value_model, trainer):
    tokenizer = build_tokenizer()
    critic = value_model(tokenizer)
    before = critic.score.weight.detach().clone()
    t = trainer(tokenizer, value_model=critic, max_steps=2)
    assert isinstance(t.critic, SeparateValueModel)
    t.train()
    assert not torch.equal(before, critic.score.weight)  # in the optimizer, and stepped
    t.save_model()
    assert os.path.isdir(tmp_path / "value_model")
    assert os.path.isfile(tmp_path / "config.json")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "value_model")  # the trained critic
    for (name, want), got in zip(critic.state_dict().items(), saved.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_value_head_is_saved_next_to_the_policy(tmp_path, trainer):
    t = trainer(max_steps=1)
    t.train()
    t.save_model()
    assert os.path.isfile(tmp_path / "value_head.safetensors")
    saved = load_file(tmp_path / "value_head.safetensors")  # the trained head, not a fresh one
    assert saved.keys() == t.critic.head.state_dict().keys()
    for name, want in t.critic.head.state_dict().items():
        torch.testing.assert_close(saved[name], want, rtol=0, atol=0, msg=name)


def test_tokenised_input_ids_dataset_and_reward_model(value_model, trainer):
    """Legacy TRL datasets hold tokenised prompts; the reward may be a sequence-classification model."""
    from datasets import Dataset

    tokenizer = build_tokenizer()
    prompts = build_dataset(size=16, seed=2)["prompt"]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    t = trainer(
        tokenizer,
        reward_model=value_model(tokenizer),
        train_dataset=dataset,
        max_steps=1,
        per_device_train_batch_size=4,
    )
    t.train()
    assert t.state.global_step == 1
    assert torch.isfinite(torch.tensor(t.state.log_history[0]["objective/scores"]))


def test_missing_eos_penalty_lowers_the_score_of_unfinished_completions(trainer):
    t = trainer(missing_eos_penalty=1.0, response_length=1)
    rollout = t._rollout([t.train_dataset[i] for i in range(16)])
    scores, valid = t._scores(rollout, PolicyBatch.from_rollout(rollout, mask_truncated=False))
    assert bool(valid.all())
    raw = torch.tensor(says_word(rollout.completions, rollout.columns["word"]))
    torch.testing.assert_close(scores.cpu(), raw - rollout.is_truncated.float().cpu())


def test_reference_with_kl_coef_zero_is_not_built_and_kl_not_reported(trainer):
    t = trainer(kl_coef=0.0, max_steps=1)
    assert t.reference is None
    t.train()
    assert "objective/kl" not in t.state.log_history[0]  # nothing to measure against: not a fake 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train_dataset": [{"text": "hi"}]}, "needs an 'input_ids'.*or a 'prompt' column"),
        ({"train_dataset": []}, "train_dataset is empty"),
        ({"reward_model": None}, "reward_model is required"),
        ({"data_collator": object()}, "data_collator is not used"),
        ({"value_model": torch.nn.Linear(2, 2)}, "value_model must be a sequence-classification model"),
    ],
)
def test_bad_arguments_are_named(change, message, ppo_config):
    tokenizer = build_tokenizer()
    kwargs = dict(
        args=ppo_config(SHAPE),
        processing_class=tokenizer,
        model=build_policy(tokenizer),
        reward_model=says_word,
        train_dataset=build_dataset(size=32),
    )
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        PPOTrainer(**kwargs)


def test_reference_with_another_vocabulary_is_refused(ppo_config):
    tokenizer = build_tokenizer()
    other = build_policy(tokenizer)
    other.resize_token_embeddings(len(tokenizer) + 3)
    with pytest.raises(ValueError, match="ref_model has a vocabulary of 19 tokens but the policy has 16"):
        PPOTrainer(
            ppo_config(SHAPE),
            tokenizer,
            build_policy(tokenizer),
            ref_model=other,
            reward_model=says_word,
            train_dataset=build_dataset(size=32),
        )


def test_recording_ignores_attention_dropout(trainer):
    """Llama applies attention dropout functionally (config.attention_dropout): left on in train
    mode it would make the first update's ratio drift from 1."""
    tokenizer = build_tokenizer()
    policy = build_policy(tokenizer, seed=1)
    policy.config.attention_dropout = 0.3
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.3
    t = trainer(tokenizer, policy=policy, max_steps=1)
    t.train()
    assert abs(t.state.log_history[0]["val/ratio"] - 1.0) < 1e-6


def test_later_minibatches_train_against_the_recorded_logprobs(trainer):
    """After the first optimizer step the policy has moved: a minibatch of the second epoch must see
    ratios away from 1 (if training fell back to on-policy old log-probs, it would stay exactly 1)."""
    t = trainer(max_steps=4, learning_rate=0.05)
    t.train()
    last = t.state.log_history[-2]  # [-1]: train()'s summary row
    assert last["policy/approxkl_avg"] > 1e-6
    assert abs(last["val/ratio"] - 1.0) > 1e-6 or last["policy/clipfrac_avg"] > 0


def test_batch_arithmetic_follows_legacy_trl(ppo_config):
    cfg = ppo_config(SHAPE, per_device_train_batch_size=4, gradient_accumulation_steps=4, num_mini_batches=2)
    assert (cfg.local_batch_size, cfg.batch_size, cfg.local_mini_batch_size) == (16, 16, 8)
    assert cfg.micro_batches_per_step == 2
    cfg = ppo_config(SHAPE, max_steps=-1, total_episodes=40, num_train_epochs=1)
    assert cfg.num_updates(1000) == 3  # ceil(40 / 16), as legacy's num_total_batches
    assert cfg.optimizer_steps(1000) == 3 * 2 * 2  # updates x num_ppo_epochs x num_mini_batches
    with pytest.raises(ValueError, match="not both"):
        ppo_config(SHAPE, stop_token="eos", stop_token_id=1)


def test_steps_per_rollout_and_options_whiten_k3_stop_token(trainer):
    tokenizer = build_tokenizer()
    t = trainer(
        tokenizer=tokenizer,
        max_steps=-1,
        total_episodes=32,
        whiten_rewards=True,
        kl_estimator="k3",
        stop_token_id=tokenizer.convert_tokens_to_ids("cat"),
    )
    t.train()
    assert t.state.global_step == 2 * 2 * 2  # 2 rollouts x 2 epochs x 2 mini-batches
    assert all(math.isfinite(r["loss"]) for r in t.state.log_history if "loss" in r)
    assert t.state.log_history[-2]["episode"] == 32  # [-1]: train()'s summary row


def test_reward_model_scores_the_token_ids_at_the_last_token(value_model, trainer):
    tokenizer = build_tokenizer()
    reward = value_model(tokenizer).eval()
    t = trainer(tokenizer, reward_model=reward)
    rollout = t._rollout([t.train_dataset[i] for i in range(6)])
    batch = PolicyBatch.from_rollout(rollout, mask_truncated=False)
    scores = completion_scores(reward, batch)
    for i in range(6):  # each row alone, unpadded: prompt ids + completion ids (EOS kept)
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        ids = torch.cat([prompt, torch.tensor(rollout.completion_id_lists[i])])[None]
        with torch.no_grad():  # the head on the last token (not the model's own pooling, which would
            # stop at a sampled <pad> token: a completion may contain that id)
            expected = reward.score(reward.model(ids).last_hidden_state[0, -1])[0]
        torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-5)


def test_resume_inside_a_rollout_continues_exactly(tmp_path, trainer):
    """A checkpoint after step 2 of a 4-step rollout (2 epochs x 2 mini-batches): the resumed run
    replays the same micro-batches against the same record and logs the same values."""
    from transformers import TrainerCallback

    class StopAfterTwo(TrainerCallback):  # the run is interrupted; its schedule is the 6-step one
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    full = trainer(output_dir=str(tmp_path / "full"), max_steps=6, save_strategy="no")
    full.train()
    first = trainer(output_dir=str(tmp_path / "resumed"), max_steps=6, save_strategy="steps", save_steps=2)
    first.add_callback(StopAfterTwo)
    first.train()
    assert first.state.global_step == 2
    resumed = trainer(output_dir=str(tmp_path / "resumed"), max_steps=6, save_strategy="no")
    resumed.train(resume_from_checkpoint=True)

    def values(history):
        return [
            {
                k: v
                for k, v in r.items()
                # train_*: the summary row covers each train() call's own steps (HF's train_loss)
                if not k.startswith(("time/", "train_")) and k != "tokens/s"
            }
            for r in history
        ]

    expected, got = values(full.state.log_history), values(resumed.state.log_history)
    # steps 1..6, then train()'s summary row at step 6
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [*range(1, 7), 6]
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (want["step"], key)


def test_a_given_optimizer_also_steps_the_critic(trainer):
    tokenizer = build_tokenizer()
    policy = build_policy(tokenizer, seed=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="added the critic's 2 trainable tensors"):
        t = trainer(tokenizer, policy=policy, optimizers=(optimizer, None), max_steps=1)
    before = t.critic.head.score.weight.detach().clone()
    t.train()
    assert not torch.equal(before, t.critic.head.score.weight)


def test_generation_kwargs_cannot_change_the_sampling_distribution(ppo_config):
    with pytest.raises(ValueError, match=r"generation_kwargs must not set \['temperature'\]"):
        ppo_config(SHAPE, generation_kwargs={"temperature": 0.5, "max_time": 10})


def test_data_seed_zero_orders_the_prompts(trainer):
    """``data_seed=0`` orders the prompts like any other data seed (``data_seed or seed`` took 0 for
    unset and shuffled with ``seed``, as GRPO never did)."""
    t = trainer(data_seed=0, max_steps=1)  # seed=3
    drawn, rollout = [], t._rollout
    t._rollout = lambda rows: drawn.append(rows) or rollout(rows)
    t.train()
    assert drawn == [next(PromptBatches(t.train_dataset, t.args.batch_size, seed=0))]


def legacy_trl_schedule(per_device, accum, num_mini_batches, num_ppo_epochs, total_episodes, dataset_len):
    """Rows of each micro-batch of each optimizer step, as TRL v0.19.1's PPOTrainer writes its batch
    arithmetic and loops (one process; one ``optimizer.step()`` per mini-batch, as its loops read)."""
    num_train_epochs = 1  # the runs below: TrainingArguments' 3 would triple the step count
    world_size = 1
    if total_episodes is None:  # allow the users to define episodes in terms of epochs.
        total_episodes = int(num_train_epochs * dataset_len)
    local_batch_size = per_device * accum
    batch_size = int(local_batch_size * world_size)
    assert local_batch_size % num_mini_batches == 0  # exact_div
    local_mini_batch_size = local_batch_size // num_mini_batches
    num_total_batches = math.ceil(total_episodes / batch_size)
    steps = []
    for _update in range(1, num_total_batches + 1):
        for _ppo_epoch_idx in range(num_ppo_epochs):
            b_inds = list(range(local_batch_size))  # np.random.permutation: sizes do not depend on it
            for mini_batch_start in range(0, local_batch_size, local_mini_batch_size):
                mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + local_mini_batch_size]
                micro = []
                for micro_batch_start in range(0, local_mini_batch_size, per_device):
                    micro.append(len(mini_batch_inds[micro_batch_start : micro_batch_start + per_device]))
                steps.append(micro)
    return steps


# (per_device_train_batch_size, gradient_accumulation_steps, num_mini_batches, num_ppo_epochs,
#  total_episodes; None: num_train_epochs=1 x the 12-row dataset)
LEGACY_CONFIGS = [
    (8, 1, 2, 1, 16),  # refused before: num_mini_batches did not divide gradient_accumulation_steps
    (4, 3, 2, 1, 12),  # mini-batches of 6 rows walked as 4 + 2
    (2, 4, 2, 2, 20),  # ceil(20 / 8) = 3 rollouts
    (3, 2, 3, 2, None),  # total_episodes from num_train_epochs x len(train_dataset)
    (4, 2, 4, 1, 9),
]


@pytest.mark.parametrize("per_device, accum, num_mini, epochs, episodes", LEGACY_CONFIGS)
def test_every_legacy_config_runs_legacy_trls_optimizer_steps(
    per_device, accum, num_mini, epochs, episodes, trainer
):
    t = trainer(
        train_dataset=build_dataset(size=12, seed=2),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        num_mini_batches=num_mini,
        num_ppo_epochs=epochs,
        total_episodes=episodes,
        num_train_epochs=1,
        max_steps=-1,
        response_length=2,
    )
    steps, micro_batch_rows = [], []
    micro_batches, optimizer_step = t.micro_batches, t.optimizer_step

    def counted_micro_batches(buffer):
        for mb in micro_batches(buffer):
            micro_batch_rows.append(mb.completion_ids.shape[0])
            yield mb

    def counted_step():
        steps.append(list(micro_batch_rows))
        micro_batch_rows.clear()
        optimizer_step()

    t.micro_batches, t.optimizer_step = counted_micro_batches, counted_step
    t.train()
    expected = legacy_trl_schedule(per_device, accum, num_mini, epochs, episodes, dataset_len=12)
    assert steps == expected
    assert t.state.global_step == t.state.max_steps == len(expected)


@pytest.mark.parametrize("per_device, accum, num_mini", [(4, 3, 2), (2, 3, 1), (8, 3, 4)])
def test_a_mini_batch_gradient_is_the_mean_over_its_rows_whatever_the_micro_split(
    per_device, accum, num_mini, trainer, tmp_path
):
    """The same 6-row mini-batch as one micro-batch, and split by per_device_train_batch_size (4 + 2,
    2 + 2 + 2, or one of 6 under 8): the gradient the optimizer steps on is the same. Every
    completion runs to response_length (min_new_tokens), so each row has as many tokens and the
    mean over the rows is the mean over the tokens of one big batch.

    Tolerance (fp32 on CPU): the split only changes the summation order, 1e-5 of the largest entry.
    """
    run = dict(num_ppo_epochs=1, response_length=4, generation_kwargs={"min_new_tokens": 4}, max_steps=1)
    whole = trainer(
        output_dir=str(tmp_path / "whole"),
        per_device_train_batch_size=6,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        **run,
    )
    split = trainer(
        output_dir=str(tmp_path / "split"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        num_mini_batches=num_mini,
        **run,
    )
    assert split.args.local_mini_batch_size == 6
    record = whole._record(whole._rollout([whole.train_dataset[i] for i in range(6)]))
    whole._rewards_and_advantages(record)
    assert bool(record.batch.loss_mask.all())  # every row has all 4 tokens

    def step_gradient(t: PPOTrainer) -> dict[str, torch.Tensor]:
        grads = []
        t.begin_training(1, "PPO")
        t.optimizer_step = lambda: grads.append(
            {
                name: p.grad.clone()
                for module in t.trained_modules()
                for name, p in module.named_parameters()
                if p.grad is not None
            }
        )
        t.after_step = lambda: True
        t._optimise(EpochPasses(record, t._passes(record)))
        assert len(grads) == 1
        return grads[0]

    expected, got = step_gradient(whole), step_gradient(split)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_generate_completions_samples_the_first_eval_batch_when_sampling(trainer, capsys):
    """Legacy TRL's ``generate_completions``: every eval prompt by default (the scripts' last line),
    only the first ``per_device_eval_batch_size`` of them when training calls it (sampling=True)."""
    t = trainer(eval_dataset=build_dataset(size=7, seed=4), per_device_eval_batch_size=3)
    prompts, rollouts = [], t.evaluation_rollouts

    def counted(dataset, *args):
        prompts.append(len(dataset))
        yield from rollouts(dataset, *args)

    t.evaluation_rollouts = counted
    t.generate_completions(sampling=True)
    t.generate_completions()
    assert prompts == [3, 7]
    assert "score" in capsys.readouterr().out


def test_samples_are_printed_after_the_update_every_num_total_batches_over_num_sample_generations(trainer):
    """Legacy TRL: ``sample_generations_freq = max(1, num_total_batches // num_sample_generations)``,
    and a table after update ``u`` when ``(u - 1) % freq == 0``, once that update has trained."""
    t = trainer(
        eval_dataset=build_dataset(size=2, seed=4),
        max_steps=-1,
        total_episodes=64,  # num_total_batches = 64 / 16 = 4 rollouts of 2 epochs x 2 mini-batches
        num_sample_generations=2,  # freq = 4 // 2 = 2: after updates 1 and 3
        response_length=2,
    )
    at_steps = []
    t.generate_completions = lambda sampling=False: at_steps.append((t.state.global_step, sampling))
    t.train()
    assert at_steps == [(1 * 4, True), (3 * 4, True)]


def test_rollouts_are_generated_local_rollout_forward_batch_size_prompts_at_a_time(trainer):
    """Legacy TRL generates a rollout in batches of local_rollout_forward_batch_size (its memory
    bound); the batches' rows, re-padded into one rollout, are the rows one batch would give: greedy
    completions of prompts of different lengths (left padding) and of different lengths (right: the
    untrained policy repeats the prompt's last word, and "dog" is a stop token)."""
    t = trainer(local_rollout_forward_batch_size=5, max_steps=1, stop_token_id=build_tokenizer().vocab["dog"])
    rows = [{"prompt": "say : " + " : ".join(["cat", "dog", "sun"][: 1 + i % 3])} for i in range(7)]
    greedy = t.args.sampling_settings(do_sample=False)
    one = t.sample(rows, 1, greedy)
    chunked = concat_rollouts(
        [t.sample(rows[i : i + 3], 1, greedy) for i in (0, 3, 6)], t.processing_class.pad_token_id
    )
    assert len(set(one.lengths.tolist())) > 1
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "is_truncated"):
        assert torch.equal(getattr(chunked, name), getattr(one, name)), name
    assert (chunked.prompts, chunked.completions, chunked.completion_id_lists) == (
        one.prompts,
        one.completions,
        one.completion_id_lists,
    )

    sizes, generate = [], t.sampler.generate
    t.sampler.generate = lambda ids, *a: sizes.append(ids.shape[0]) or generate(ids, *a)
    t.train()
    assert sizes == [5, 5, 5, 1]  # the 16 prompts of a rollout
