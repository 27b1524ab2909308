"""A TRL user's GRPO script runs with only its import changed: the same text, written as TRL's
quickstart writes one (a config, a Python reward function, a ``datasets.Dataset`` of prompts, the
tokenizer as ``processing_class``, ``train()``, the summary row's ``train_loss``, ``save_model()``),
runs under ``from trl import`` and ``from fastppo import`` alike (in this process: a few seconds)."""

from __future__ import annotations

import math
import os

import pytest

# TRL's quickstart, on a local model folder. bf16=False: TRL's bf16 default needs a GPU, and the
# same script must run under both libraries on a CPU machine.
SCRIPT = """
import sys

import datasets
from transformers import AutoTokenizer

from {library} import GRPOConfig, GRPOTrainer

model_path, output_dir = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_path)
dataset = datasets.Dataset.from_dict({{"prompt": ["say : cat", "say : dog", "say : sun", "say : red"]}})


def reward_len(completions, **kwargs):
    return [-abs(6 - len(completion.split())) for completion in completions]


training_args = GRPOConfig(
    output_dir=output_dir,
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    max_steps=2,
    logging_steps=1,
    report_to="none",
    optim="sgd",
    bf16=False,
)
trainer = GRPOTrainer(
    model=model_path,
    reward_funcs=[reward_len],
    args=training_args,
    train_dataset=dataset,
    processing_class=tokenizer,
)
trainer.train()
train_loss = trainer.state.log_history[-1]["train_loss"]
print(f"train_loss={{train_loss}}")
trainer.save_model()
"""


@pytest.mark.parametrize("library", ["fastppo", "trl"])
def test_the_same_trl_script_runs_with_either_import(library, model_dir, tmp_path, monkeypatch, capsys):
    output_dir = str(tmp_path / "out")
    monkeypatch.setattr("sys.argv", ["train_grpo.py", model_dir, output_dir])
    namespace = {"__name__": "__main__"}
    exec(compile(SCRIPT.format(library=library), "train_grpo.py", "exec"), namespace)
    trainer = namespace["trainer"]
    assert type(trainer).__module__.startswith(library)
    assert trainer.state.global_step == 2
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train_loss=")]
    assert math.isfinite(float(line.removeprefix("train_loss=")))
    summary = trainer.state.log_history[-1]
    assert {
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "train_loss",
    } <= summary.keys()
    assert summary["train_samples_per_second"] == pytest.approx(2 * 4 / summary["train_runtime"], rel=0.01)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(output_dir))
    assert type(trainer.optimizer.optimizer).__name__ == "SGD"  # accelerate's wrapper around it
