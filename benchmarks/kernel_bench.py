"""The frame the three kernel benchmarks share: options, the run loop over cases and
implementations, the floor fractions, the printed table and the JSON record."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator

import torch
import triton
from fastppo.kernels.token_logprobs import triton as token_kernels

from .common import (
    bench,
    copy_bandwidth_bytes_per_s,
    environment,
    failure_note,
    markdown_table,
    matmul_flops_per_s,
    on_gpu,
    peak_memory_bytes,
    results_dir,
    write_results_in,
)


@dataclasses.dataclass
class Impl:
    name: str
    run: Callable[[], object]  # one timed call (forward, or forward + backward)
    available: bool = True
    note: str = ""


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (always on CPU)")
    parser.add_argument("--out", help="results folder (default: benchmarks/results of the checkout)")
    return parser.parse_args(argv)


# torch.compile peers run at this vocabulary only (the targets' case): every other shape would be a
# compile of its own, and compile time is what a GPU session is short of.
COMPILE_VOCAB = 151936


# The targets' case. It runs first: a run stopped at its time limit has measured what matters most.
TARGET_CASE = (16384, COMPILE_VOCAB)


def logits_sizes(quick: bool) -> list[tuple[int, int]]:
    """(tokens, vocab) of the logits-in benchmarks: the issue's grid on GPU, target first; tiny on CPU."""
    if quick or not on_gpu():
        return list(itertools.product((64,), (1000, 32000)))
    grid = itertools.product((4096, 16384), (32000, 128256, COMPILE_VOCAB))
    return [TARGET_CASE] + [case for case in grid if case != TARGET_CASE]


# The launch choices of token_logprobs/triton.py a GPU run compares (module constants read at
# every launch): the streaming tile, the widest row held on chip, its warps, the L2 hints.
TUNABLES = ("MAX_BLOCK_V", "SINGLE_TILE_MAX_V", "SINGLE_TILE_WARPS", "L2_HINTS")


@contextlib.contextmanager
def block_limits(**overrides: int | bool) -> Iterator[None]:
    """Launch the Triton kernels with other ``TUNABLES`` than the defaults (lower-case keywords,
    e.g. ``max_block_v=16384``), restored on exit."""
    names = {name.lower(): name for name in TUNABLES}
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown kernel tunables {unknown}; known: {sorted(names)}")
    saved = {name: getattr(token_kernels, name) for name in TUNABLES}
    for key, value in overrides.items():
        setattr(token_kernels, names[key], value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(token_kernels, name, value)


def tile_variants(run: Callable[[], object], vocab: int, fused_loss: bool) -> list[Impl]:
    """``fastppo`` rows under other launch choices than the defaults (GPU only: the interpreter
    times nothing real). A streamed row: tiles of 4096 and 16384 beside the default 8192, and for
    the fused loss's two reads no L2 hints. A row the fused loss holds on chip as one tile: over 32
    warps instead of 16, or streamed twice in default tiles instead (``single_tile_max_v=0``)."""
    if not on_gpu():
        return []
    if fused_loss and triton.next_power_of_2(vocab) <= token_kernels.SINGLE_TILE_MAX_V:
        variants = {
            "fastppo[warps=32]": {"single_tile_warps": 32},
            "fastppo[stream]": {"single_tile_max_v": 0},
        }
    else:
        variants = {f"fastppo[block={b}]": {"max_block_v": b} for b in (4096, 16384)}
        if fused_loss:
            variants["fastppo[no-l2-hints]"] = {"l2_hints": False}

    def under(limits: dict) -> Callable[[], None]:
        def limited() -> None:
            with block_limits(**limits):
                run()

        return limited

    return [Impl(name, under(limits), note=f"tunables {limits}") for name, limits in variants.items()]


def policy_inputs(n_tokens: int, seq_len: int, device: str, old_logprob: float) -> dict:
    """labels-free per-token loss inputs for ``n_tokens`` split into sequences of ``seq_len``:
    old log-probs near ``old_logprob`` (ratios both sides of 1), a reference, advantages, mask."""
    batch = max(1, n_tokens // seq_len)
    length = n_tokens // batch
    return {
        "old": torch.full((batch, length), old_logprob, device=device)
        + 0.1 * torch.randn(batch, length, device=device),
        "ref": torch.full((batch, length), old_logprob, device=device),
        "advantages": torch.randn(batch, device=device),
        "mask": torch.ones(batch, length, device=device),
    }


def ceilings() -> dict:
    """The two measured ceilings every fraction is taken against."""
    return {"copy_bytes_per_s": copy_bandwidth_bytes_per_s(), "matmul_flops_per_s": matmul_flops_per_s()}


def measure(case: dict, impls: list[Impl], floor_ms: float, baseline: str) -> list[dict]:
    """Median time, peak extra memory and floor fraction of each implementation; ratio to ``baseline``."""
    rows = []
    for impl in impls:
        row = {**case, "impl": impl.name, "note": impl.note}
        if impl.available:
            try:
                timing = bench(impl.run)
                row.update(
                    median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms,
                    p80_ms=timing.p80_ms,
                    peak_extra_bytes=peak_memory_bytes(impl.run),
                    floor_ms=floor_ms,
                    floor_fraction=floor_ms / timing.median_ms,
                )
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
            except Exception as error:  # a peer that breaks on this device must not end the run
                row["note"] = failure_note(error, limit=200)
            finally:
                if on_gpu():
                    torch.cuda.empty_cache()
        rows.append(row)
    base = next((r.get("median_ms") for r in rows if r["impl"] == baseline), None)
    for row in rows:
        if base and row.get("median_ms"):
            row[f"speedup_vs_{baseline}"] = base / row["median_ms"]
    return rows


class Results:
    """One kernel benchmark's results file, rewritten after every case: a run stopped at its time
    limit keeps every case it finished."""

    def __init__(self, name: str, args: argparse.Namespace, extra: dict):
        self.name, self.extra = name, extra
        self.directory = results_dir(args.out)
        self.env = environment()
        self.rows: list[dict] = []
        self.path = None

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        self.path = write_results_in(self.directory, self.name, self.env, self.rows, self.extra)

    def finish(self, columns: list[str]) -> None:
        if self.env["cpu"]:
            print("CPU run: tiny sizes, a smoke test of the script, not a performance figure.")
        print(markdown_table(self.rows, columns))
        print(f"results: {self.path}")
