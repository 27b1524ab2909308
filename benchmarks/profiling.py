"""Where the time of a training step goes: phase clocks, NVTX ranges and torch.profiler traces.

A trainer's step is split into phases (generation, scoring, training ...) by wrapping the
trainer's own methods, so the benchmark never re-implements a trainer loop to time it. Each phase
is, at once, a synchronised wall-clock interval (the numbers in the tables), an NVTX range (for
Nsight Systems on GPU) and a ``record_function`` range (so the Chrome trace shows the same phases).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .common import on_gpu


def _sync() -> None:
    # Phase boundaries must wait for queued GPU work, or the time lands in the next phase.
    if on_gpu():
        torch.cuda.synchronize()


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range on GPU (visible in Nsight Systems); nothing on CPU, where NVTX is absent."""
    if not on_gpu():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


class PhaseClock:
    """Synchronised wall-clock seconds per phase, one dict per training step.

    ``begin_step`` / ``end_step`` bracket an optimizer step (the whole iteration, ``"step"``);
    ``phase(name)`` or ``wrap(obj, method, name)`` time parts of it. Times of a phase entered
    several times in a step add up; nested phases are timed inclusively. A step begun and never
    ended (the one after the last) is dropped.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._current: defaultdict[str, float] | None = None
        self._step_start = 0.0
        self._open: list[str] = []
        self._wrapped: list[tuple[object, str, object, bool]] = []  # (obj, name, original, was own attribute)

    def begin_step(self) -> None:
        _sync()
        self._current = defaultdict(float)
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        _sync()
        if self._current is None:
            raise RuntimeError("end_step() without begin_step()")
        self._current["step"] = time.perf_counter() - self._step_start
        self.steps.append(dict(self._current))
        self._current = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        self._open.append(name)
        try:
            with nvtx_range(f"phase/{name}"), record_function(f"phase/{name}"):
                yield
                _sync()
        finally:
            self._open.pop()
            if self._current is not None:
                self._current[name] += time.perf_counter() - start

    def wrap(self, obj: object, method: str, name: str, *, inside: str | None = None) -> None:
        """Time every call of ``obj.method`` as phase ``name`` (only within phase ``inside`` if given).

        The wrapper is set on ``obj`` itself (an instance: its class and other instances are
        untouched); ``restore()`` puts the original back, which matters when ``obj`` is a module.
        """
        original = getattr(obj, method)
        self._wrapped.append((obj, method, original, method in vars(obj)))

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if inside is not None and inside not in self._open:
                return original(*args, **kwargs)
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(obj, method, timed)

    def restore(self) -> None:
        """Undo every ``wrap``, newest first."""
        while self._wrapped:
            obj, method, original, own = self._wrapped.pop()
            if own:
                setattr(obj, method, original)
            else:
                delattr(obj, method)  # the instance falls back to its class's method again

    def medians(self, skip: int = 0) -> dict[str, float]:
        """Median seconds of each phase over the steps after the first ``skip`` (warm-up)."""
        steps = self.steps[skip:]
        if not steps:
            raise ValueError(f"no timed steps: {len(self.steps)} recorded, {skip} skipped as warm-up")
        names = sorted({name for step in steps for name in step})
        return {name: statistics.median(s.get(name, 0.0) for s in steps) for name in names}


class StepProfiler:
    """torch.profiler over exactly one training step; writes a Chrome trace and a top-kernel summary.

    Used by the step benchmark on one extra step after the timed ones, so profiler overhead never
    reaches the reported times.
    """

    def __init__(self, out_dir: Path, name: str) -> None:
        self.trace_path = out_dir / f"{name}.trace.json.gz"  # gzipped by torch: ~10x smaller
        self.summary_path = out_dir / f"{name}.top-kernels.txt"
        self._prof: profile | None = None

    def start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu() else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def stop(self) -> None:
        if self._prof is None:
            raise RuntimeError("stop() without start()")
        _sync()
        self._prof.__exit__(None, None, None)
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.trace_path))
        self.summary_path.write_text(top_kernels(self._prof))
        self._prof = None


def top_kernels(prof: profile, limit: int = 15) -> str:
    """The ``limit`` operations (GPU kernels on CUDA) with the most self time, and each phase's total."""
    device = on_gpu()

    def self_us(event) -> float:
        if not device:
            return event.self_cpu_time_total
        if hasattr(event, "self_device_time_total"):
            return event.self_device_time_total
        return event.self_cuda_time_total  # its name before torch 2.4

    averages = prof.key_averages()
    events = [e for e in averages if not e.key.startswith("phase/")]
    phases = [e for e in averages if e.key.startswith("phase/")]
    total = sum(self_us(e) for e in events) or 1.0
    clock = "GPU" if device else "CPU"
    lines = [f"Top {limit} by self {clock} time (of {total / 1e3:.1f} ms in the profiled step)"]
    lines.append(f"{'self ms':>10} {'share':>6} {'calls':>7}  name")
    for event in sorted(events, key=self_us, reverse=True)[:limit]:
        lines.append(
            f"{self_us(event) / 1e3:10.2f} {self_us(event) / total:6.1%} {event.count:7d}  {event.key[:90]}"
        )
    if phases:
        lines.append("")
        lines.append("Phases (wall time on the CPU side, inclusive)")
        for event in sorted(phases, key=lambda e: e.cpu_time_total, reverse=True):
            lines.append(f"{event.cpu_time_total / 1e3:10.2f} ms  {event.key}")
    return "\n".join(lines) + "\n"
