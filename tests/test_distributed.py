"""Data-parallel training through ``accelerate launch`` on CPU (gloo): two processes with half the
rows each must train exactly as one process with the whole global batch, and sharded (fsdp=True,
FSDP2) exactly as unsharded.

Tolerance: losses and rewards to 1e-5 relative; the final weights' checksum to 1e-6 relative (the
gradient all-reduce adds two halves where one process sums the whole batch: rounding only).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "data_parallel_run.py"


def launch(
    out: Path,
    per_device_batch: int,
    algo: str,
    phase: str = "",
    env: dict | None = None,
    use_fsdp: bool = False,
) -> dict:
    """The script under ``accelerate launch`` with two processes (``env``: SHARDED / SAMPLER;
    ``use_fsdp``: launched as accelerate's FSDP2 instead of plain data parallel), rendezvousing on a
    port free at launch time, so suites running side by side on one machine never collide."""
    launcher = str(Path(sys.executable).with_name("accelerate"))
    kind = ["--use_fsdp", "--fsdp_version", "2"] if use_fsdp else ["--multi_gpu"]
    command = [launcher, "launch", *kind, "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    # --multi_gpu: data parallel; on a machine without CUDA accelerate runs it on CPU with gloo
    return run(
        [*command, str(SCRIPT), str(out), str(per_device_batch), algo, *([phase] if phase else [])], out, env
    )


def free_port() -> int:
    """A TCP port nothing listens on now: bound to port 0 (the kernel picks one), read, released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], out: Path, extra_env: dict | None = None) -> dict:
    # CPU processes even on a GPU machine (one GPU cannot host two NCCL ranks)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        **(extra_env or {}),
    }
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # two gloo processes under accelerate launch
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = run([sys.executable, str(SCRIPT), str(one), "16"], one)
    double = launch(two, 8, "grpo")
    assert len(single["losses"]) == len(double["losses"]) == 3
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-7)
    assert double["rewards"] == pytest.approx(single["rewards"], rel=1e-5)
    assert double["checksum"] == pytest.approx(single["checksum"], rel=1e-6)
    # evaluation split over the processes (11 prompts: one padded row that must not count) gives
    # what one process gives over all of them, on every process
    evaluations = [evaluation(one, 0), evaluation(two, 0), evaluation(two, 1)]
    assert evaluations[1] == evaluations[2]
    # eval_loss is TRL's mean of per-eval-batch losses; each process's batches are cut from its own
    # share, so it depends on the split as TRL's does: equal on both processes, not to one process
    losses = [e.pop("eval_loss") for e in evaluations]
    assert losses[1] == losses[2] and all(math.isfinite(v) for v in losses)
    assert evaluations[1] == pytest.approx(evaluations[0], rel=1e-6)
    assert {"eval_reward", "eval_completions/mean_length"} <= set(evaluations[0])


@pytest.mark.slow  # two gloo processes under accelerate launch
@pytest.mark.parametrize("options", ["top_entropy", "adaptive_entropy"])
def test_loss_options_over_processes_match_one_process(tmp_path, options):
    """The top_entropy_quantile threshold (gathered tokens of every process) and the adaptive
    controller's entropy (summed over every process) are the whole global batch's, as one process
    sees it. (The entropy bonus is not: as in TRL it is each process's own mean, so it is left off.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = {"LOSS_OPTIONS": options}
    single = run([sys.executable, str(SCRIPT), str(one), "16"], one, env)
    double = launch(two, 8, "grpo", env=env)
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-7)
    assert double["checksum"] == pytest.approx(single["checksum"], rel=1e-6)
    assert double["entropy_control"] == pytest.approx(single["entropy_control"], rel=1e-6)


def evaluation(out: Path, rank: int) -> dict:
    """A process's evaluation metrics, less HF's timings (eval_runtime, eval_*_per_second)."""
    metrics = json.loads((out / f"eval-{rank}.json").read_text())
    return {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))}


@pytest.mark.slow  # two gloo processes under accelerate launch
def test_ppo_trains_data_parallel_with_the_same_weights_on_every_process(tmp_path):
    """PPO whitens advantages per process (legacy TRL), so it is not compared with one process; the
    averaged gradients must still leave every process with the same policy and critic. Its
    evaluation scores each prompt once (the sampler is a function of the prompt) whatever the split."""
    summary = launch(tmp_path, 4, "ppo")
    assert len(summary["losses"]) == 4 and all(math.isfinite(v) for v in summary["losses"])
    checksums = [json.loads((tmp_path / f"checksum-{rank}.json").read_text()) for rank in (0, 1)]
    assert checksums[0] == checksums[1]  # bit-identical: same start (broadcast), same averaged steps
    single = tmp_path / "single"
    single.mkdir()
    run([sys.executable, str(SCRIPT), str(single), "8", "ppo"], single)
    assert evaluation(tmp_path, 0) == evaluation(tmp_path, 1)
    assert evaluation(tmp_path, 0)["eval_objective/scores"] == pytest.approx(
        evaluation(single, 0)["eval_objective/scores"], rel=1e-6
    )


def test_launches_rendezvous_on_a_port_nothing_holds():
    """Each launch takes a port that is free then (two suites on one machine do not collide on a
    fixed one): never one a listening socket holds, and bindable once returned."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = {free_port() for _ in range(8)}
        assert held.getsockname()[1] not in ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", ports.pop()))


def test_deepspeed_launches_are_refused_and_rows_split_evenly():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fastppo.distributed import check_distributed_type, evaluation_share, rank_rows

    with pytest.raises(ValueError, match="DeepSpeed; fastppo shards with FSDP2 instead"):
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="configured for XLA"):
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType.XLA))
    for kind in (DistributedType.MULTI_GPU, DistributedType.FSDP):  # FSDP: version checked by sharding
        check_distributed_type(SimpleNamespace(distributed_type=kind))
    second = SimpleNamespace(num_processes=2, process_index=1)
    assert rank_rows(16, second, "rows") == slice(8, 16)
    with pytest.raises(ValueError, match="rows \\(15\\) must split evenly across the 2 processes"):
        rank_rows(15, second, "rows")
    # evaluation: equal shares, the last padded with repeats of the last row that do not count
    assert evaluation_share(11, second) == ([6, 7, 8, 9, 10, 10], [True] * 5 + [False])
    assert evaluation_share(1, second) == ([0], [False])


@pytest.mark.slow  # two gloo processes under accelerate launch
def test_two_process_run_resumes_exactly_from_inside_a_rollout(tmp_path):
    """Each process checkpoints its own RNG, counters and rollout buffer next to the shared weights:
    stopped after step 1 (between the two passes over a rollout) and resumed, the run logs what an
    uninterrupted one logs."""
    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir(), split.mkdir()
    expected = launch(full, 8, "grpo", "full")
    launch(split, 8, "grpo", "first")
    assert (split / "checkpoint-1" / "extras-1.pt").is_file()  # the second process's buffer
    resumed = launch(split, 8, "grpo", "second")
    assert len(expected["losses"]) == len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-7)
    assert resumed["checksum"] == pytest.approx(expected["checksum"], rel=1e-6)


@pytest.mark.slow  # two gloo processes under accelerate launch
def test_sharded_training_matches_unsharded_data_parallel(tmp_path):
    """fsdp=True (FSDP2 over two gloo processes, a sharded frozen reference copy and reward model, the
    fused path reading the gathered lm_head, generation with every unit gathered) trains as the
    unsharded two-process run on the same rows: each process samples its rows with the same RNG in
    both runs."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    plain.mkdir(), sharded.mkdir()
    env = {"SAMPLER": "generate", "REWARD_MODEL": "1"}
    expected = launch(plain, 8, "grpo", env=env)
    got = launch(sharded, 8, "grpo", env={**env, "SHARDED": "1"})
    assert got["sharded"] == 1 and not expected["sharded"]
    assert got["reward_models_sharded"] == 1 and not expected["reward_models_sharded"]
    assert len(got["losses"]) == 3
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-7)
    assert got["rewards"] == pytest.approx(expected["rewards"], rel=1e-5)
    assert got["checksum"] == pytest.approx(expected["checksum"], rel=1e-6)
    # sharded evaluation: as many gathered generate calls on each process (the padded share)
    assert evaluation(sharded, 1) == evaluation(sharded, 0) == pytest.approx(evaluation(plain, 0), rel=1e-5)


@pytest.mark.slow  # two gloo processes under accelerate launch
def test_sharded_run_resumes_exactly_from_inside_a_rollout(tmp_path):
    """Sharded optimizer state (torch.distributed.checkpoint), gathered weights, each process's shard
    of a synced reference, RNGs and rollout buffer: stopped after step 1 and resumed, the run logs
    what an uninterrupted sharded one logs. Sharded through the launcher this time
    (``accelerate launch --use_fsdp --fsdp_version 2``), not the config."""
    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir(), split.mkdir()
    env = {"SAMPLER": "generate"}
    expected = launch(full, 8, "grpo", "full", env, use_fsdp=True)
    launch(split, 8, "grpo", "first", env, use_fsdp=True)
    assert (split / "checkpoint-1" / "optimizer_sharded").is_dir()
    resumed = launch(split, 8, "grpo", "second", env, use_fsdp=True)
    assert resumed["sharded"] and len(expected["losses"]) == len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-7)
    assert resumed["checksum"] == pytest.approx(expected["checksum"], rel=1e-6)


@pytest.mark.slow  # two gloo processes under accelerate launch
@pytest.mark.parametrize("critic", ["value_head", "value_model"])
def test_sharded_ppo_matches_unsharded_and_resumes_exactly(tmp_path, critic):
    """PPO with fsdp: the policy, the reference copy, a separate value model and a reward model
    sharded (neither of the latter with a pad id of its own); a value head stays whole on every
    process. It trains as the unsharded two-process run, and a sharded run stopped inside its rollout
    resumes exactly (optimizer state of policy and critic through torch.distributed.checkpoint, each
    process's critic shards in its extras)."""
    plain, full, split = tmp_path / "plain", tmp_path / "full", tmp_path / "split"
    for folder in (plain, full, split):
        folder.mkdir()
    separate = str(int(critic == "value_model"))
    unsharded = {"SAMPLER": "generate", "VALUE_MODEL": separate, "REWARD_MODEL": separate}
    env = {**unsharded, "SHARDED": "1"}
    expected = launch(plain, 4, "ppo", env=unsharded)
    got = launch(full, 4, "ppo", "full", env)
    assert got["sharded"] == (2 if critic == "value_model" else 1) and not expected["sharded"]
    assert got["reward_models_sharded"] == int(separate) and not expected["reward_models_sharded"]
    assert len(got["losses"]) == 4
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-7)
    assert got["checksum"] == pytest.approx(expected["checksum"], rel=1e-6)
    launch(split, 4, "ppo", "first", env)
    resumed = launch(split, 4, "ppo", "second", env)
    assert resumed["losses"] == pytest.approx(got["losses"], rel=1e-5, abs=1e-7)
    assert resumed["checksum"] == pytest.approx(got["checksum"], rel=1e-6)


@pytest.mark.slow  # two gloo processes under accelerate launch
def test_a_nan_loss_on_one_process_skips_the_step_on_every_process(tmp_path):
    """The skip decision is taken on the loss averaged over processes: process 1's NaN first
    minibatch skips step 1 everywhere (no hang in the logging collectives, no drift apart)."""
    summary = launch(tmp_path, 8, "grpo", env={"NAN_ON_RANK1": "1"})
    assert summary["skipped"] == 1 and len(summary["losses"]) == 2  # step 1's NaN loss is not logged
    checksums = [json.loads((tmp_path / f"checksum-{rank}.json").read_text()) for rank in (0, 1)]
    assert checksums[0] == checksums[1]


def test_groups_that_cannot_split_across_processes_are_refused_upfront(monkeypatch, tmp_path):
    from accelerate import Accelerator

    from fastppo import GRPOConfig, GRPOTrainer
    from fastppo.demo import build_dataset, build_policy, build_tokenizer, says_word

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    tokenizer = build_tokenizer()
    config = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        steps_per_generation=1,
        report_to="none",
    )
    with pytest.raises(ValueError, match="1 prompts, which must split evenly across the 2 processes"):
        GRPOTrainer(
            model=build_policy(tokenizer, seed=0),
            reward_funcs=says_word,
            args=config,
            train_dataset=build_dataset(size=8, seed=0),
            processing_class=tokenizer,
        )
