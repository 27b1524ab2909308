"""The embedded task: "say : <word>" -> reward 1 when the completion contains <word>.

Everything is built in code (no downloads): a word-level tokenizer over a tiny vocabulary, a
randomly initialised Llama policy (a real transformers architecture, so the trainer runs the same
code path as on a real checkpoint), and a verifiable reward. A random policy says the word by luck
about a fifth of the time; learning to copy the prompt's last word drives the reward to ~1.
"""

from __future__ import annotations

import random
from typing import Any

import torch

WORDS = ("cat", "dog", "red", "blue", "sun", "moon", "tree", "fish", "star", "rain", "milk", "bird")
SPECIALS = ("<pad>", "<eos>")
VOCAB = (*SPECIALS, "say", ":", *WORDS)
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def build_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (whitespace split) with pad/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_policy(tokenizer: Any, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Any:
    """A tiny randomly initialised ``LlamaForCausalLM`` (tied embeddings, fixed seed).

    Llama rather than Qwen2: transformers 5 rebuilds any tokenizer saved next to a Qwen2 config as a
    byte-level BPE (Qwen2Tokenizer), which would garble this word-level one on reload.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_dataset(size: int = 256, seed: int = 0, chat: bool = False) -> Any:
    """``datasets.Dataset`` with "prompt" (text, or one user message) and the target "word"."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(size)]
    prompts = [f"say : {w}" for w in words]
    if chat:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Dataset.from_dict({"prompt": prompts, "word": words})


def _text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def says_word(completions: list, word: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion contains the prompt's word, else 0.0 (TRL reward-function signature)."""
    return [float(w in _text(c).split()) for c, w in zip(completions, word, strict=True)]
