"""Intra-op threads for training on the CPU, sized to the work so a busy machine does not stall it.

Every parallel region of PyTorch's OpenMP runtime (libgomp in the CPU wheels) ends at a barrier
that waits for every thread of the team. When another process holds one of the cores, the thread
scheduled behind it arrives late at every barrier, and the others spin-wait for it: the demo took
>150 s beside one busy process on 2 cores instead of 18 s. A small model's ops are too short for
threads to pay off (the same demo takes 17 s on one thread, idle or not), so training on CPU uses
one thread per ``PARAMETERS_PER_THREAD`` parameters, at most the CPUs this process may run on
(``os.sched_getaffinity``: the count torch starts with).

What is left to the user, and never overridden: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (read by
torch at start-up) and a ``torch.set_num_threads`` call made before the trainer is built (a count
other than the one torch starts with here). Nothing changes when training on a GPU.

The wait policy is not set here: libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` once, when
``import torch`` loads it, so setting them later does nothing. They must be set in the shell; with
several threads, ``OMP_WAIT_POLICY=PASSIVE`` spares a shared machine the spinning but costs an idle
one a thread wake-up per op, so it stays the user's choice (the log line says so).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

logger = logging.getLogger("fastppo")

# One intra-op thread per this many model parameters: below ~1M parameters (the demo has 75k) an
# op lasts microseconds and a second thread gains nothing idle while it stalls every op when its
# core is busy; a 0.5B model gets every core.
PARAMETERS_PER_THREAD = 1_000_000
# The environment variables torch reads its intra-op thread count from at start-up.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_chosen: int | None = None  # the count this module last set (a later trainer may choose again)


def threads_for(num_parameters: int, cores: int) -> int:
    """Intra-op threads for a model of ``num_parameters`` where torch starts with ``cores`` threads:
    one per ``PARAMETERS_PER_THREAD`` parameters, at least 1, at most ``cores``."""
    return max(1, min(cores, num_parameters // PARAMETERS_PER_THREAD))


def user_setting(env: Mapping[str, str], current: int, startup: int, chosen: int | None) -> str | None:
    """Why the current thread count is the user's to keep, or None when fastppo may choose it.

    ``current``: torch's thread count now; ``startup``: the count torch starts with in this
    environment; ``chosen``: the count fastppo set earlier in this process (None: never).
    """
    for name in THREAD_ENV_VARS:
        if env.get(name):
            return f"{name}={env[name]} is set"
    if current not in (startup, chosen):
        return f"torch.set_num_threads({current}) was called"
    return None


def startup_threads() -> int:
    """The intra-op thread count torch starts with: the CPUs in this process's affinity mask
    (``taskset``, cgroup cpusets), OpenMP's default, which torch 2.13's CPU wheels keep.

    Where a torch starts with another count (say, physical cores only), the count it runs with
    differs from this one and is kept as if the user had set it: a choice missed, never an override.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure_cpu_threads(model: nn.Module, device: torch.device) -> None:
    """On CPU, set torch's intra-op threads for ``model``'s size unless the user chose them; log it."""
    global _chosen
    if device.type != "cpu":
        return
    current, cores = torch.get_num_threads(), startup_threads()
    reason = user_setting(os.environ, current, cores, _chosen)
    if reason is not None:
        logger.debug("fastppo: training on CPU with %d intra-op thread(s): %s", current, reason)
        return
    num_parameters = sum(p.numel() for p in model.parameters())
    threads = threads_for(num_parameters, cores)
    if threads != current:
        torch.set_num_threads(threads)
        shared = "; on a shared machine, OMP_WAIT_POLICY=PASSIVE set before Python starts stops the spinning"
        wait = "" if threads == 1 or "OMP_WAIT_POLICY" in os.environ else shared
        logger.info(
            "fastppo: training on CPU with %d intra-op thread(s) for %.2fM parameters (torch's default: %d) "
            "(set OMP_NUM_THREADS or call torch.set_num_threads to choose)%s",
            threads,
            num_parameters / 1e6,
            cores,
            wait,
        )
    _chosen = threads
