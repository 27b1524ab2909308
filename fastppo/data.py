"""Prompt datasets: the check every trainer runs at construction (so a bad dataset fails before any
model work) and the endless stream of prompt batches a run draws its rollouts from.

Map-style datasets (``datasets.Dataset``, a list of dicts) are read through a ``torch`` DataLoader
whose batches of indices are drawn in this process, so ``dataloader_num_workers`` only moves the
row fetching into worker processes: the order, and with it an exact resume, is the same with or
without workers, and a resumed run skips the batches drawn before its checkpoint without fetching
them. Iterable datasets (``datasets.IterableDataset`` or ``torch.utils.data.IterableDataset``) are
streamed as TRL streams them: ``datasets``' buffered shuffle with the run's seed, ``set_epoch`` each
pass (HF Trainer's reshuffle), an incomplete last batch of a pass dropped; a resumed run replays
the stream up to its position (deterministic, since every pass's order follows from the seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader


def is_streamed(dataset: Any) -> bool:
    """An iterable dataset: no length, no indexing, read as a stream."""
    return isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset))


def check_prompt_dataset(
    name: str,
    dataset: Any,
    columns: tuple[str, ...],
    min_rows: int = 1,
    rollout_size: str = "",
    required: bool = False,
    streamed_ok: bool = False,
    named_ok: bool = False,
) -> Any:
    """A map-style dataset (``datasets.Dataset`` or a list of dicts) whose first row holds one of
    ``columns``, with at least ``min_rows`` rows (``rollout_size`` says where that number comes
    from); None passes unless ``required``. ``streamed_ok``: an iterable dataset passes too (its
    first row is checked; its length is only known once streamed). ``named_ok``: a dict of such
    datasets (``DatasetDict`` included) passes, each checked, as HF Trainer's named eval sets."""
    if dataset is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(dataset, dict):
        if not named_ok:
            raise ValueError(f"{name} as a dict of datasets is not supported; pass one datasets.Dataset")
        if not dataset or not all(isinstance(key, str) for key in dataset):
            raise ValueError(
                f"{name} as a dict needs one or more datasets named by strings, got {list(dataset)}"
            )
        return {
            key: check_prompt_dataset(
                f"{name}[{key!r}]", value, columns, min_rows, rollout_size, True, streamed_ok
            )
            for key, value in dataset.items()
        }
    if is_streamed(dataset):
        if not streamed_ok:
            raise ValueError(f"{name} as an IterableDataset is not supported here; pass a datasets.Dataset")
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"{name} is empty")
        _check_columns(name, first, columns)
        return dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"{name} must be a datasets.Dataset, a list of dicts or an IterableDataset, "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    _check_columns(name, dataset[0], columns)
    if len(dataset) < min_rows:
        raise ValueError(
            f"{name} has {len(dataset)} prompts but one rollout needs {rollout_size} = {min_rows}"
        )
    return dataset


def _check_columns(name: str, first: Any, columns: tuple[str, ...]) -> None:
    if not isinstance(first, dict) or not set(columns) & set(first):
        found = list(first) if isinstance(first, dict) else type(first).__name__
        names = " or ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c!r}" for c in columns)
        hints = ", or ".join(COLUMN_HINTS[c] for c in columns)
        raise ValueError(f"{name} needs {names} column ({hints}); it has {found}")


# What each prompt column a trainer reads holds.
COLUMN_HINTS = {"prompt": "text or chat messages", "input_ids": "tokenised prompts"}


@dataclasses.dataclass(frozen=True)
class Loading:
    """TrainingArguments' DataLoader switches, as HF Trainer passes them to ``torch.utils.data.DataLoader``
    (``pin_memory`` only where there is an accelerator to pin for)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    multiprocessing_context: str | None = None

    @classmethod
    def from_args(cls, args: Any, device: torch.device) -> Loading:
        return cls(
            num_workers=args.dataloader_num_workers,
            pin_memory=bool(args.dataloader_pin_memory) and device.type != "cpu",
            persistent_workers=bool(args.dataloader_persistent_workers),
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
        )


def check_streamed_training(dataset: Any, max_steps: int, num_workers: int) -> None:
    """What a streamed training set needs, checked at construction: ``max_steps`` (HF Trainer's rule:
    the schedule needs the run's length, which a stream does not have) and the data read by this
    process (workers would each replay the whole stream: TRL forces 0 with a warning; fastppo says so)."""
    if not is_streamed(dataset):
        return
    if max_steps <= 0:
        raise ValueError(
            f"train_dataset is an IterableDataset, so max_steps must be set (> 0, got {max_steps}): a stream "
            "has no length, and the number of steps must be known for the learning-rate schedule"
        )
    if num_workers:
        raise ValueError(
            f"dataloader_num_workers={num_workers} with an IterableDataset train_dataset is not "
            "supported: each worker would read the whole stream (TRL overrides it to 0); set 0"
        )


def _rows(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DataLoader's collate function: the rows as they are (tokenising is the sampler's job)."""
    return batch


class PromptBatches:
    """Endless batches of ``size`` dataset rows, from batch ``skip`` on: reshuffled each pass, an
    incomplete last batch of a pass dropped (TRL's RepeatSampler drops it too). ``passes``: full
    passes over the data before the batch last yielded."""

    def __init__(
        self,
        dataset: Any,
        size: int,
        seed: int,
        shuffle: bool = True,
        skip: int = 0,
        loading: Loading | None = None,
    ):
        self.passes = 0
        if is_streamed(dataset):
            self._batches = self._streamed(dataset, size, seed, shuffle, skip)
        else:
            self._batches = self._indexed(dataset, size, seed, shuffle, skip, loading or Loading())

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return next(self._batches)

    def _indexed(
        self, dataset: Any, size: int, seed: int, shuffle: bool, skip: int, loading: Loading
    ) -> Iterator[list[dict[str, Any]]]:
        per_pass = len(dataset) // size
        indices = _IndexBatches(len(dataset), size, seed, shuffle, skip)
        # its own generator: the loader seeds its workers from it, never from torch's global RNG
        # (a draw there would shift every later sample, and a resumed run would draw it again)
        loader = DataLoader(
            dataset,
            batch_sampler=indices,
            collate_fn=_rows,
            generator=torch.Generator().manual_seed(seed),
            **dataclasses.asdict(loading),
        )
        for drawn, rows in enumerate(loader, start=skip):
            self.passes = drawn // per_pass
            yield rows

    def _streamed(
        self, dataset: Any, size: int, seed: int, shuffle: bool, skip: int
    ) -> Iterator[list[dict[str, Any]]]:
        if not isinstance(dataset, datasets.IterableDataset):  # a torch one: datasets' shuffle and epochs too
            dataset = datasets.IterableDataset.from_generator(_stream, gen_kwargs={"dataset": dataset})
        if shuffle:
            dataset = dataset.shuffle(seed=seed)  # buffered, as TRL's get_train_dataloader
        drawn = 0
        while True:
            dataset.set_epoch(self.passes)
            batch, in_pass = [], 0
            for row in dataset:
                batch.append(row)
                if len(batch) == size:
                    in_pass += 1
                    drawn += 1
                    if drawn > skip:
                        yield batch
                    batch = []
            if in_pass == 0:
                raise ValueError(
                    f"the train_dataset stream holds fewer prompts than one rollout needs ({size})"
                )
            self.passes += 1


class _IndexBatches:
    """The DataLoader's batch sampler: the dataset indices of each batch, drawn in this process (so
    workers never decide the order), from batch ``skip`` on without fetching the ones before."""

    def __init__(self, count: int, size: int, seed: int, shuffle: bool, skip: int):
        self.count, self.size, self.seed, self.shuffle, self.skip = count, size, seed, shuffle, skip

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        drawn = 0
        while True:
            order = (
                torch.randperm(self.count, generator=generator) if self.shuffle else torch.arange(self.count)
            )
            for start in range(0, self.count - self.size + 1, self.size):
                if drawn >= self.skip:
                    yield order[start : start + self.size].tolist()
                drawn += 1


def _stream(dataset: torch.utils.data.IterableDataset) -> Iterator[dict[str, Any]]:
    yield from dataset
