"""GRPO data handling and evaluation as TRL / HF Trainer do them: named eval sets, iterable datasets
(streamed, max_steps required, resumed exactly), DataLoader workers that change nothing but who
fetches, TRL's eval_loss with HF's speed metrics, and the construction-time refusals."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import TrainerCallback

from fastppo import GRPOTrainer
from fastppo.advantages import group_relative_advantages
from fastppo.data import Loading, PromptBatches
from fastppo.demo import build_policy, build_tokenizer

PROMPTS = [f"say : {w}" for w in ("cat", "dog", "sun", "red", "sky", "sea", "big", "hot")]
# 2 prompts x 4 completions a rollout, one optimizer step per rollout
SHAPE = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=2)


class TorchPrompts(torch.utils.data.IterableDataset):
    """A torch IterableDataset of prompt rows (no length, no indexing)."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __iter__(self):
        return iter({"prompt": p} for p in self.prompts)


def make_trainer(grpo_config, reward, train_dataset=None, eval_dataset=None, **fields) -> GRPOTrainer:
    tokenizer = build_tokenizer()
    return GRPOTrainer(
        model=build_policy(tokenizer, seed=0, hidden_size=32),
        processing_class=tokenizer,
        reward_funcs=reward,
        args=grpo_config(SHAPE, **fields),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS})
        if train_dataset is None
        else train_dataset,
        eval_dataset=eval_dataset,
    )


def recording(id_reward, seen: list):
    """``id_reward`` that records the prompts it scores."""

    def reward(prompts, completion_ids, **kwargs):
        seen.extend(prompts)
        return id_reward(completion_ids)

    return reward


# --- construction-time refusals -------------------------------------------------------------------------


def test_train_dataset_none_is_refused_at_construction(grpo_config, id_reward):
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="train_dataset is required"):
        GRPOTrainer(
            model=build_policy(tokenizer, seed=0, hidden_size=32),
            processing_class=tokenizer,
            reward_funcs=id_reward,
            args=grpo_config(SHAPE),
        )


def test_rollout_func_is_refused_pointing_at_the_sampler(grpo_config, id_reward):
    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match=r"rollout_func.*GRPOTrainer\(sampler=\.\.\.\)"):
        GRPOTrainer(
            model=build_policy(tokenizer, seed=0, hidden_size=32),
            processing_class=tokenizer,
            reward_funcs=id_reward,
            args=grpo_config(SHAPE),
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
            rollout_func=lambda prompts, trainer: {},
        )


@pytest.mark.parametrize("stream", ["datasets", "torch"])
def test_a_streamed_train_dataset_needs_max_steps(grpo_config, id_reward, stream):
    data = (
        datasets.Dataset.from_dict({"prompt": PROMPTS}).to_iterable_dataset()
        if stream == "datasets"
        else TorchPrompts(PROMPTS)
    )
    with pytest.raises(ValueError, match=r"IterableDataset, so max_steps must be set \(> 0, got -1\)"):
        make_trainer(grpo_config, id_reward, train_dataset=data, max_steps=-1, num_train_epochs=1)


def test_workers_with_a_streamed_train_dataset_are_refused(grpo_config, id_reward):
    data = TorchPrompts(PROMPTS)
    with pytest.raises(ValueError, match="dataloader_num_workers=2 with an IterableDataset"):
        make_trainer(grpo_config, id_reward, train_dataset=data, dataloader_num_workers=2)


def test_a_streamed_dataset_without_a_prompt_column_is_refused(grpo_config, id_reward):
    data = datasets.Dataset.from_dict({"question": PROMPTS}).to_iterable_dataset()
    with pytest.raises(ValueError, match="train_dataset needs a 'prompt' column"):
        make_trainer(grpo_config, id_reward, train_dataset=data)


# --- the prompt stream --------------------------------------------------------------------------------


def test_a_datasets_stream_is_shuffled_as_datasets_shuffles_it_and_reshuffled_each_pass():
    data = datasets.Dataset.from_dict({"prompt": PROMPTS}).to_iterable_dataset(num_shards=2)
    batches = PromptBatches(data, 3, seed=5)  # 8 rows: 2 batches a pass, 2 rows dropped
    drawn = [[r["prompt"] for r in next(batches)] for _ in range(4)]
    expected = []
    shuffled = data.shuffle(seed=5)
    for epoch in (0, 1):
        shuffled.set_epoch(epoch)
        rows = [r["prompt"] for r in shuffled]
        expected += [rows[0:3], rows[3:6]]
    assert drawn == expected
    assert drawn[:2] != drawn[2:]  # a new order each pass
    assert batches.passes == 1


def test_a_torch_stream_is_shuffled_deterministically_per_seed():
    def draw(seed: int) -> list[list[str]]:
        batches = PromptBatches(TorchPrompts(PROMPTS), 4, seed=seed)
        return [[r["prompt"] for r in next(batches)] for _ in range(4)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert sorted(sum(draw(1)[:2], [])) == sorted(PROMPTS)  # one pass holds every prompt once
    unshuffled = PromptBatches(TorchPrompts(PROMPTS), 4, seed=1, shuffle=False)
    assert [r["prompt"] for r in next(unshuffled)] == PROMPTS[:4]


def test_a_stream_shorter_than_one_rollout_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fewer prompts than one rollout needs \(2\)"):
        next(PromptBatches(TorchPrompts(PROMPTS[:1]), 2, seed=0))


@pytest.mark.parametrize("stream", [False, True])
def test_skipping_batches_continues_the_same_stream(stream):
    """What a resumed run draws: the uninterrupted stream from its checkpoint's position on."""
    data = datasets.Dataset.from_dict({"prompt": PROMPTS})
    data = data.to_iterable_dataset() if stream else data
    whole = PromptBatches(data, 3, seed=0)
    drawn = [next(whole) for _ in range(7)]
    resumed = PromptBatches(data, 3, seed=0, skip=3)
    assert [next(resumed) for _ in range(4)] == drawn[3:]


def test_workers_fetch_the_same_batches_in_the_same_order():
    data = datasets.Dataset.from_dict({"prompt": PROMPTS})
    alone = PromptBatches(data, 2, seed=0, skip=1)
    workers = PromptBatches(data, 2, seed=0, skip=1, loading=Loading(num_workers=2, prefetch_factor=2))
    assert [next(workers) for _ in range(6)] == [next(alone) for _ in range(6)]


def test_dataloader_workers_are_accepted_and_train_on_the_same_prompts(grpo_config, id_reward, tmp_path):
    seen: dict[int, list] = {0: [], 2: []}
    for workers in seen:
        make_trainer(
            grpo_config,
            recording(id_reward, seen[workers]),
            output_dir=str(tmp_path / str(workers)),
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,
        ).train()
    assert len(seen[0]) == 16 and seen[2] == seen[0]


@pytest.mark.parametrize("stream", ["datasets", "torch"])
def test_training_on_a_stream_draws_its_prompts_in_its_order(grpo_config, id_reward, stream):
    data = (
        datasets.Dataset.from_dict({"prompt": PROMPTS}).to_iterable_dataset()
        if stream == "datasets"
        else TorchPrompts(PROMPTS)
    )
    seen: list[str] = []
    trainer = make_trainer(grpo_config, recording(id_reward, seen), train_dataset=data, max_steps=5)
    trainer.train()
    expected = PromptBatches(data, 2, seed=trainer.args.seed)
    prompts = [p for _ in range(5) for row in next(expected) for p in [row["prompt"]] * 4]
    assert trainer.state.global_step == 5 and seen == prompts
    assert trainer.state.epoch == 1.0  # one full pass of 4 rollouts behind the fifth


def test_a_run_on_a_stream_resumes_exactly(grpo_config, id_reward, tmp_path):
    data = datasets.Dataset.from_dict({"prompt": PROMPTS}).to_iterable_dataset()
    run = dict(max_steps=5, save_strategy="steps", save_steps=1)

    def logged(trainer):
        return [(r["loss"], r["reward"]) for r in trainer.state.log_history if "loss" in r]

    whole = make_trainer(grpo_config, id_reward, train_dataset=data, output_dir=str(tmp_path / "w"), **run)
    whole.train()
    resumed = make_trainer(grpo_config, id_reward, train_dataset=data, output_dir=str(tmp_path / "r"), **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "w" / "checkpoint-3"))
    assert len(logged(whole)) == 5 and logged(resumed) == logged(whole)


def untimed(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics without HF's speed metrics (runtime, samples/steps per second)."""
    return {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))}


# --- evaluation -----------------------------------------------------------------------------------------


def test_a_dict_of_eval_datasets_is_evaluated_set_by_set_with_its_name(grpo_config, id_reward):
    first = datasets.Dataset.from_dict({"prompt": PROMPTS[:2]})
    second = datasets.Dataset.from_dict({"prompt": PROMPTS[4:7]})
    events = []

    class Spy(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            events.append(sorted(metrics))

    trainer = make_trainer(
        grpo_config, id_reward, eval_dataset={"first": first, "second": second}, eval_do_sample=False
    )
    trainer.add_callback(Spy())
    metrics = trainer.evaluate()
    assert {"eval_first_reward", "eval_first_loss", "eval_second_reward", "eval_second_loss"} <= set(metrics)
    assert {"eval_first_runtime", "eval_second_samples_per_second"} <= set(metrics)
    assert not any(k.startswith("eval_reward") for k in metrics)
    second_only = {k: v for k, v in metrics.items() if k.startswith("eval_second_")}
    assert untimed(second_only) == untimed(trainer.evaluate(second, metric_key_prefix="eval_second"))
    # a name picks one of the trainer's sets; the prefix stays the caller's, as in HF
    assert trainer.evaluate("first")["eval_reward"] == metrics["eval_first_reward"]
    assert len(events) == 4 and all(e[0].startswith("eval_") for e in events)  # one per set evaluated
    with pytest.raises(ValueError, match=r"evaluate\('third'\): no eval dataset of that name"):
        trainer.evaluate("third")


def test_a_streamed_eval_dataset_evaluates_as_the_same_rows_in_a_dataset(grpo_config, id_reward):
    rows = datasets.Dataset.from_dict({"prompt": PROMPTS[:3]})
    trainer = make_trainer(grpo_config, id_reward, eval_do_sample=False)

    def measured(dataset):
        return untimed(trainer.evaluate(dataset))

    assert measured(rows.to_iterable_dataset()) == measured(rows) == measured(TorchPrompts(PROMPTS[:3]))


def recorded_rollouts(trainer: GRPOTrainer) -> list:
    """The rollouts ``trainer.sample`` returns from now on, in order."""
    rollouts = []
    sample = trainer.sample

    def spy(rows, n, settings):
        rollouts.append(sample(rows, n, settings))
        return rollouts[-1]

    trainer.sample = spy
    return rollouts


def dapo_eval_loss(rollouts: list, n: int, kept: list[int], reward) -> float:
    """The oracle: dapo on-policy with beta 0, each eval batch's loss -sum(A_i * |o_i|) / sum(|o_i|)
    over its first ``kept`` completions, A from their own groups of ``n``; the mean over completions."""
    losses = []
    for rollout, rows in zip(rollouts, kept, strict=True):
        rewards = torch.tensor(reward(rollout.completion_id_lists[:rows]))
        advantages, _ = group_relative_advantages(rewards, n, "group")
        tokens = rollout.completion_mask[:rows].sum(1).float()
        losses.append(float(-(advantages * tokens).sum() / tokens.sum()))
    return sum(loss * rows for loss, rows in zip(losses, kept, strict=True)) / sum(kept)


def test_eval_loss_leaves_out_the_repeats_padding_a_process_share(grpo_config, id_reward, monkeypatch):
    """The last process's share is padded with repeats of its last prompt (they must not count):
    eval_loss is the oracle's over the counted groups only, in the batch the repeat shared."""
    import fastppo.trainer.base as base

    monkeypatch.setattr(
        base, "evaluation_share", lambda count, acc: ([0, 1, 2, 2], [True, True, True, False])
    )
    trainer = make_trainer(grpo_config, id_reward, num_generations_eval=4, per_device_eval_batch_size=8)
    rollouts = recorded_rollouts(trainer)
    metrics = trainer.evaluate(datasets.Dataset.from_dict({"prompt": PROMPTS[:3]}))
    assert [r.completion_ids.shape[0] for r in rollouts] == [8, 8]  # prompts 0, 1; then 2 and its repeat
    expected = dapo_eval_loss(rollouts, 4, [8, 4], id_reward)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_eval_loss_is_trls_grpo_loss_on_the_eval_rollouts(grpo_config, id_reward):
    """dapo, on-policy (ratio 1), beta 0: each eval batch's loss is -sum(A_i * |o_i|) / sum(|o_i|) with
    A from its own groups; eval_loss is their mean over completions (HF's mean over samples)."""
    trainer = make_trainer(grpo_config, id_reward, num_generations_eval=2, per_device_eval_batch_size=4)
    rollouts = recorded_rollouts(trainer)
    events = []

    class Spy(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            events.append(metrics)

    trainer.add_callback(Spy())
    metrics = trainer.evaluate(datasets.Dataset.from_dict({"prompt": PROMPTS[:3]}))
    assert [r.completion_ids.shape[0] for r in rollouts] == [4, 2]  # 2 prompts x 2, then 1 x 2
    expected = dapo_eval_loss(rollouts, 2, [4, 2], id_reward)
    assert abs(expected) > 1e-3  # the oracle is not trivially zero
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert metrics["eval_runtime"] > 0 and metrics["eval_samples_per_second"] > 0
    assert metrics["eval_steps_per_second"] > 0  # ceil(6 samples / 4 a batch) = 2 steps
    assert events == [metrics]  # on_evaluate gets what evaluate() returns


def test_drawing_prompts_leaves_torchs_random_stream_alone():
    """The loader's worker seeds come from its own generator: a draw from the global RNG would shift
    every later sample, and a resumed run would draw it again (no longer exact)."""
    state = torch.get_rng_state()
    next(PromptBatches(datasets.Dataset.from_dict({"prompt": PROMPTS}), 2, seed=0))
    assert torch.equal(torch.get_rng_state(), state)


# --- pad_to_multiple_of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, resolved", [("auto", None), (None, None), ("null", None), ("64", 64), (16, 16)]
)
def test_pad_to_multiple_of_takes_trls_values(grpo_config, value, resolved):
    assert grpo_config(SHAPE, pad_to_multiple_of=value).pad_to_multiple_of == resolved


@pytest.mark.parametrize(
    "fused, padding_free",
    [(True, False), (False, False), (True, True)],
    ids=["fused", "plain", "padding-free"],
)
def test_pad_to_multiple_of_pads_every_batch_and_changes_no_update(
    grpo_config, id_reward, tmp_path, fused, padding_free
):
    """One SGD(lr=1) step, so the update is the gradient: the same with the batches padded to a
    multiple of 8 as without; the batches trained on and the eval batch have such shapes."""
    updates, shapes, eval_losses = [], [], []
    for multiple in (None, 8):
        tokenizer = build_tokenizer()
        model = build_policy(tokenizer, seed=0, hidden_size=32)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = GRPOTrainer(
            model=model,
            processing_class=tokenizer,
            reward_funcs=id_reward,
            args=grpo_config(
                SHAPE,
                output_dir=str(tmp_path / str(multiple)),
                max_steps=1,
                beta=0.04,
                max_grad_norm=0.0,
                use_fused_kernels=fused,
                padding_free=padding_free,
                pad_to_multiple_of=multiple,
                num_generations_eval=2,
            ),
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None),
        )
        policy_loss = trainer.policy_forward.policy_loss

        def spy(model, batch, *args, multiple=multiple, policy_loss=policy_loss, **kwargs):
            shapes.append((multiple, batch.prompt_ids.shape[1], batch.completion_ids.shape[1]))
            return policy_loss(model, batch, *args, **kwargs)

        trainer.policy_forward.policy_loss = spy
        eval_losses.append(trainer.evaluate(datasets.Dataset.from_dict({"prompt": PROMPTS[:2]}))["eval_loss"])
        trainer.train()
        updates.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
    padded = [(p, c) for m, p, c in shapes if m == 8]
    assert len(padded) == 2 and all(p % 8 == 0 and c % 8 == 0 for p, c in padded)  # eval and train batch
    assert [(p, c) for m, p, c in shapes if m is None] != padded  # not multiples of 8 unpadded
    assert eval_losses[0] != 0 and eval_losses[1] == pytest.approx(eval_losses[0], rel=1e-5, abs=1e-7)
    assert any(d.abs().max() > 1e-4 for d in updates[0].values())
    for name, delta in updates[0].items():
        torch.testing.assert_close(updates[1][name], delta, rtol=1e-4, atol=1e-6, msg=name)


def test_named_eval_sets_are_logged_during_training(grpo_config, id_reward):
    sets = {name: datasets.Dataset.from_dict({"prompt": PROMPTS[i : i + 2]}) for i, name in enumerate("ab")}
    trainer = make_trainer(grpo_config, id_reward, eval_dataset=sets, eval_strategy="steps", eval_steps=2)
    trainer.train()
    logged = [
        sorted(k for k in r if k.endswith("_reward"))
        for r in trainer.state.log_history
        if "loss" not in r and "train_loss" not in r  # neither step records nor train()'s summary row
    ]
    assert logged == [["eval_a_reward"], ["eval_b_reward"]]  # one record per set, at step 2
