"""``fastppo bench``: the benchmark suites behind one command, with progress bars and a report.

Suites:
  kernels  log-probs, fused policy loss and linear fused loss against their peers (one script each)
  step     one full GRPO iteration, fastppo against TRL's GRPOTrainer, phase by phase (bench_step),
           and the rollout table: each sampler alone on the same prompts (bench_rollout)
  memory   the largest batch that trains, fastppo against TRL (bench_memory; accounting on CPU)
  all      the three in that order

Every run writes JSON under ``--out`` (default ``benchmarks/results/`` of the checkout), then a
markdown summary and plots of what that folder holds for this device. A CPU run marks itself CPU
and is never tabulated or plotted with GPU results.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from . import bench_memory, bench_step, plots, report
from .common import device_tag, on_gpu, results_dir

SUITES = ("kernels", "step", "memory", "all")
KERNEL_SCRIPTS = ("bench_token_logprobs", "bench_policy_loss", "bench_linear_loss")
# The scripts run as subprocesses of the installed package, from the results folder: the checkout's
# root must not be on sys.path, where its kernels/ folder would shadow Hugging Face's `kernels`.
PACKAGE = "fastppo.benchmarks" if importlib.util.find_spec("fastppo.benchmarks") else __package__


@dataclasses.dataclass
class Outcome:
    """What one suite produced: result files, or the error that stopped it."""

    suite: str
    files: list[Path] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


def quiet_libraries() -> None:
    """Keep the progress bars readable: no per-load bars or deprecation chatter from the libraries."""
    import transformers

    # bitsandbytes' CPU backend warns at import about an optional 4-bit kernel no benchmark uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def run_kernels(args: argparse.Namespace, out_dir: Path, progress: Progress) -> Outcome:
    outcome = Outcome("kernels")
    task = progress.add_task("kernels", total=len(KERNEL_SCRIPTS))
    for script in KERNEL_SCRIPTS:
        progress.update(task, description=f"kernels: {script}")
        if importlib.util.find_spec(f"{PACKAGE}.{script}") is None:
            outcome.errors.append(f"{script}: not found in {PACKAGE}")
            progress.advance(task)
            continue
        before = set(out_dir.glob("*.json"))
        command = [sys.executable, "-m", f"{PACKAGE}.{script}", "--out", str(out_dir)]
        if args.quick:
            command.append("--quick")
        cwd = out_dir if PACKAGE == "fastppo.benchmarks" else Path(__file__).resolve().parents[1]
        done = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            outcome.errors.append(f"{script} exited {done.returncode}:\n{tail}")
        outcome.files += sorted(set(out_dir.glob("*.json")) - before)
        progress.advance(task)
    return outcome


def run_step(args: argparse.Namespace, out_dir: Path, progress: Progress) -> Outcome:
    settings = bench_step.settings_from(args)
    names = [n for n, spec in bench_step.TRAINERS.items() if spec.algo == "grpo"]
    runnable = [n for n in names if not bench_step.TRAINERS[n].unavailable()]
    steps = settings.warmup_steps + settings.timed_steps + args.profile
    task = progress.add_task(f"step: {settings.model}", total=steps * len(runnable))
    path = bench_step.run(
        settings,
        names,
        out_dir,
        args.profile,
        on_step=lambda: progress.advance(task),
        samplers=bench_step.sampler_names("all"),  # the rollout table beside the trainers
    )
    rollout = json.loads(path.read_text()).get("rollout_results")
    return Outcome("step", [path, *([path.parent / rollout] if rollout else [])])


def run_memory(args: argparse.Namespace, out_dir: Path, progress: Progress) -> Outcome:
    model = args.model or "qwen2.5-1.5b"
    settings = bench_memory.quick_search(model) if args.quick else bench_memory.MemorySettings(model=model)
    trainers = list(bench_memory.DEFAULT_TRAINERS)
    total = settings.max_probes * len(trainers) if on_gpu() else 1  # at most; the search may stop sooner
    task = progress.add_task(f"memory: {settings.model}", total=total)
    path = bench_memory.run(settings, trainers, out_dir, args.quick, on_probe=lambda: progress.advance(task))
    progress.update(task, completed=total)
    return Outcome("memory", [path])


RUNNERS: dict[str, Callable[[argparse.Namespace, Path, Progress], Outcome]] = {
    "kernels": run_kernels,
    "step": run_step,
    "memory": run_memory,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastppo bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:7]),
    )
    parser.add_argument("suite", choices=SUITES, help="what to run")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run; never a figure)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="step suite: Chrome trace + NVTX ranges + top-kernel summary of one extra step",
    )
    parser.add_argument(
        "--model",
        default=None,
        choices=bench_step.MODEL_NAMES,
        help="architecture of the step and memory suites (default qwen2.5-1.5b; --quick: 0.5b)",
    )
    args = parser.parse_args(argv)
    for name in ("batch", "num_generations", "prompt_len", "completion_len", "timed_steps"):
        setattr(args, name, None)  # bench_step's size overrides are its own flags, not the suite's
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = results_dir(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    quiet_libraries()
    where = f"GPU: {torch.cuda.get_device_name()}" if on_gpu() else "CPU (results marked cpu)"
    console.print(f"[bold]fastppo bench {args.suite}[/] on {where} -> {out_dir}")
    suites = ["kernels", "step", "memory"] if args.suite == "all" else [args.suite]
    outcomes = []
    start = time.monotonic()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        for suite in suites:
            try:
                outcomes.append(RUNNERS[suite](args, out_dir, progress))
            except Exception as error:  # one broken suite must not hide the others' results
                outcomes.append(Outcome(suite, errors=[f"{type(error).__name__}: {error}"]))
    finish(outcomes, out_dir, console, time.monotonic() - start)
    return 1 if any(o.errors for o in outcomes) else 0


def finish(outcomes: list[Outcome], out_dir: Path, console: Console, seconds: float) -> None:
    """Summary markdown and plots of the folder (this device's runs), then this run's tables."""
    produced = {str(p) for o in outcomes for p in o.files}
    results = report.load_results(out_dir)
    ours = [r for r in results if r["path"] in produced]
    if ours:
        tag = device_tag(ours[0]["environment"])
        same_device = [r for r in results if device_tag(r["environment"]) == tag]
        (out_dir / f"summary-{tag}.md").write_text(report.render_markdown(same_device))
        for path in plots.plot_results(same_device, out_dir):
            console.print(f"plot: {path}")
        print(report.render_markdown(ours))  # plain: rich would re-wrap the table rows
    for outcome in outcomes:
        for error in outcome.errors:
            console.print(f"[red]{outcome.suite} failed:[/] {error}", highlight=False)
    console.print(f"{len(produced)} result file(s) in {out_dir} after {seconds:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
