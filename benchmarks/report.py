"""Results JSON -> markdown: a table per result file, and the README's results block.

CPU and GPU results are never put in one table: each file is one run on one device, tables are
headed by that device, CPU runs are headed as smoke runs, and the README block is built from GPU
runs only (it says "no GPU run yet" until one exists, and is replaced only by a newer GPU run).

Run: ``python -m fastppo.benchmarks.report [--results DIR] [--readme README.md]``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from .common import markdown_table, results_dir

BLOCK_START = "<!-- fastppo-bench:start"
BLOCK_END = "<!-- fastppo-bench:end -->"
NO_GPU_RUN = (
    "No GPU run yet: these numbers are filled in from the first real GPU run "
    "(`bash benchmarks/gpu_session.sh`, see `benchmarks/GPU.md`). CPU runs are smoke tests, never figures."
)

# Columns shown per benchmark family (the name before the first '-'); other families show all scalars.
COLUMNS = {
    "step": [
        "trainer",
        "model",
        "tokens_per_step",
        "generation_ms",
        "scoring_ms",
        "training_ms",
        "step_ms",
        "train_tokens_per_s",
        "step_tokens_per_s",
        "train_flop_fraction",
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "train_speedup_vs_trl",
        "peak_memory_vs_trl",
        "optim",
        "attention",
        "note",
    ],
    "rollout": [
        "sampler",
        "model",
        "batch",
        "completion_len_measured",
        "warmup_ms",
        "first_token_ms",
        "last_token_ms",
        "tokens_per_s",
        "rollout_speedup_vs_trl-generate",
        "padding_waste",
        "peak_allocated_bytes",
        "graphs_compiled",
        "dtype",
        "note",
    ],
    "memory": [
        "kind",
        "trainer",
        "model",
        "axis",
        "batch",
        "prompt_len",
        "completion_len",
        "max_ok",
        "min_failed",
        "max_tokens_per_step",
        "peak_allocated_bytes_at_max",
        "max_tokens_vs_trl",
        "max_tokens_vs_trl_at_least",
        "algo",
        "num_frozen_layers",
        "reference",
        "optim",
        "parameter_bytes",
        "gradient_bytes",
        "optimizer_state_bytes",
        "static_bytes",
        "static_vs_copy_adamw_torch",
        "status",
    ],
}


def load_results(directory: str | Path) -> list[dict[str, Any]]:
    """Every results JSON under ``directory`` (newest first), each with ``path`` added."""
    results = []
    for path in Path(directory).rglob("*.json"):
        if path.name.endswith(".trace.json"):  # profiler traces: large, and not results
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "environment" in data and "rows" in data:
            results.append({**data, "path": str(path)})
    return sorted(results, key=lambda r: r["environment"].get("date", ""), reverse=True)


def is_cpu(result: dict[str, Any]) -> bool:
    return bool(result["environment"].get("cpu", True))  # unmarked: treat as CPU, never as a GPU figure


def family(result: dict[str, Any]) -> str:
    return result["benchmark"].split("-")[0]


RATIO_PREFIXES = ("train_speedup", "step_speedup", "rollout_speedup", "peak_memory_vs", "max_tokens_vs")


def _cell(key: str, value: Any) -> Any:
    """Human units for the columns whose name says what they hold; others as they are."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    if key.endswith("_bytes") or key.endswith("_bytes_at_max"):
        return f"{value / 2**30:.2f} GiB"
    if key.endswith("_fraction") or key == "padding_waste":
        return f"{value:.0%}"
    if key.startswith(RATIO_PREFIXES):
        return f"{value:.2f}x"
    if key.endswith("_per_s") or (key.endswith("_ms") and value >= 100):
        return f"{value:,.0f}"
    return value


def _scalar_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    return columns


def result_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    if not rows:
        return "(no rows)"
    present = {k for row in rows for k, v in row.items() if v is not None}  # all-empty columns are dropped
    columns = [c for c in COLUMNS.get(family(result), _scalar_columns(rows)) if c in present]
    return markdown_table([{c: _cell(c, row.get(c)) for c in columns} for row in rows], columns)


def heading(result: dict[str, Any]) -> str:
    env = result["environment"]
    where = "CPU smoke run (tiny shapes; not a performance figure)" if is_cpu(result) else env["device"]
    return f"{result['benchmark']} — {where}, {env.get('date', '?')}, commit {env.get('commit') or '?'}"


def render_markdown(results: list[dict[str, Any]]) -> str:
    """All results, GPU runs first, each file its own table under its device."""
    ordered = [r for r in results if not is_cpu(r)] + [r for r in results if is_cpu(r)]
    return "\n\n".join(f"### {heading(r)}\n\n{result_table(r)}" for r in ordered) + "\n"


def _versions(env: dict[str, Any]) -> str:
    names = ("fastppo", "trl", "torch", "triton", "transformers", "liger-kernel")
    return ", ".join(f"{n} {env['versions'][n]}" for n in names if env.get("versions", {}).get(n))


README_FAMILIES = ("step", "rollout", "memory", "token_logprobs", "policy_loss", "linear_loss")
# The logits-in kernel tables are long (every size, both modes): the README shows the targets' vocabulary.
README_VOCAB = {"token_logprobs": 151936, "policy_loss": 151936}


def _readme_rows(result: dict[str, Any]) -> dict[str, Any]:
    vocab = README_VOCAB.get(family(result))
    if vocab is None or not any(r.get("vocab") == vocab for r in result["rows"]):
        return result
    return {**result, "rows": [r for r in result["rows"] if r.get("vocab") == vocab]}


def render_readme_block(results: list[dict[str, Any]]) -> str:
    """The README's results block: the newest GPU run of each family (step, memory, kernels), with
    device, date, versions and what was not measured."""
    gpu = [r for r in results if not is_cpu(r)]
    latest = [next((r for r in gpu if family(r) == f), None) for f in README_FAMILIES]
    latest = [r for r in latest if r is not None]
    if not latest:
        return f"{BLOCK_START} date=none -->\n{NO_GPU_RUN}\n{BLOCK_END}"
    date = max(r["environment"]["date"] for r in latest)
    parts = [f"{BLOCK_START} date={date} -->"]
    for result in latest:
        env = result["environment"]
        parts.append(
            f"**{result['benchmark']}** on {env['device']}, {env['date'][:10]} "
            f"(commit {env.get('commit') or '?'}; {_versions(env)})\n"
        )
        parts.append(result_table(_readme_rows(result)) + "\n")
        if result.get("skipped"):
            missing = "; ".join(f"{name}: {why}" for name, why in result["skipped"].items())
            parts.append(f"Not measured: {missing}\n")
    parts.append(BLOCK_END)
    return "\n".join(parts)


def replace_readme_block(readme: str, block: str) -> str:
    """``readme`` with its results block replaced by ``block`` if ``block`` comes from a newer GPU run.

    The block sits between the start and end markers; a README without them is returned unchanged.
    A block without a GPU run never replaces one that has numbers.
    """
    pattern = re.compile(re.escape(BLOCK_START) + r" date=(\S+) -->.*?" + re.escape(BLOCK_END), re.S)
    current = pattern.search(readme)
    new_date = re.match(re.escape(BLOCK_START) + r" date=(\S+) -->", block)
    if current is None or new_date is None:
        return readme
    old, new = current.group(1), new_date.group(1)
    if new == "none" or (old != "none" and new <= old):
        return readme
    return readme[: current.start()] + block + readme[current.end() :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--results", type=Path, default=None, help="results folder (default benchmarks/results/)"
    )
    parser.add_argument(
        "--readme", type=Path, default=None, help="update this README's results block in place"
    )
    parser.add_argument(
        "--write", type=Path, default=None, help="also write the markdown report to this file"
    )
    parser.add_argument("--readme-block", action="store_true", help="print only the README results block")
    args = parser.parse_args(argv)
    results = load_results(results_dir(args.results))
    if args.readme_block:
        print(render_readme_block(results))
        return 0
    text = render_markdown(results) if results else "(no results)\n"
    print(text)
    if args.write:
        args.write.write_text(text)
    if args.readme:
        before = args.readme.read_text()
        after = replace_readme_block(before, render_readme_block(results))
        args.readme.write_text(after)
        print("README block " + ("updated" if after != before else "unchanged (no newer GPU run)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
