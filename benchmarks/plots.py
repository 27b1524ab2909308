"""Results JSON -> PNG plots: throughput and memory against size, fastppo against its peers.

One figure per benchmark family and device: a CPU run and a GPU run never share an axis, and
CPU figures say in their title that they are smoke runs. Kernel benchmarks are plotted from their
rows' own keys (an implementation column, size columns, ``*_ms`` and ``*_bytes`` columns).

Run: ``python -m fastppo.benchmarks.plots [--results DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .common import device_tag, results_dir
from .report import family, is_cpu, load_results

SERIES_KEYS = ("trainer", "sampler", "impl", "provider", "implementation", "method", "variant", "backend")
SIZE_KEYS = ("model", "tokens_per_step", "n_tokens", "vocab", "hidden", "mode", "dtype")
GIB = 2**30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _title(name: str, result: dict[str, Any]) -> str:
    env = result["environment"]
    where = "CPU smoke run — tiny shapes, not performance figures" if is_cpu(result) else env["device"]
    return f"{name}\n{where}, {env.get('date', '?')[:10]}"


def _series_key(rows: list[dict[str, Any]]) -> str | None:
    return next((k for k in SERIES_KEYS if all(k in row for row in rows)), None)


def _size_label(row: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={row[k]}" if k not in ("model", "mode", "dtype") else str(row[k]) for k in SIZE_KEYS if k in row
    )


def _size_rank(row: dict[str, Any]) -> tuple:
    """Order of the x axis: model size (the "1.5b" in its name), then the numeric size keys."""
    billions = re.search(r"(\d+(?:\.\d+)?)b", str(row.get("model", "")).lower())
    numbers = [row[k] for k in SIZE_KEYS if isinstance(row.get(k), (int, float))]
    return (float(billions.group(1)) if billions else 0.0, *numbers)


def _lines(ax, points: dict[str, dict[str, float]], order: list[str], ylabel: str) -> None:
    """One line per series over the categorical sizes ``order``."""
    for series, values in sorted(points.items()):
        xs = [i for i, label in enumerate(order) if label in values]
        ax.plot(xs, [values[order[i]] for i in xs], marker="o", label=series)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _figure(
    panels: list[tuple[str, str]],
    rows: list[dict[str, Any]],
    series: str,
    title: str,
    path: Path,
    scale: dict[str, float],
) -> Path | None:
    """Line panels (column, axis label) against size, a line per ``series`` value (None: nothing to draw)."""
    panels = [
        (col, label) for col, label in panels if any(isinstance(r.get(col), (int, float)) for r in rows)
    ]
    if not panels:
        return None
    order = list(dict.fromkeys(_size_label(r) for r in sorted(rows, key=_size_rank)))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        points: dict[str, dict[str, float]] = defaultdict(dict)
        for row in rows:  # newest first: an older run at the same size is not drawn
            value = row.get(column)
            if isinstance(value, (int, float)):
                points[str(row[series])].setdefault(_size_label(row), value / scale.get(column, 1))
        _lines(ax, points, order, label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_group(name: str, results: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """One figure for the results of one benchmark family on one device (newest first)."""
    rows = [row for result in results for row in result["rows"]]
    series = _series_key(rows)
    if not rows or series is None:
        return None
    path = out_dir / f"plot-{name}-{device_tag(results[0]['environment'])}.png"
    title = _title(name, results[0])
    if name == "step":
        panels = [
            ("train_tokens_per_s", "training tokens/s"),
            ("step_tokens_per_s", "step tokens/s"),
            ("peak_allocated_bytes", "peak allocated (GiB)"),
        ]
    elif name == "rollout":
        panels = [
            ("tokens_per_s", "generated tokens/s"),
            ("last_token_ms", "time to last token (ms)"),
            ("peak_allocated_bytes", "peak allocated (GiB)"),
        ]
    elif name == "memory":
        panels = [
            ("max_tokens_per_step", "largest tokens/step that trains"),
            ("peak_allocated_bytes_at_max", "peak allocated at that size (GiB)"),
        ]
    else:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        panels = [(k, k.replace("_ms", " (ms)")) for k in keys if k.endswith("_ms")][:2]
        panels += [(k, k.replace("_bytes", " (GiB)")) for k in keys if k.endswith("_bytes")][:1]
    scale = {col: GIB for col, _ in panels if col.endswith("_bytes") or col.endswith("_bytes_at_max")}
    return _figure(panels, rows, series, title, path, scale)


def plot_results(results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """A figure per (benchmark family, device); returns the files written."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[(family(result), device_tag(result["environment"]))].append(result)
    written = [plot_group(name, group, Path(out_dir)) for (name, _), group in sorted(groups.items())]
    return [path for path in written if path is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--results", type=Path, default=None, help="results folder (default benchmarks/results/)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where the PNGs go (default: the results folder)"
    )
    args = parser.parse_args(argv)
    source = results_dir(args.results)
    for path in plot_results(load_results(source), args.out or source):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
