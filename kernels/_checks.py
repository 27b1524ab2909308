"""Input validation shared by every kernel entry point: one early, readable error per bad value."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {tensor.dtype}")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_same_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], expected_from: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} ({expected_from})"
        )


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must be integer ids in [0, vocab_size) or ignore_index. One device sync."""
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32) token ids, got dtype {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"label {value} is outside the vocabulary [0, {vocab_size}) and is not "
            f"ignore_index={ignore_index} (a tokenizer/model vocab mismatch?)"
        )


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Reject NaN/inf in small per-token or per-sequence inputs (advantages, old log-probs). One sync."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf; expected finite values")


def check_no_overlap(name: str, tensor: torch.Tensor, why: str) -> None:
    """Refuse a tensor whose elements share memory (a stride-0 or interleaved view, such as
    ``x.expand(...)``): writing into it would race, and one element would get two values.

    Sufficient test: with the dims of size > 1 sorted by stride, each stride must reach past the
    span of the dims inside it. It refuses some exotic layouts that do not overlap; a copy serves.
    """
    span = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(tensor.shape, tensor.stride(), strict=True) if sz > 1
    ):
        if stride < span:
            raise ValueError(
                f"{name} has elements that share memory (shape {tuple(tensor.shape)}, strides "
                f"{tensor.stride()}): {why}"
            )
        span += stride * (size - 1)
