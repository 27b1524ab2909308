"""What every benchmark shares: the environment record, timers, memory probes, the two measured
ceilings (copy bandwidth, matmul rate) and the results writer.

On CUDA, times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed);
on CPU a synchronised wall-clock median, and every record says ``"cpu": true`` so CPU numbers
are never mixed with GPU ones.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if on_gpu() else f"cpu ({platform.processor() or platform.machine()})"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The commit measured: ``FASTPPO_COMMIT`` when set (an installed copy, as on a lent GPU, has no
    git history; benchmarks/gpu_session.sh sets it), else the checkout's HEAD."""
    if os.environ.get("FASTPPO_COMMIT"):
        return os.environ["FASTPPO_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=RESULTS_DIR.parent,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def environment() -> dict:
    """Device, library versions and git commit: stored with every result."""
    commit = _commit()
    return {
        "device": device_name(),
        "cpu": not on_gpu(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "versions": {
            name: _version(name)
            for name in ("torch", "triton", "transformers", "trl", "liger-kernel", "bitsandbytes", "fastppo")
        },
    }


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def bench(
    fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 5
) -> Timing:
    """Median time of ``fn()``; CUDA events via do_bench on GPU, synchronised wall clock on CPU.

    On GPU the timed window is at least 5 calls long (``rep_ms`` alone would time a 100 ms call once
    or twice, and its quantiles would be one sample)."""
    if on_gpu():
        from triton.testing import do_bench

        fn()  # compile / autotune outside the estimate
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        rep_ms = max(rep_ms, 5e3 * (time.perf_counter() - start))
        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(p50, p20, p80)
    fn()  # warm-up
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[-1])


def failure_note(error: BaseException, limit: int = 300) -> str:
    """One line saying why an implementation or trainer failed (its row or ``skipped`` entry)."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"failed: {type(error).__name__}: {first_line}"[:limit]


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before it (None on CPU)."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth_bytes_per_s(size_bytes: int = 2 * 2**30) -> float:
    """Measured device-to-device copy rate, counting bytes read plus written (the bandwidth ceiling)."""
    n = size_bytes // 4 if on_gpu() else 2**24
    device = "cuda" if on_gpu() else "cpu"
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3)


def matmul_flops_per_s(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate on random data (the FLOP ceiling)."""
    if not on_gpu():
        n, dtype = 512, torch.float32
    device = "cuda" if on_gpu() else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = bench(lambda: a @ b)
    return 2 * n**3 / (t.median_ms * 1e-3)


def results_dir(out: str | Path | None = None) -> Path:
    """Where results go: ``out`` (a ``--out`` flag) if given, else ``benchmarks/results/`` of the
    checkout when running from one, else ``./benchmark-results`` (an installed package's folder is
    no place for results)."""
    if out is not None:
        return Path(out)
    if (RESULTS_DIR.parents[1] / "pyproject.toml").is_file():
        return RESULTS_DIR
    return Path.cwd() / "benchmark-results"


def device_tag(env: dict | None = None) -> str:
    """The device part of file names (of ``env``, else of this machine): ``cpu`` for every CPU run,
    else the GPU's name."""
    env = env or {"cpu": not on_gpu(), "device": device_name()}
    return "cpu" if env.get("cpu", True) else env["device"].replace(" ", "-").replace("/", "-")


def write_results(name: str, env: dict, rows: list[dict], extra: dict | None = None) -> Path:
    """Write ``<results_dir()>/<name>-<device>-<date>.json`` and return its path."""
    return write_results_in(results_dir(), name, env, rows, extra)


def write_results_in(
    directory: str | Path, name: str, env: dict, rows: list[dict], extra: dict | None = None
) -> Path:
    """Write ``<directory>/<name>-<device>-<date>.json`` (device ``cpu`` for CPU runs) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = env["date"][:19].replace(":", "")
    path = directory / f"{name}-{device_tag(env)}-{stamp}.json"
    path.write_text(
        json.dumps({"benchmark": name, "environment": env, **(extra or {}), "rows": rows}, indent=2)
    )
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``columns`` from ``rows`` (floats to 3 significant digits)."""

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
