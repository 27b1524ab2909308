"""GRPOTrainer with each sampler: TRL's names choose it, bad combinations fail before training, a
sampler with weights of its own never samples from stale ones, the sampler's log-probs stand for the
old policy's only when asked and exact, and exact resume and evaluation's forked RNG still hold."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch

from fastppo import GRPOTrainer
from fastppo.batch import PolicyBatch
from fastppo.config import ForwardPlan
from fastppo.demo import build_policy, build_tokenizer
from fastppo.policy_forward import PolicyForward
from fastppo.rollout import GenerateSampler
from fastppo.samplers import ContinuousBatchingSampler, StaticCacheSampler
from fastppo.samplers.continuous import page_size_key

PROMPTS = ["say : cat", "say : dog", "say : red", "say : sun"]
SHAPE = dict(
    per_device_train_batch_size=8, num_generations=4, max_completion_length=5, max_steps=3, learning_rate=1e-2
)
PAGE = page_size_key()  # "page_size" (transformers >= 5.18) or "block_size"
ENGINES = {
    "generate": {},
    "continuous_batching": {"use_transformers_continuous_batching": True},
    "static": {"cache_implementation": "static"},
}


def dataset(n: int = 4):
    return datasets.Dataset.from_dict({"prompt": PROMPTS[:n]})


def trainer_for(
    grpo_config, id_reward, *, model=None, sampler=None, eval_dataset=None, **fields
) -> GRPOTrainer:
    tokenizer = build_tokenizer()
    return GRPOTrainer(
        model=model if model is not None else build_policy(tokenizer, hidden_size=32),
        processing_class=tokenizer,
        reward_funcs=id_reward,
        args=grpo_config(SHAPE, **fields),
        train_dataset=dataset(),
        eval_dataset=eval_dataset,
        sampler=sampler,
    )


def test_trls_names_choose_the_sampler(grpo_config, id_reward):
    expected = {"generate": GenerateSampler, "continuous_batching": ContinuousBatchingSampler}
    expected["static"] = StaticCacheSampler
    for name, fields in ENGINES.items():
        assert type(trainer_for(grpo_config, id_reward, **fields).sampler) is expected[name], name
    configured = trainer_for(
        grpo_config,
        id_reward,
        use_transformers_continuous_batching=True,
        transformers_continuous_batching_config=f'{{"{PAGE}": 16}}',  # a JSON string, as from the CLI
    )
    assert configured.sampler.kwargs == {"max_memory_percent": 0.5, "return_logprobs": True, PAGE: 16}
    with pytest.warns(
        FutureWarning, match="use_transformers_paged"
    ):  # TRL's deprecated name, mapped as TRL does
        args = grpo_config(SHAPE, use_transformers_paged=True)
    assert args.use_transformers_continuous_batching


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(use_transformers_continuous_batching=True, cache_implementation="static"), "does not apply to"),
        (dict(transformers_continuous_batching_config={PAGE: 16}), "would do nothing"),
        (
            dict(
                use_transformers_continuous_batching=True,
                transformers_continuous_batching_config={PAGE.replace("_", ""): 1},
            ),
            f"did you mean '{PAGE}'",
        ),
        (dict(old_logprobs_from_sampler=True, top_k=5), r"with \{'top_k': 5\}"),
        (dict(old_logprobs_from_sampler=True, top_p=0.9, min_p=0.1), "'top_p': 0.9, 'min_p': 0.1"),
    ],
)
def test_contradicting_sampler_settings_fail_in_the_config(fields, message, grpo_config):
    with pytest.raises(ValueError, match=message):
        grpo_config(SHAPE, **fields)


def test_settings_a_sampler_cannot_honour_fail_before_training(grpo_config, id_reward):
    with pytest.raises(ValueError, match="RepetitionPenaltyLogitsProcessor"):
        trainer_for(grpo_config, id_reward, use_transformers_continuous_batching=True, repetition_penalty=1.1)
    with pytest.raises(ValueError, match="MinNewTokensLengthLogitsProcessor"):
        trainer_for(
            grpo_config,
            id_reward,
            use_transformers_continuous_batching=True,
            generation_kwargs={"min_new_tokens": 2},
        )
    with pytest.raises(ValueError, match="generate returns no log-probs"):
        trainer_for(grpo_config, id_reward, old_logprobs_from_sampler=True)


def fresh_logprobs(policy, prompt_ids, prompt_mask, completions, n: int, temperature: float) -> torch.Tensor:
    """``[B, Lc]`` log-probs of ``completions`` under a float64 copy of ``policy`` as it is now."""
    from fastppo.rollout import completion_mask

    mask, _ = completion_mask(completions, [build_tokenizer().eos_token_id])
    batch = PolicyBatch(
        prompt_ids.repeat_interleave(n, 0),
        prompt_mask.repeat_interleave(n, 0),
        completions,
        mask,
        mask,
        torch.arange(len(completions)),
    )
    scored = PolicyForward(ForwardPlan(fused=False)).score(copy.deepcopy(policy).double(), batch, temperature)
    return scored.masked_fill(~mask.bool(), 0.0)


def sampling_errors(grpo_config, id_reward, stale: bool) -> list[float]:
    """Per rollout of a 3-step run whose sampler decodes a float64 copy of the fp32 policy: the
    largest difference between the log-probs it sampled with and the policy's at that moment."""
    tokenizer = build_tokenizer()
    policy = build_policy(tokenizer, hidden_size=32)
    sampler = ContinuousBatchingSampler(
        policy, tokenizer.pad_token_id, [tokenizer.eos_token_id], dtype=torch.float64
    )
    if stale:
        sampler.sync_weights = lambda: None  # what a sampler that forgets to sync would do
    errors, generate = [], sampler.generate

    def checked(prompt_ids, prompt_mask, n, settings):
        sampled = generate(prompt_ids, prompt_mask, n, settings)
        fresh = fresh_logprobs(policy, prompt_ids, prompt_mask, sampled.ids, n, settings.temperature)
        errors.append(float((sampled.logprobs.double() - fresh).abs().max()))
        return sampled

    sampler.generate = checked
    trainer_for(grpo_config, id_reward, model=policy, sampler=sampler).train()
    return errors


def test_a_sampler_with_weights_of_its_own_never_samples_from_stale_ones(grpo_config, id_reward):
    """Each rollout's sampling log-probs equal the current policy's (to the engine's float32
    logits), one optimizer step (lr 1e-2) after another; the same run with the sync left out is
    caught from its second rollout on, so the check can fail."""
    synced = sampling_errors(grpo_config, id_reward, stale=False)
    assert len(synced) == 3 and max(synced) < 1e-5
    stale = sampling_errors(grpo_config, id_reward, stale=True)
    assert stale[0] < 1e-5 and min(stale[1:]) > 1e-3


def test_old_logprobs_from_the_sampler_replace_the_scoring_forward(grpo_config, id_reward, monkeypatch):
    """num_iterations=2 records old log-probs: with old_logprobs_from_sampler they are the engine's
    (equal to a scoring forward's, float32 logits aside) and no policy forward scores the rollout."""
    trainer = trainer_for(
        grpo_config,
        id_reward,
        use_transformers_continuous_batching=True,
        num_iterations=2,
        old_logprobs_from_sampler=True,
    )
    assert trainer.args.records_old_logprobs
    rollout = trainer._rollout([dict(prompt=p) for p in PROMPTS[:2]])
    forwards = []
    run = trainer.policy_forward.run
    monkeypatch.setattr(trainer.policy_forward, "run", lambda *a, **k: forwards.append(1) or run(*a, **k))
    scores = trainer._score(rollout)
    assert not forwards  # beta = 0: no reference either
    scoring = PolicyForward(ForwardPlan(fused=True))
    for mb in scores.minibatches:
        expected = scoring.score(trainer.model, mb, trainer.args.temperature)
        torch.testing.assert_close(mb.old_logprobs, expected, rtol=0, atol=1e-5)
    top_k = trainer_for(grpo_config, id_reward, use_transformers_continuous_batching=True, num_iterations=2)
    top_k.args.old_logprobs_from_sampler, top_k.args.top_k = True, 3  # as if the config had let it through
    with pytest.raises(ValueError, match="log-probs of a truncated distribution"):
        top_k._score(top_k._rollout([dict(prompt=p) for p in PROMPTS[:2]]))


def logged(trainer) -> list[tuple]:
    return [(r["loss"], r.get("reward"), r["grad_norm"]) for r in trainer.state.log_history if "loss" in r]


@pytest.mark.slow  # two training runs per engine
@pytest.mark.parametrize("engine", ["continuous_batching", "static"])
def test_a_run_resumed_inside_a_rollout_is_exact(engine, grpo_config, id_reward, tmp_path):
    """num_iterations=2 over 2 minibatches: a rollout feeds 4 optimizer steps; resumed from
    checkpoint-3 (inside the first rollout), the run logs what the uninterrupted one logged,
    including the rollout sampled after the resume (the engine's seed comes from the restored RNG)."""
    run = dict(
        ENGINES[engine],
        per_device_train_batch_size=4,
        steps_per_generation=2,
        num_iterations=2,
        max_steps=6,
        save_strategy="steps",
        save_steps=1,
        seed=3,
    )
    whole = trainer_for(grpo_config, id_reward, output_dir=str(tmp_path / "whole"), **run)
    whole.train()
    resumed = trainer_for(grpo_config, id_reward, output_dir=str(tmp_path / "cut"), **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert len(logged(whole)) == 6 and logged(resumed) == logged(whole)  # steps 1-3 from the checkpoint


@pytest.mark.slow  # two training runs per engine, one evaluating at every step
@pytest.mark.parametrize("engine", ["continuous_batching", "static"])
def test_evaluation_does_not_change_what_the_sampler_trains(engine, grpo_config, id_reward, tmp_path):
    """Evaluation samples from a forked RNG: each sampler (continuous batching seeds its engine from
    torch's RNG) trains exactly the same whether evaluation runs every step or never."""
    runs = []
    for evaluating in (False, True):
        schedule = dict(eval_strategy="steps", eval_steps=1, eval_on_start=True) if evaluating else {}
        trainer = trainer_for(
            grpo_config,
            id_reward,
            eval_dataset=dataset(2),
            output_dir=str(tmp_path / str(evaluating)),
            per_device_eval_batch_size=8,
            **ENGINES[engine],
            **schedule,
        )
        trainer.train()
        runs.append(logged(trainer))
    assert any("eval_reward" in r for r in trainer.state.log_history)
    assert runs[0] == runs[1]
