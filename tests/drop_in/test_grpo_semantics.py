"""Drop-in semantics of GRPO against TRL 1.16 where a difference would change training silently: the
MoE load-balancing loss, reward processing classes, all-None rewards, the reward kwargs, the lm_head
in fp32, use_liger_kernel, models without SDPA, and the refused rollout kinds."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.utils import logging as hf_logging

from fastppo import GRPOConfig, GRPOTrainer
from fastppo.batch import sequence_inputs
from fastppo.config import ForwardPlan
from fastppo.demo import build_policy, build_tokenizer
from fastppo.modeling import cast_lm_head_to_fp32, load_causal_lm
from fastppo.moe import RouterAuxLoss
from fastppo.policy_forward import PolicyForward, head_operands
from fastppo.rewards import load_rewards, score_completions

RUN = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, max_steps=1)


def tiny_moe(vocab_size: int, seed: int = 0) -> Qwen3MoeForCausalLM:
    """A two-layer Qwen3-MoE (4 experts, top 2) whose config declares router_aux_loss_coef=0.001."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config)


def router_weights(model) -> torch.Tensor:
    return torch.cat([m.mlp.gate.weight.detach().flatten() for m in model.model.layers])


# --- 1. the MoE load-balancing loss ------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_recorded_router_aux_loss_is_the_models_own(ragged_batch, fused, padding_free):
    """What the trainer adds equals ``outputs.aux_loss`` of the model's own forward with
    output_router_logits (TRL's source), on the fused path too, which never calls the model's forward."""
    model = tiny_moe(40)
    batch = ragged_batch(40)
    aux = RouterAuxLoss.from_model(model, None)
    assert aux.coef == model.config.router_aux_loss_coef == 0.001  # None: the config's own
    with aux.recording(model) as logits:
        PolicyForward(ForwardPlan(fused=fused, padding_free=padding_free)).run(model, batch)
    inputs = sequence_inputs(batch)
    expected = model(**inputs, output_router_logits=True).aux_loss
    got = aux.loss(logits, None if padding_free else inputs["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_moe_policy_trains_with_its_aux_loss_and_logs_it(grpo_trainer):
    """One step with the aux loss on (coef 1.0) moves the routers differently from one without
    (coef 0.0); TRL's ``aux_loss`` metric is logged only when it is on."""
    trainers = {
        coef: grpo_trainer(RUN, model=tiny_moe(len(build_tokenizer())), router_aux_loss_coef=coef)
        for coef in (0.0, 1.0)
    }
    for trainer in trainers.values():
        trainer.train()
    off, on = (trainers[c].state.log_history[0] for c in (0.0, 1.0))
    assert "aux_loss" not in off and on["aux_loss"] > 0
    assert not torch.allclose(router_weights(trainers[0.0].model), router_weights(trainers[1.0].model))


def test_aux_term_is_weighted_and_split_over_accumulation(grpo_trainer, ragged_batch):
    """TRL: ``loss + coef * aux_loss / gradient_accumulation_steps``, whatever the loss type."""
    vocab = len(build_tokenizer())
    trainer = grpo_trainer(
        dict(RUN, gradient_accumulation_steps=2), model=tiny_moe(vocab), router_aux_loss_coef=0.5
    )
    batch = ragged_batch(vocab)
    with trainer.router_aux.recording(trainer.model) as logits:
        trainer.policy_forward.run(trainer.model, batch)
    expected = trainer.model(**sequence_inputs(batch), output_router_logits=True).aux_loss
    torch.testing.assert_close(trainer._router_aux_term(logits, batch), 0.5 * expected / 2)


def test_router_aux_loss_coef_needs_an_moe_model(grpo_trainer, tmp_path):
    with pytest.raises(
        ValueError, match=r"router_aux_loss_coef must be a finite number in \[0.0, inf\), got -1"
    ):
        GRPOConfig(output_dir=str(tmp_path), router_aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match="router_aux_loss_coef` is set to 0.5 but LlamaForCausalLM is not a"):
        grpo_trainer(RUN, router_aux_loss_coef=0.5)
    assert not grpo_trainer(RUN).router_aux.enabled  # dense and None: off, as TRL


# --- 2-4. rewards ---------------------------------------------------------------------------------


def reward_model(tiny_model, tokenizer):
    return tiny_model(head="sequence_classification", vocab_size=len(tokenizer), pad_token_id=0)


def test_one_reward_processing_class_for_two_reward_models_is_refused(tiny_model):
    tokenizer = build_tokenizer()
    models = [reward_model(tiny_model, tokenizer), reward_model(tiny_model, tokenizer)]
    with pytest.raises(ValueError, match=r"processing classes \(1\) must match .* reward functions \(2\)"):
        load_rewards(models, weights=None, reward_processing_classes=tokenizer)


def test_trainer_exposes_reward_processing_classes(grpo_config, tiny_model, id_reward):
    tokenizer = build_tokenizer()
    model = reward_model(tiny_model, tokenizer)
    with pytest.raises(ValueError, match="was not loaded from a path, so its tokenizer cannot be found"):
        load_rewards(model, weights=None)
    trainer = GRPOTrainer(
        model=build_policy(tokenizer, hidden_size=32),
        reward_funcs=[id_reward, model],
        args=grpo_config(RUN),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"]}),
        processing_class=tokenizer,
        reward_processing_classes=[None, tokenizer],
    )
    assert trainer.reward_processing_classes == [None, tokenizer]


def test_all_none_rewards_warn_as_trl(caplog):
    def sometimes(completions, **kwargs):
        return [None, 1.0]

    def never(completions, **kwargs):
        return [None, None]

    rewards = load_rewards([sometimes, never], weights=None)
    with caplog.at_level(logging.WARNING, logger="fastppo.rewards"):
        per_func = score_completions(
            rewards, ["p0", "p1"], ["c0", "c1"], [[1], [2]], {"answer": ["a0", "a1"]}, {}
        )
    assert torch.isnan(per_func[0]).all() and per_func[1, 0] == 1.0
    assert "All reward functions returned None for the following kwargs:\n" in caplog.text
    assert "{'answer': 'a0', 'prompt': 'p0', 'completion': 'c0'}" in caplog.text  # the first such sample


def test_reward_functions_read_trainer_state_and_log_extras_and_metrics(grpo_trainer):
    seen_steps = []

    def logging_reward(completions, trainer_state, log_extra, log_metric, **kwargs):
        seen_steps.append(trainer_state.global_step)
        log_extra("note", [f"n{i}" for i in range(len(completions))])
        log_metric("custom/score", 0.5)
        return [float(len(c)) for c in completions]

    trainer = grpo_trainer(RUN, reward=logging_reward, log_completions=True, max_steps=2)
    trainer.train()
    assert seen_steps == [0, 1]
    assert all(r["custom/score"] == 0.5 for r in trainer.state.log_history if "loss" in r)
    assert [row["note"] for row in trainer._samples] == [f"n{i}" for i in range(8)]  # this rollout's only


# --- 5. lm_head in fp32, use_liger_kernel --------------------------------------------------------


def test_cast_lm_head_to_fp32_keeps_a_tied_embedding_in_the_models_dtype():
    tokenizer = build_tokenizer()
    model = build_policy(tokenizer, hidden_size=32).to(torch.bfloat16)  # tied embeddings
    cast_lm_head_to_fp32(model)
    assert model.lm_head.weight.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3]])
    assert model.get_input_embeddings()(ids).dtype == torch.bfloat16  # the decoder still runs in bf16
    assert model(ids).logits.dtype == torch.float32


def test_cast_lm_head_to_fp32_runs_the_head_in_fp32_under_autocast(grpo_trainer):
    """The fused kernels' operands (``head_operands``) and the plain path's ``lm_head`` call are fp32
    under bf16 autocast, as TRL's fp32 head; without the flag they follow autocast."""
    trainer = grpo_trainer(RUN, cast_lm_head_to_fp32=True)
    assert trainer.policy_forward.plan.lm_head_fp32 and trainer.model.lm_head.weight.dtype == torch.float32
    head, hidden = trainer.model.lm_head, torch.randn(2, 3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head_operands(head, hidden)[1].dtype == torch.bfloat16  # the default follows autocast
        assert all(t.dtype == torch.float32 for t in head_operands(head, hidden, fp32=True)[:2])
        assert trainer.model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32


def test_use_liger_kernel_is_accepted_and_logged_once(grpo_trainer, caplog):
    hf_logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fastppo.modeling"):
        grpo_trainer(RUN, use_liger_kernel=True)
        grpo_trainer(RUN, use_liger_kernel=True)
    assert caplog.text.count("use_liger_kernel=True: fastppo's own fused kernels") == 1


# --- 6. models without SDPA ----------------------------------------------------------------------


def test_a_model_without_sdpa_loads_with_eager_attention(model_dir, monkeypatch):
    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", False)  # as GPT-OSS in transformers 5.x
    with pytest.warns(UserWarning, match="attn_implementation='eager'"):
        model = load_causal_lm(model_dir, None, False, device="cpu")
    assert model.config._attn_implementation == "eager"


# --- 7-8. TRL's sequence-level warning; refused agent rollouts (use_vllm: tests/test_grpo_config.py) --


def test_sequence_ratio_with_a_token_summed_loss_warns_with_trls_words(tmp_path):
    with pytest.warns(UserWarning) as caught:
        GRPOConfig(output_dir=str(tmp_path), importance_sampling_level="sequence", loss_type="dapo")
    assert any(
        str(w.message).endswith(
            "set `loss_type='grpo'` (see "
            "https://huggingface.co/docs/trl/main/en/paper_index#group-sequence-policy-optimization)."
        )
        for w in caught
    )


@pytest.mark.parametrize("name", ["tools", "rollout_func", "environment_factory"])
def test_agent_rollouts_are_refused(grpo_config, model_dir, id_reward, name):
    with pytest.raises(ValueError, match=rf"^{name} is not supported by fastppo's GRPOTrainer"):
        GRPOTrainer(
            model=model_dir,
            reward_funcs=id_reward,
            args=grpo_config(RUN),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * 2}),
            **{name: lambda *a, **k: None},
        )
