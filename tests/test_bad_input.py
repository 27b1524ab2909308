"""Bad input gets a clear error naming the bad value, before any training work where it can be known
then: one test per case of the reliability issue (the README's table lists them)."""

from __future__ import annotations

import math
import os

import datasets
import pytest
import torch

from fastppo.demo import build_tokenizer
from fastppo.modeling import load_tokenizer
from fastppo.rewards import INVALID_METRIC, RewardFunctionError, RewardSet, check_vocab, score_rewards

PROMPTS = ["say : cat", "say : dog", "say : bird", "say : sun"]


# The run every trainer here makes (grpo_trainer adds a quiet short run around it).
SHAPE = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=3, max_steps=1)


def ones(completions, **kwargs):
    return [1.0] * len(completions)


@pytest.fixture
def trainer(grpo_trainer):
    """``trainer(reward=ones, dataset=None, **fields)``: a GRPO trainer of this file's run on PROMPTS
    (or ``dataset``), on a fresh tiny Llama unless ``model=`` says otherwise."""
    return lambda reward=ones, dataset=None, **fields: grpo_trainer(
        SHAPE, prompts=PROMPTS, reward=reward, train_dataset=dataset, **fields
    )


# --- model and tokenizer ------------------------------------------------------------------------------


def test_missing_model_path(tmp_path, trainer):
    with pytest.raises(ValueError, match="model path .*missing.* does not exist"):
        trainer(model=str(tmp_path / "missing"))


def test_model_folder_without_config(tmp_path, trainer):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        trainer(model=str(tmp_path / "empty-model"))


def test_unreadable_model_config(tmp_path, model_dir, trainer):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(model_dir):
        (broken / name).write_bytes((tmp_path / model_dir / name).read_bytes())
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        trainer(model=str(broken))


def test_corrupt_model_weights(tmp_path, model_dir, trainer):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(model_dir):
        (broken / name).write_bytes((tmp_path / model_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not be loaded: .*header"):
        trainer(model=str(broken))


def test_tokenizer_without_pad_token_uses_eos(model_dir):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    assert load_tokenizer(None, tokenizer, False).pad_token == "<eos>"


def test_tokenizer_without_pad_or_eos():
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        load_tokenizer(None, tokenizer, False)


# A policy or reward model whose embedding table is smaller than the demo tokenizer's 16 tokens.
SMALL_VOCAB = dict(pad_token_id=0, eos_token_id=1)


def test_policy_vocab_smaller_than_tokenizer(trainer, tiny_model):
    with pytest.raises(ValueError, match="embedding table has 8 rows"):
        trainer(model=tiny_model(vocab_size=8, **SMALL_VOCAB))


def test_reward_model_vocab_smaller_than_tokenizer(tiny_model):
    reward_model = tiny_model(head="sequence_classification", vocab_size=8, **SMALL_VOCAB)
    with pytest.raises(ValueError, match="16 tokens but the model's embedding table has 8 rows"):
        check_vocab(reward_model, build_tokenizer(), "reward model 'rm'")
    check_vocab(
        tiny_model(vocab_size=64, **SMALL_VOCAB), build_tokenizer(), "policy"
    )  # a larger table is normal


# --- datasets -----------------------------------------------------------------------------------------


def test_dataset_without_prompt_column(trainer):
    with pytest.raises(ValueError, match=r"needs a 'prompt' column .*\['question'\]"):
        trainer(dataset=datasets.Dataset.from_dict({"question": PROMPTS}))


def test_empty_dataset(trainer):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        trainer(dataset=datasets.Dataset.from_dict({"prompt": []}))


def test_dataset_smaller_than_one_rollout(trainer):
    with pytest.raises(ValueError, match="has 1 prompts but one rollout needs .* = 2"):
        trainer(dataset=datasets.Dataset.from_dict({"prompt": PROMPTS[:1]}))


@pytest.mark.parametrize(
    "prompts, message",
    [([1, 2], "prompt 0 is int"), (["", ""], r"prompt 0 \(''\) encodes to no tokens")],
    ids=["not-text", "empty"],
)
def test_unusable_prompt_values(prompts, message, trainer):
    run = trainer(dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    with pytest.raises(ValueError, match=message):
        run.train()


def test_prompts_longer_than_max_prompt_length_are_cut_and_counted(trainer):
    run = trainer(max_prompt_length=2)
    run.train()
    assert run.state.log_history[0]["prompts/truncated"] == 2.0  # "say : cat" and "say : dog" (3 tokens)


# --- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", -1e-3, r"learning_rate must be a finite number in \[0.0, inf\), got -0.001"),
        ("temperature", 0.0, r"temperature must be a finite number in \(0.0, inf\), got 0.0"),
        ("num_generations", 1, "num_generations must be an integer >= 2, got 1"),
        ("epsilon", float("nan"), "epsilon must be a finite number"),
        ("beta", -0.1, "beta must be a finite number"),
        ("top_p", 0.0, r"top_p must be a finite number in \(0.0, 1.0\]"),
        ("max_consecutive_nonfinite_steps", 0, "max_consecutive_nonfinite_steps must be an integer >= 1"),
        ("reward_weights", [1.0, float("inf")], r"reward_weights\[1\] must be a finite number"),
        ("max_completion_lenght", 8, "did you mean 'max_completion_length'"),
    ],
)
def test_invalid_config_numbers(field, value, message, grpo_config):
    with pytest.raises(ValueError, match=message):
        grpo_config(SHAPE, **{field: value})


# --- reward functions ---------------------------------------------------------------------------------


def score(func, n=4, skip_invalid=False, logged=None):
    rewards = RewardSet([func], [getattr(func, "__name__", "f")], torch.ones(1))
    extra = {} if logged is None else {"log_metric": lambda name, value: logged.append((name, value))}
    completions = [f"c{i}" for i in range(n)]
    return score_rewards(rewards, ["p"] * n, completions, [[i] for i in range(n)], {}, extra, skip_invalid)


def raises_on_c2(completions, **kwargs):
    if "c2" in completions:
        raise KeyError("no answer")
    return [1.0] * len(completions)


def nan_at_1(completions, **kwargs):
    return [float("nan") if c == "c1" else 1.0 for c in completions]


def inf_at_3(completions, **kwargs):
    return [float("inf") if c == "c3" else 1.0 for c in completions]


def test_raising_reward_function_names_function_and_sample():
    with pytest.raises(RewardFunctionError, match=r"'raises_on_c2' raised KeyError on sample 2: 'no answer'"):
        score(raises_on_c2)


def test_reward_function_failing_only_on_the_batch():
    def batch_only(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch too large")
        return [0.5]

    with pytest.raises(RewardFunctionError, match="'batch_only' raised RuntimeError on the batch of 4"):
        score(batch_only)


def test_wrong_length_reward():
    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="'short' returned 1 rewards for 4 completions"):
        score(short, skip_invalid=True)  # cannot be pinned to samples: raises even when skipping


@pytest.mark.parametrize(
    "func, message",
    [
        (nan_at_1, "'nan_at_1' returned nan for sample 1"),
        (inf_at_3, "'inf_at_3' returned inf for sample 3; rewards must be finite"),
        (lambda completions, **k: ["high"] * len(completions), "returned 'high' for sample 0"),
    ],
    ids=["nan", "inf", "not-a-number"],
)
def test_invalid_reward_values(func, message):
    with pytest.raises(RewardFunctionError, match=message):
        score(func)


@pytest.mark.parametrize(
    "func, invalid", [(nan_at_1, [1]), (inf_at_3, [3]), (raises_on_c2, [2])], ids=["nan", "inf", "raises"]
)
def test_skip_invalid_rewards_masks_and_counts(func, invalid):
    logged = []
    scores = score(func, skip_invalid=True, logged=logged)
    expected_valid = [i not in invalid for i in range(4)]
    assert scores.valid.tolist() == expected_valid and scores.num_invalid == len(invalid)
    assert all(math.isnan(v) == (i in invalid) for i, v in enumerate(scores.per_func[:, 0].tolist()))
    assert scores.per_func[scores.valid, 0].tolist() == [1.0] * (4 - len(invalid))
    assert logged == [(INVALID_METRIC, float(len(invalid)))]


def test_none_rewards_are_not_invalid():
    scores = score(lambda completions, **k: [None, 1.0, None, 2.0], skip_invalid=True, logged=[])
    assert scores.valid.all() and math.isnan(scores.per_func[0, 0])


def nan_for_second(completions, **kwargs):
    return [float("nan") if i == 1 else 1.0 for i in range(len(completions))]


def test_bad_reward_in_training_names_the_function(trainer):
    with pytest.raises(RewardFunctionError, match="'nan_for_second' returned nan for sample 1"):
        trainer(reward=nan_for_second).train()


def nan_for_1_and_5(completions, **kwargs):
    return [float("nan") if i in (1, 5) else float(i) for i in range(len(completions))]


def test_skip_invalid_rewards_in_training_drops_the_samples_from_the_loss(trainer):
    run = trainer(
        reward=nan_for_1_and_5,
        skip_invalid_rewards=True,
        per_device_train_batch_size=8,
        num_generations=4,
    )
    scores = run._score(run._rollout([{"prompt": "say : cat"}, {"prompt": "say : dog"}]))
    masked = {
        int(row): bool(mb.loss_mask[i].any()) for mb in scores.minibatches for i, row in enumerate(mb.rows)
    }
    assert [i for i, kept in sorted(masked.items()) if not kept] == [1, 5]
    assert (
        torch.isnan(scores.rewards[[1, 5]]).all()
        and not torch.isnan(scores.rewards[[0, 2, 3, 4, 6, 7]]).any()
    )
    run.train()
    assert run.state.log_history[0][INVALID_METRIC] == 2.0 and math.isfinite(run.state.log_history[0]["loss"])
