"""A legacy TRL (v0.19) PPO script runs on fastppo with only its import changed.

``LEGACY_SCRIPT`` is TRL v0.19.1's ``examples/scripts/ppo/ppo.py`` with ``from fastppo import
PPOConfig, PPOTrainer`` where it had ``from trl import``. Also changed, for TRL 1.16 (not fastppo):
``get_kbit_device_map`` and ``SIMPLE_CHAT_TEMPLATE`` are gone (the script needs neither here: no
quantization, the tokenizer has a chat template), ``ModelConfig.torch_dtype`` is now ``dtype`` and
``ModelConfig.trust_remote_code`` is gone (the ``from_pretrained`` calls drop it); and the eval split
is 4 prompts instead of 100, to stay fast. It loads every model and the data from local folders the
test writes (tiny random Llamas), parses legacy's command line, trains, saves and prints the
completions table.
"""

from __future__ import annotations

import json
import math
import runpy
import sys

import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

from fastppo.demo import build_policy, build_tokenizer

LEGACY_SCRIPT = '''
import shutil

import torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
)

from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config
from fastppo import PPOConfig, PPOTrainer


if __name__ == "__main__":
    parser = HfArgumentParser((ScriptArguments, PPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_into_dataclasses()
    # remove output_dir if exists
    shutil.rmtree(training_args.output_dir, ignore_errors=True)

    ################
    # Model & Tokenizer
    ################
    torch_dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        torch_dtype=torch_dtype,
        device_map=None,
        quantization_config=quantization_config,
    )

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, padding_side="left"
    )
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    value_model = AutoModelForSequenceClassification.from_pretrained(
        training_args.reward_model_path, num_labels=1
    )
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        training_args.reward_model_path, num_labels=1
    )
    policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)

    peft_config = get_peft_config(model_args)
    if peft_config is None:
        ref_policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)
    else:
        ref_policy = None

    ################
    # Dataset
    ################
    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, split=script_args.dataset_train_split
    )
    eval_samples = 4
    train_dataset = dataset.select(range(len(dataset) - eval_samples))
    eval_dataset = dataset.select(range(len(dataset) - eval_samples, len(dataset)))
    dataset_text_field = "prompt"

    def prepare_dataset(dataset, tokenizer):
        """pre-tokenize the dataset before training; only collate during training"""

        def tokenize(element):
            outputs = tokenizer(
                element[dataset_text_field],
                padding=False,
            )
            return {"input_ids": outputs["input_ids"]}

        return dataset.map(
            tokenize,
            batched=True,
            remove_columns=dataset.column_names,
            num_proc=training_args.dataset_num_proc,
        )

    # Compute that only on the main process for faster data processing.
    # see: https://github.com/huggingface/trl/pull/1255
    with PartialState().local_main_process_first():
        train_dataset = prepare_dataset(train_dataset, tokenizer)
        eval_dataset = prepare_dataset(eval_dataset, tokenizer)

    ################
    # Training
    ################
    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    trainer.train()

    # Save and push to hub
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    trainer.generate_completions()
'''


def write_local_models(root) -> dict[str, str]:
    """The tokenizer, an SFT policy and a reward model in folders, as the script loads them."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # what the script adds: the models' vocab has it
    paths = {name: str(root / name) for name in ("tokenizer", "sft", "reward")}
    tokenizer.save_pretrained(paths["tokenizer"])
    build_policy(tokenizer, seed=1).save_pretrained(paths["sft"])
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(paths["reward"])
    return paths


def test_legacy_ppo_script_runs_with_only_the_import_changed(tmp_path, monkeypatch, capsys):
    paths = write_local_models(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    words = ["cat", "dog", "sun", "red"]
    with open(data / "descriptiveness.jsonl", "w") as f:
        for i in range(20):  # 16 to train on, the last 4 to evaluate
            f.write(json.dumps({"prompt": f"say : {words[i % 4]}"}) + "\n")
    script = tmp_path / "ppo.py"
    script.write_text(LEGACY_SCRIPT)
    out = tmp_path / "models" / "minimal" / "ppo"
    argv = {  # legacy's documented command line (its first example), sized down
        "--dataset_name": str(data),
        "--dataset_train_split": "train",
        "--learning_rate": "3e-6",
        "--output_dir": str(out),
        "--per_device_train_batch_size": "8",
        "--gradient_accumulation_steps": "1",
        "--num_mini_batches": "2",  # a mini-batch of 4 rows: refused by fastppo before, run by legacy
        "--num_ppo_epochs": "1",
        "--total_episodes": "16",
        "--response_length": "4",
        "--model_name_or_path": paths["tokenizer"],
        "--sft_model_path": paths["sft"],
        "--reward_model_path": paths["reward"],
        "--missing_eos_penalty": "1.0",
        "--report_to": "none",
        "--disable_tqdm": "true",
    }
    monkeypatch.setattr(sys, "argv", [str(script), *(x for kv in argv.items() for x in kv)])
    trainer = runpy.run_path(str(script), run_name="__main__")["trainer"]

    # legacy's step count: ceil(total_episodes / batch_size) rollouts x num_ppo_epochs x num_mini_batches
    assert trainer.state.global_step == math.ceil(16 / 8) * 1 * 2
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert "score" in capsys.readouterr().out  # generate_completions printed its table
