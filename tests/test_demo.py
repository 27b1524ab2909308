"""The embedded demo: built in code, learns its task quickly, writes its metrics and plot."""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from fastppo.demo import build_dataset, build_tokenizer, run_demo, says_word
from fastppo.metrics import read_jsonl


@pytest.mark.slow  # learning: 120 GRPO steps
def test_reward_rises_within_bounded_steps(tmp_path):
    summary = run_demo(output_dir=str(tmp_path), max_steps=120, progress=False)
    # a random policy says the word ~30% of the time; copying it is learnt within ~100 steps
    assert summary["reward_start"] < 0.45
    assert summary["reward_end"] > summary["reward_start"] + 0.3
    records = read_jsonl(summary["metrics_file"])
    assert [r["step"] for r in records] == list(range(1, 121))
    assert all("kl" in r for r in records)  # the demo keeps a small beta, so KL is measured
    assert os.path.getsize(summary["reward_plot"]) > 0


def test_tokenizer_round_trips_through_save_and_auto_tokenizer(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("say : cat")["input_ids"] == tokenizer("say : cat")["input_ids"] == [2, 3, 4]
    assert reloaded.decode(tokenizer("cat dog")["input_ids"]) == "cat dog"
    assert (reloaded.pad_token, reloaded.eos_token) == ("<pad>", "<eos>")


def test_dataset_and_reward():
    data = build_dataset(size=4, seed=1)
    assert data[0]["prompt"] == f"say : {data[0]['word']}"
    assert says_word(["cat dog", "red", ""], word=["dog", "blue", "cat"]) == [1.0, 0.0, 0.0]
    chat = build_dataset(size=2, chat=True)
    assert chat[0]["prompt"][0]["role"] == "user"
    assert says_word([[{"role": "assistant", "content": "sun"}]], word=["sun"]) == [1.0]
