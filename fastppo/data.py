"""Prompt datasets: the check every trainer runs at construction (so a bad dataset fails before any
model work) and the endless stream of prompt batches a run draws its rollouts from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def check_prompt_dataset(
    name: str,
    dataset: Any,
    columns: tuple[str, ...],
    min_rows: int = 1,
    rollout_size: str = "",
    required: bool = False,
) -> Any:
    """A map-style dataset (``datasets.Dataset`` or a list of dicts) whose first row holds one of
    ``columns``, with at least ``min_rows`` rows (``rollout_size`` says where that number comes
    from); None passes unless ``required``."""
    if dataset is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(dataset, dict):
        raise ValueError(f"{name} as a dict of datasets is not supported; pass one datasets.Dataset")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"{name} must be a datasets.Dataset or a list of dicts (an IterableDataset is not supported)"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    first = dataset[0]
    if not isinstance(first, dict) or not set(columns) & set(first):
        found = list(first) if isinstance(first, dict) else type(first).__name__
        names = " or ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c!r}" for c in columns)
        hints = ", or ".join(COLUMN_HINTS[c] for c in columns)
        raise ValueError(f"{name} needs {names} column ({hints}); it has {found}")
    if len(dataset) < min_rows:
        raise ValueError(
            f"{name} has {len(dataset)} prompts but one rollout needs {rollout_size} = {min_rows}"
        )
    return dataset


# What each prompt column a trainer reads holds.
COLUMN_HINTS = {"prompt": "text or chat messages", "input_ids": "tokenised prompts"}


def prompt_batches(
    dataset: Any, size: int, seed: int, shuffle: bool = True
) -> Iterator[list[dict[str, Any]]]:
    """Endless batches of ``size`` dataset rows: reshuffled each epoch, an incomplete last batch dropped."""
    count = len(dataset)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
        for start in range(0, count - size + 1, size):
            yield [dataset[int(i)] for i in order[start : start + size]]
