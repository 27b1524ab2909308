"""Where training metrics go: a weighted accumulator, the JSONL file, a rich progress bar, and the
reward-curve plot drawn at the end of a run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

METRICS_FILE = "metrics.jsonl"
REWARD_PLOT_FILE = "reward_curve.png"


class MetricsBuffer:
    """Weighted means of everything recorded since the last ``flush``.

    Per-minibatch statistics are weighted by the count they are a mean over (tokens, or sequences for
    sequence-level ratios), so a logged value is the mean over all minibatches of the logging window,
    not the last one. NaN values (e.g. a reward function that scored nothing) are skipped.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._weights: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        if value is None or math.isnan(value) or weight <= 0:
            return
        self._sums[name] += float(value) * weight
        self._weights[name] += weight

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the wall-clock seconds the block takes as ``name`` (no device sync)."""
        start = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - start)

    def flush(self) -> dict[str, float]:
        means = {name: self._sums[name] / self._weights[name] for name in self._sums}
        self._sums.clear()
        self._weights.clear()
        return means

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The pending sums and weights (a checkpoint between two logs resumes the same means)."""
        return {"sums": dict(self._sums), "weights": dict(self._weights)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self._sums = defaultdict(float, state["sums"])
        self._weights = defaultdict(float, state["weights"])


class JsonlWriter:
    """One JSON object per log call, appended and flushed at once (readable while training runs).
    A file left by an earlier run is replaced (a resumed run rewrites its history first)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            os.remove(path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """A rich progress bar over optimizer steps showing the latest reward and KL (when logged)."""

    def __init__(self, total: int, disable: bool = False, description: str = "training") -> None:
        self._progress = None
        if disable:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TextColumn("kl {task.fields[kl]}"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task(description, total=total, reward="-", kl="-")
        self._progress.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        fields = {}
        if "reward" in metrics:
            fields["reward"] = f"{metrics['reward']:.3f}"
        if "kl" in metrics:
            fields["kl"] = f"{metrics['kl']:.4f}"
        self._progress.update(self._task, completed=step, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def plot_reward_curve(
    records: Iterable[dict[str, Any]],
    path: str,
    title: str = "reward",
    metric: str = "reward",
    kl_metric: str = "kl",
) -> str | None:
    """Reward (mean, with a +- std band when ``<metric>_std`` is logged) per step, and KL beside it
    when logged. Returns the path, or None when no record holds the reward metric."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window (CI, SSH)
    import matplotlib.pyplot as plt

    records = [r for r in records if metric in r and "step" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    reward = [r[metric] for r in records]
    std = [r.get(f"{metric}_std", 0.0) or 0.0 for r in records]
    kl = [(r["step"], r[kl_metric]) for r in records if kl_metric in r]
    fig, axes = plt.subplots(1, 2 if kl else 1, figsize=(10 if kl else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, reward, color="tab:blue", label="reward")
    ax.fill_between(
        steps,
        [m - s for m, s in zip(reward, std, strict=True)],
        [m + s for m, s in zip(reward, std, strict=True)],
        color="tab:blue",
        alpha=0.2,
        label="reward +- std",
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    if kl:
        axes[0][1].plot([s for s, _ in kl], [v for _, v in kl], color="tab:red")
        axes[0][1].set_xlabel("optimizer step")
        axes[0][1].set_ylabel("KL to reference")
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_completions(rows: Sequence[dict[str, Any]], step: int, limit: int | None = None) -> None:
    """A rich table of sampled prompts, completions, rewards and advantages (log_completions)."""
    from rich.console import Console
    from rich.table import Table

    rows = list(rows)[:limit] if limit else list(rows)
    if not rows:
        return
    table = Table(title=f"completions at step {step}", show_lines=True)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
