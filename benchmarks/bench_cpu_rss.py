"""Peak resident memory (RSS) of a short GRPO run on CPU: fastppo against TRL's GRPOTrainer on a
tiny-body model with a real 152k vocabulary, where the logits, not the weights, take the memory.

Each trainer trains in a fresh interpreter of its own (peak RSS, ``ru_maxrss``, is per process) on
the step benchmark's workload (``bench_step``: the same random model, tokenizer, prompts, reward,
batch, lengths, seed and config keywords; the quick shape's 2-layer, 64-wide body) with the
vocabulary set to ``--vocab``. ``imports_rss_bytes`` is the RSS before the workload is built
(torch, transformers, TRL imported), so ``peak - imports`` is what the run itself added. RSS is not
disturbed by other processes loading the CPU, so the figures hold on a busy machine too.

``fastppo@<bytes>`` rows run fastppo with ``kernel_chunk_bytes`` set (e.g. ``fastppo@1073741824``:
the GPU-sized chunk, the CPU default before it was sized by device).

Run: ``python -m fastppo.benchmarks.bench_cpu_rss [--vocab 151936] [--batch 16] [--completion-len 64]
[--trainers fastppo,trl,fastppo@1073741824] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import environment, markdown_table, write_results_in

DEFAULT_TRAINERS = ("fastppo", "trl")
WORKLOAD_OPTIONS = ("vocab", "batch", "num_generations", "prompt_len", "completion_len", "steps")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def settings_for(args: argparse.Namespace):
    from .bench_step import StepSettings

    return StepSettings.quick_settings(
        batch=args.batch,
        num_generations=args.num_generations,
        prompt_len=args.prompt_len,
        completion_len=args.completion_len,
        warmup_steps=0,
        timed_steps=args.steps,
    )


def child(trainer: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``trainer`` (``name`` or ``name@chunk_bytes``) in this process; its row."""
    import torch  # noqa: F401  (imported before the baseline reading, as every trainer needs it)
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from . import bench_step

    imports = peak_rss_bytes()
    name, _, chunk = trainer.partition("@")
    spec = bench_step.TRAINERS[name]
    if chunk:
        arguments = spec.arguments
        spec = dataclasses.replace(
            spec, arguments=lambda *a: {**arguments(*a), "kernel_chunk_bytes": int(chunk)}
        )
    # The quick body with the real vocabulary (bench_step shrinks the vocabulary with the body).
    bench_step.QUICK_SHAPE = {**bench_step.QUICK_SHAPE, "vocab_size": args.vocab}
    with tempfile.TemporaryDirectory(prefix="fastppo-rss-") as tmp:
        workload = bench_step.prepare_workload(settings_for(args), Path(tmp) / "model")
        row = bench_step.measure(spec, workload, Path(tmp))
    return {
        "trainer": trainer,
        "vocab": args.vocab,
        "batch": row["batch"],
        "prompt_len": row["prompt_len"],
        "completion_len": row["completion_len"],
        "steps": row["steps_timed"],
        "optim": row["optim"],
        "imports_rss_bytes": imports,
        "peak_rss_bytes": peak_rss_bytes(),
        "step_ms": row["step_ms"],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each trainer in its own interpreter, one after the other; ratios to TRL's peak."""
    flags = [f for o in WORKLOAD_OPTIONS for f in (f"--{o.replace('_', '-')}", str(getattr(args, o)))]
    rows = []
    for trainer in args.trainers.split(","):
        command = [sys.executable, "-m", __spec__.name, "--child", trainer, *flags]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{trainer} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["trainer"] == "trl"), None)
    for row in rows:
        row["peak_rss_gib"] = row["peak_rss_bytes"] / 2**30
        row["added_rss_gib"] = (row["peak_rss_bytes"] - row["imports_rss_bytes"]) / 2**30
        if base is not None:
            row["peak_vs_trl"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
            trl_added = base["peak_rss_bytes"] - base["imports_rss_bytes"]
            # None where TRL's run added nothing above its imports' peak (tiny shapes): no ratio
            row["added_vs_trl"] = (
                (row["peak_rss_bytes"] - row["imports_rss_bytes"]) / trl_added if trl_added > 0 else None
            )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5's by default)")
    parser.add_argument("--batch", type=int, default=16, help="completions per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument(
        "--trainers",
        default=",".join(DEFAULT_TRAINERS),
        help="comma list: fastppo, trl, fastppo@<bytes>",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write a results JSON into this folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one trainer, in this process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    rows = run(args)
    columns = ["trainer", "peak_rss_gib", "added_rss_gib", "peak_vs_trl", "added_vs_trl", "step_ms"]
    print(markdown_table(rows, [c for c in columns if c in rows[0]]))
    if args.out is not None:
        print(f"wrote {write_results_in(args.out, 'cpu-rss', environment(), rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
