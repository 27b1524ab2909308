"""The largest batch (or completion length) that trains: fastppo against TRL's GRPOTrainer.

On GPU each probe runs one full GRPO step (generation, scoring, training) of the step benchmark's
workload; an out-of-memory error marks it as not fitting. Along the searched axis (the batch, in
completions per step and whole groups, at fixed lengths; or the completion length at a fixed
batch) the value doubles from ``start`` until a probe fails, then bisects between the last fit
and the first failure. Probes are capped per trainer and seconds for the whole search (what is left
is shared by the trainers still to search; a probe whose predicted length would overrun is not
started), so a result may be a bracket: ``max_ok`` fits, ``min_failed`` did not (None: never
failed). ``status`` says which. The row also gives the tokens per step at ``max_ok``: batch *
(prompt_len + completion_len). The ratio to TRL is a ratio only when both searches ran out of
memory (``max_tokens_vs_trl``); when only TRL did it is a lower bound (``..._at_least``); else none.
The results file is rewritten after each trainer, and a search stopped by SIGINT (a time limit)
keeps its probes so far.

On CPU nothing can run out of memory that means anything, so no probe runs: the rows hold the
byte *accounting* of ``fastppo.memory.accounting`` (parameters, gradients, optimizer state of
policy, reference and PPO's critic; deep copies vs the shared frozen trunk, torch vs 8-bit AdamW)
for the real model shapes, marked ``"kind": "accounting"`` and never a measurement.

Run: ``python -m fastppo.benchmarks.bench_memory [--quick] [--model M] [--axis batch] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import report
from .bench_step import (
    MODEL_NAMES,
    TRAINERS,
    StepSettings,
    Workload,
    measure,
    model_config,
    prepare_workload,
)
from .common import environment, failure_note, on_gpu, results_dir, write_results_in

DEFAULT_TRAINERS = ("fastppo", "trl")


AXES = ("batch", "completion_len")
LENGTH_STEP = 128  # completion lengths are searched in multiples of this


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """The search: one axis doubled then bisected, the rest fixed, capped in probes and seconds."""

    model: str = "qwen2.5-1.5b"
    axis: str = "batch"  # "batch" (completions per step) or "completion_len" (tokens per completion)
    num_generations: int = 8  # batches are multiples of this (whole groups)
    batch: int = 8  # fixed when axis == "completion_len"
    prompt_len: int = 128
    completion_len: int = 128  # fixed when axis == "batch"
    start: int = 128  # first probe on the axis; doubled while it fits
    cap: int = 4096  # never probe above this
    max_probes: int = 7  # per trainer
    budget_s: float = 300.0  # the whole search, shared by the trainers
    seed: int = 0

    @property
    def step(self) -> int:
        return self.num_generations if self.axis == "batch" else LENGTH_STEP

    def check(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")


def quick_search(model: str) -> MemorySettings:
    """Short sequences and few probes: a smoke run of the search itself."""
    return MemorySettings(
        model=model, prompt_len=64, completion_len=64, start=8, cap=2048, max_probes=4, budget_s=120.0
    )


@dataclasses.dataclass
class Search:
    """Outcome of a largest-fit search; ``probes`` lists (batch, fitted, seconds)."""

    max_ok: int | None = None
    min_failed: int | None = None
    probes: list[tuple[int, bool, float]] = dataclasses.field(default_factory=list)
    interrupted: bool = False  # SIGINT (the stage's time limit) arrived during a probe


def largest_fitting(
    fits: Callable[[int], bool], step: int, start: int, cap: int, max_probes: int, budget_s: float
) -> Search:
    """Largest multiple of ``step`` in ``[step, cap]`` for which ``fits`` holds, assuming it holds below
    some threshold and fails above. Doubles from ``start`` until a probe fails (or ``cap``), then
    bisects between the last fit (or 0) and the first failure. Stops early when out of probes or
    time (a probe is not started when 1.5x the last one's seconds would cross the deadline), or on
    KeyboardInterrupt, leaving the bracket ``[max_ok, min_failed)``."""
    if start % step or cap % step or not step <= start <= cap:
        raise ValueError(
            f"need step | start, step | cap and step <= start <= cap; got {step}, {start}, {cap}"
        )
    search = Search()
    deadline = time.monotonic() + budget_s

    def probe(batch: int) -> bool:
        began = time.monotonic()
        try:
            ok = fits(batch)
        except KeyboardInterrupt:
            search.interrupted = True
            return False
        search.probes.append((batch, ok, time.monotonic() - began))
        if ok:
            search.max_ok = batch
        else:
            search.min_failed = batch
        return ok

    def budget_left() -> bool:
        predicted = 1.5 * search.probes[-1][2] if search.probes else 0.0  # the next probe is larger
        return (
            not search.interrupted
            and len(search.probes) < max_probes
            and time.monotonic() + predicted < deadline
        )

    batch = start
    while budget_left() and probe(batch) and batch < cap:
        batch = min(2 * batch, cap)
    while search.min_failed is not None and budget_left():
        low = search.max_ok or 0
        mid = (low + search.min_failed) // 2 // step * step
        if mid <= low:
            break
        probe(mid)
    return search


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return (
        isinstance(error, torch.cuda.OutOfMemoryError)
        or "out of memory" in text.lower()
        or "CUBLAS_STATUS_ALLOC_FAILED" in text  # cuBLAS failing to allocate its workspace
    )


def search_trainer(
    name: str,
    settings: MemorySettings,
    workload: Workload,
    work_dir: Path,
    on_probe: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Search one trainer's largest value on ``settings.axis`` within ``settings.budget_s``; its row.
    Errors other than running out of memory propagate."""
    peaks: dict[int, int] = {}

    def fits(value: int) -> bool:
        probe = dataclasses.replace(
            workload.settings, warmup_steps=0, timed_steps=1, **{settings.axis: value}
        )
        try:
            row = measure(TRAINERS[name], dataclasses.replace(workload, settings=probe), work_dir)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # cuBLAS reports OOM as RuntimeError
            if not _is_oom(error):
                raise
            return False
        finally:
            if on_probe is not None:
                on_probe()
            torch.cuda.empty_cache()
        peaks[value] = row["peak_allocated_bytes"]
        return True

    search = largest_fitting(
        fits, settings.step, settings.start, settings.cap, settings.max_probes, settings.budget_s
    )

    def tokens_at(value: int | None) -> int | None:
        return (
            None
            if value is None
            else dataclasses.replace(workload.settings, **{settings.axis: value}).tokens_per_step
        )

    if search.interrupted:
        status = "interrupted (time limit)"
    elif search.min_failed is not None:
        status = "bracketed"
    elif search.max_ok == settings.cap:
        status = "fits at the cap"
    else:
        status = "out of probes or time before running out of memory"
    return {
        "kind": "measurement",
        "trainer": name,
        "model": settings.model,
        "axis": settings.axis,
        "batch": None if settings.axis == "batch" else settings.batch,
        "prompt_len": settings.prompt_len,
        "completion_len": None if settings.axis == "completion_len" else settings.completion_len,
        "max_ok": search.max_ok,
        "min_failed": search.min_failed,
        "max_tokens_per_step": tokens_at(search.max_ok),
        "min_failed_tokens_per_step": tokens_at(search.min_failed),
        "peak_allocated_bytes_at_max": peaks.get(search.max_ok),
        "status": status,
        "probes": [{settings.axis: v, "fits": ok, "seconds": round(t, 2)} for v, ok, t in search.probes],
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row's largest tokens per step against the baseline trainer's: a ratio when both ran
    out of memory, a lower bound when only the baseline did (this row's true maximum is larger)."""
    base = next((r for r in rows if TRAINERS[r["trainer"]].baseline and r.get("status") == "bracketed"), None)
    if base is None or not base["max_tokens_per_step"]:
        return
    for row in rows:
        if row is base or not row.get("max_tokens_per_step"):
            continue
        if row["status"] == "bracketed":
            row[f"max_tokens_vs_{base['trainer']}"] = row["max_tokens_per_step"] / base["max_tokens_per_step"]
        elif row["status"] == "fits at the cap" or row["status"].startswith("out of probes"):
            bound = row["max_tokens_per_step"] / base["min_failed_tokens_per_step"]
            row[f"max_tokens_vs_{base['trainer']}_at_least"] = bound


def measure_largest(
    settings: MemorySettings,
    trainers: list[str],
    on_probe: Callable[[], None] | None = None,
    on_row: Callable[[list[dict], dict[str, str]], None] | None = None,
) -> tuple[list[dict], dict[str, str]]:
    """Each trainer's search, one after the other, sharing ``settings.budget_s``; ``on_row(rows,
    skipped)`` after each (the results so far)."""
    settings.check()
    deadline = time.monotonic() + settings.budget_s
    step = StepSettings(
        model=settings.model,
        num_generations=settings.num_generations,
        batch=settings.batch if settings.axis == "completion_len" else settings.num_generations,
        prompt_len=settings.prompt_len,
        completion_len=settings.completion_len,
        seed=settings.seed,
    )
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="fastppo-mem-") as tmp:
        workload = prepare_workload(step, Path(tmp) / "model")
        runnable = [n for n in trainers if not TRAINERS[n].unavailable()]
        skipped.update({n: TRAINERS[n].unavailable() for n in trainers if n not in runnable})
        for i, name in enumerate(runnable):
            share = (deadline - time.monotonic()) / (len(runnable) - i)  # what is left, shared out
            try:
                row = search_trainer(
                    name, dataclasses.replace(settings, budget_s=share), workload, Path(tmp), on_probe
                )
            except Exception as error:  # not an out-of-memory: this trainer is broken here
                skipped[name] = failure_note(error)
                row = None
            if row is not None:
                rows.append(row)
            add_ratios(rows)
            if on_row is not None:
                on_row(rows, skipped)
            if row is not None and row["status"].startswith("interrupted"):
                break  # the time limit: the rest would be killed mid-probe
    return rows, skipped


# What the accounting compares: the reference as a whole copy or sharing the policy's frozen trunk
# (half the layers, an illustration: the switch is num_frozen_layers), torch or 8-bit AdamW.
ACCOUNTING_OPTIMS = ("adamw_torch", "adamw_8bit")
ACCOUNTING_DTYPE = torch.bfloat16  # the dtype the step benchmark trains in on GPU


def accounting_modules(model: str, algo: str, frozen: int | None) -> list[torch.nn.Module]:
    """(policy, reference[, critic]) of ``model`` on the meta device (nothing allocated).

    ``frozen`` None: a deep-copied reference (and for PPO a whole second decoder + value head as the
    critic, TRL's layout); else the policy's embedding and first ``frozen`` layers are frozen and
    shared by a ``SharedTrunkReference`` (and a ``TrunkValueModel`` critic).
    """
    import copy

    from transformers import AutoModelForCausalLM

    from fastppo.critic import TrunkValueModel, ValueHead
    from fastppo.memory.trunk import freeze_trunk
    from fastppo.reference import SharedTrunkReference

    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(model_config(model), dtype=ACCOUNTING_DTYPE)
        if frozen is None:
            reference = copy.deepcopy(policy).requires_grad_(False)
            critic = torch.nn.ModuleList(
                [copy.deepcopy(policy.model), ValueHead(policy.config.hidden_size, dtype=ACCOUNTING_DTYPE)]
            )
        else:
            freeze_trunk(policy, frozen)
            reference = SharedTrunkReference(policy, frozen)
            critic = TrunkValueModel(policy, frozen)
    return [policy, reference] if algo == "grpo" else [policy, reference, critic]


def account(models: list[str]) -> list[dict]:
    """CPU: the static training memory (parameters, gradients, optimizer state of policy, reference
    and, for PPO, critic) of each real model shape, from ``fastppo.memory.accounting``: one formula,
    in one place, applied to meta-device modules. Activations and logits come on top."""
    from fastppo.memory.accounting import static_training_memory

    rows = []
    for model in models:
        depth = model_config(model).num_hidden_layers
        for algo in ("grpo", "ppo"):
            baseline = None
            for k in (None, depth // 2):
                modules = accounting_modules(model, algo, k)
                for optim_name in ACCOUNTING_OPTIMS:
                    memory = static_training_memory(modules, optim_name)
                    baseline = baseline or memory.total  # whole copies + torch AdamW: the first row
                    rows.append(
                        {
                            "kind": "accounting",
                            "algo": algo,
                            "model": model,
                            "dtype": str(ACCOUNTING_DTYPE).removeprefix("torch."),
                            "num_layers": depth,
                            "num_frozen_layers": k,
                            "reference": "deep copy" if k is None else "shared trunk",
                            "optim": optim_name,
                            "parameter_bytes": memory.parameters,
                            "gradient_bytes": memory.gradients,
                            "optimizer_state_bytes": memory.optimizer_states,
                            "static_bytes": memory.total,
                            "static_vs_copy_adamw_torch": memory.total / baseline,
                        }
                    )
    return rows


def run(
    settings: MemorySettings,
    trainers: list[str] | None = None,
    out: Path | None = None,
    quick: bool = False,
    on_probe: Callable[[], None] | None = None,
) -> Path:
    env = environment()
    out_dir = results_dir(out)
    names = list(trainers or DEFAULT_TRAINERS)
    name = f"memory-{settings.axis}-{settings.model}"
    if not on_gpu():
        rows = account([settings.model] if quick else list(MODEL_NAMES))
        extra = {"note": "CPU: byte accounting (formula), not a measurement; no probe ran"}
        return write_results_in(out_dir, name, env, rows, extra)

    def write(rows: list[dict], skipped: dict[str, str]) -> Path:
        extra = {
            "settings": dataclasses.asdict(settings),
            "skipped": skipped,
            "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
        }
        return write_results_in(out_dir, name, env, rows, extra)

    rows, skipped = measure_largest(settings, names, on_probe, on_row=write)
    return write(rows, skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small search (few probes, short sequences)")
    parser.add_argument("--model", default="qwen2.5-1.5b", choices=MODEL_NAMES)
    parser.add_argument(
        "--axis", default="batch", choices=AXES, help="what grows: the batch or the completion"
    )
    parser.add_argument(
        "--start", type=int, default=None, help="first probe on the axis (doubled while it fits)"
    )
    parser.add_argument("--cap", type=int, default=None, help="largest value probed")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    parser.add_argument("--trainers", default=None, help=f"comma list of {list(TRAINERS)}")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of probing, all trainers")
    parser.add_argument("--max-probes", type=int, default=None, help="probes per trainer")
    args = parser.parse_args(argv)
    settings = quick_search(args.model) if args.quick else MemorySettings(model=args.model)
    if args.axis == "completion_len":  # long completions: a few thousand tokens, in whole LENGTH_STEPs
        settings = dataclasses.replace(settings, axis=args.axis, start=1024, cap=32768)
    chosen = {"start": args.start, "cap": args.cap, "budget_s": args.budget_s, "max_probes": args.max_probes}
    settings = dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    path = run(settings, args.trainers.split(",") if args.trainers else None, args.out, args.quick)
    print(report.result_table(json.loads(path.read_text())))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
