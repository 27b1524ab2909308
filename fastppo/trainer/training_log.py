"""What a training run reports between two logs and where it goes: the weighted metrics of the logging
window, each optimizer step's loss, throughput, the ``metrics.jsonl`` file, the progress bar and the
reward curve drawn at the end. The trainer turns a window into a log record (``TrainerBase.log``);
this class holds the window and its checkpoint state."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from accelerate import Accelerator

from ..distributed import merge_metric_sums, sum_over_processes
from ..metrics import (
    METRICS_FILE,
    REWARD_PLOT_FILE,
    JsonlWriter,
    MetricsBuffer,
    ProgressBar,
    plot_reward_curve,
)


class TrainingLog:
    """The logging window of a run (see the module docstring); ``metrics.add`` records into it."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.metrics = MetricsBuffer()  # weighted per-minibatch means since the last log
        self.writer: JsonlWriter | None = None  # metrics.jsonl, main process only
        self.progress: ProgressBar | None = None
        self.step_losses: list[float] = []  # per-step losses since the last log (means over processes)
        self.loss_sum = 0.0  # over the whole run (TrainOutput.training_loss)
        self.tokens_since_log = 0
        self.last_log_time = time.perf_counter()
        self.latest: dict[str, float] = {}  # the last logged training values, shown by the progress bar

    def open(
        self, output_dir: str, history: list[dict], max_steps: int, step: int, disable: bool, description: str
    ) -> None:
        """The metrics file (rewritten from ``history``: a resumed run's file says what its checkpoint
        says) and the progress bar, on the main process; the throughput clock starts."""
        main = self.accelerator.is_main_process  # one metrics file and one progress bar per run
        self.writer = JsonlWriter(os.path.join(output_dir, METRICS_FILE)) if main else None
        for record in history if main else []:
            self.writer.write(record)
        self.progress = ProgressBar(max_steps, disable=disable or not main, description=description)
        self.progress.update(step, {})
        self.last_log_time = time.perf_counter()

    def add_tokens(self, count: int) -> None:
        self.tokens_since_log += count

    def add_step_loss(self, loss: float) -> None:
        """An optimizer step's loss; a skipped NaN window must not turn the logged and final loss NaN."""
        if math.isfinite(loss):
            self.step_losses.append(loss)
            self.loss_sum += loss

    def flush_window(
        self, record: dict[str, float], tokens_seen: int, skipped_steps: int, learning_rate: float | None
    ) -> None:
        """Add the window's training metrics to ``record`` (means over all its minibatches and all
        processes), the loss, the run's skipped steps, the learning rate and the throughput, and
        start a new window."""
        now = time.perf_counter()
        accelerator = self.accelerator
        if self.step_losses:  # already means over the processes
            record["loss"] = sum(self.step_losses) / len(self.step_losses)
            self.step_losses = []
        self.metrics.load_state_dict(merge_metric_sums(self.metrics.state_dict(), accelerator))
        record.update(self.metrics.flush())
        record["skipped_steps"] = skipped_steps  # run total of non-finite steps skipped
        if learning_rate is not None:
            record["learning_rate"] = learning_rate
        tokens = sum_over_processes(self.tokens_since_log, accelerator)
        if tokens:
            record["tokens/s"] = tokens / max(now - self.last_log_time, 1e-9)
            record["num_tokens"] = sum_over_processes(tokens_seen, accelerator)
        self.tokens_since_log, self.last_log_time = 0, now

    def write(self, record: dict[str, Any], training: bool) -> None:
        if self.writer is not None:
            self.writer.write(record)
        if training:
            self.latest = {k: v for k, v in record.items() if isinstance(v, (int, float))}

    def show(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(step, self.latest)

    def close(
        self, history: list[dict], output_dir: str, title: str, metric: str, kl_metric: str
    ) -> str | None:
        """Close the progress bar; the reward curve's path (None when nothing logged the reward)."""
        if self.progress is not None:
            self.progress.close()
        return plot_reward_curve(
            history,
            os.path.join(output_dir, REWARD_PLOT_FILE),
            title=title,
            metric=metric,
            kl_metric=kl_metric,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to log exactly as an uninterrupted one."""
        return {
            "loss_sum": self.loss_sum,
            "steps_loss": list(self.step_losses),
            "tokens_since_log": self.tokens_since_log,
            "metrics": self.metrics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = float(state["loss_sum"])
        self.step_losses = [float(v) for v in state["steps_loss"]]
        self.tokens_since_log = int(state["tokens_since_log"])
        self.metrics.load_state_dict(state["metrics"])
