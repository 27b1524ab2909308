"""fastppo.cpu_runtime: the intra-op thread count chosen for CPU training, and the settings of the
user it must leave alone (thread variables, an earlier torch.set_num_threads, a GPU run)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastppo import cpu_runtime
from fastppo.cpu_runtime import PARAMETERS_PER_THREAD, configure_cpu_threads, threads_for, user_setting

CPU = torch.device("cpu")
STARTUP = 4  # the thread count torch "starts with" in these tests (whatever this machine has)


@pytest.fixture
def fresh_process(monkeypatch):
    """A process where torch runs its start-up count of STARTUP threads, no thread variable is set
    and fastppo has chosen nothing yet; torch's real count is restored afterwards."""
    before = torch.get_num_threads()
    for name in cpu_runtime.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_runtime, "startup_threads", lambda: STARTUP)
    monkeypatch.setattr(cpu_runtime, "_chosen", None)
    torch.set_num_threads(STARTUP)
    yield
    torch.set_num_threads(before)


def model_of(num_parameters: int) -> nn.Module:
    return nn.Linear(num_parameters, 1, bias=False)


def test_one_thread_per_million_parameters_within_the_cores():
    assert threads_for(75_072, cores=2) == 1  # the demo's policy: its ops are too short to share
    assert threads_for(0, cores=8) == 1
    assert threads_for(3 * PARAMETERS_PER_THREAD + 5, cores=16) == 3
    assert threads_for(494_000_000, cores=8) == 8  # Qwen2.5-0.5B: every core
    assert threads_for(494_000_000, cores=1) == 1


def test_thread_variables_and_earlier_set_num_threads_are_the_users():
    assert user_setting({"OMP_NUM_THREADS": "2"}, 2, 4, None) == "OMP_NUM_THREADS=2 is set"
    assert user_setting({"MKL_NUM_THREADS": "3"}, 3, 4, None) == "MKL_NUM_THREADS=3 is set"
    assert user_setting({}, 3, 4, None) == "torch.set_num_threads(3) was called"
    assert user_setting({}, 3, 4, 1) == "torch.set_num_threads(3) was called"  # after fastppo's choice
    assert user_setting({}, 4, 4, None) is None  # torch's own start-up count
    assert user_setting({}, 1, 4, 1) is None  # fastppo's earlier choice: a later trainer may choose again
    assert user_setting({"OMP_NUM_THREADS": ""}, 4, 4, None) is None  # empty: torch ignores it too


def test_a_small_model_on_cpu_trains_on_one_thread_and_says_so_once(fresh_process, caplog):
    with caplog.at_level(logging.INFO, logger="fastppo"):
        configure_cpu_threads(model_of(1000), CPU)
        configure_cpu_threads(model_of(1000), CPU)  # a second trainer in the process: nothing new
    assert torch.get_num_threads() == 1
    said = [r.getMessage() for r in caplog.records if "intra-op thread" in r.getMessage()]
    assert len(said) == 1 and "1 intra-op thread(s)" in said[0]
    configure_cpu_threads(model_of(3 * PARAMETERS_PER_THREAD), CPU)  # a larger model chooses again
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("name", cpu_runtime.THREAD_ENV_VARS)
def test_a_thread_variable_is_never_overridden(fresh_process, monkeypatch, name):
    monkeypatch.setenv(name, str(STARTUP))
    configure_cpu_threads(model_of(1000), CPU)
    assert torch.get_num_threads() == STARTUP


def test_an_earlier_set_num_threads_is_never_overridden(fresh_process):
    torch.set_num_threads(STARTUP - 1)
    configure_cpu_threads(model_of(1000), CPU)
    assert torch.get_num_threads() == STARTUP - 1


def test_gpu_training_leaves_the_threads_alone(fresh_process):
    configure_cpu_threads(model_of(1000), torch.device("cuda", 0))
    assert torch.get_num_threads() == STARTUP


@pytest.mark.slow  # a fresh interpreter
def test_torch_starts_with_one_thread_per_cpu_of_the_affinity_mask():
    """What the detection of a user's set_num_threads stands on: with no thread variable, torch
    starts with as many intra-op threads as this process's affinity mask holds CPUs."""
    env = {k: v for k, v in os.environ.items() if k not in cpu_runtime.THREAD_ENV_VARS}
    probe = "import torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == cpu_runtime.startup_threads()


def test_the_trainer_sizes_the_threads_when_built_on_cpu(fresh_process, tmp_path):
    from fastppo import GRPOConfig, GRPOTrainer
    from fastppo.demo import build_dataset, build_policy, build_tokenizer, says_word

    tokenizer = build_tokenizer()
    config = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to="none"
    )
    GRPOTrainer(
        model=build_policy(tokenizer, seed=0),
        reward_funcs=says_word,
        args=config,
        train_dataset=build_dataset(size=8, seed=0),
        processing_class=tokenizer,
    )
    assert torch.get_num_threads() == 1  # the demo policy's 75k parameters
