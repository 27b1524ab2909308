"""The embedded default: a tiny real-architecture policy, an in-code tokenizer and a verifiable task."""

from .run import run_demo
from .task import build_dataset, build_policy, build_tokenizer, says_word

__all__ = ["build_dataset", "build_policy", "build_tokenizer", "run_demo", "says_word"]
