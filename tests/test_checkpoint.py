"""Checkpoints: atomic publication (a kill before the rename leaves no checkpoint-N), a full round trip
of weights / optimizer / scheduler / RNGs / trainer state / subclass extras on a tiny model, NaN weights
refused, and clear errors for a missing path or another model's checkpoint."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastppo import GRPOTrainer
from fastppo import checkpoint as ckpt
from fastppo.demo import build_policy, build_tokenizer


class HookedTrainer(GRPOTrainer):
    """A trainer using the three checkpoint hooks, as GRPO/PPO will."""

    def generators(self):
        return {"shuffle": self._shuffle}

    def checkpoint_extras(self):
        return {"buffer": [{"advantages": torch.arange(4.0)}], "position": 3, "note": "x"}

    def restore_extras(self, extras):
        self.restored = extras


@pytest.fixture
def make_trainer(grpo_trainer):
    """``make_trainer(hidden_size=32, seed=0, cls=HookedTrainer, **fields)``: grpo_trainer's run, where
    ``seed`` seeds both the run and the initial weights."""
    return lambda hidden_size=32, seed=0, cls=HookedTrainer, **fields: grpo_trainer(
        cls=cls, hidden_size=hidden_size, model_seed=seed, seed=seed, **fields
    )


def rng_snapshot(trainer):
    return (
        torch.get_rng_state().clone(),
        random.getstate(),
        np.random.get_state()[1].copy(),
        trainer._shuffle.get_state().clone(),
    )


def test_round_trip_restores_everything_the_base_owns(make_trainer):
    a = make_trainer()
    a.train()
    a.metrics.add("pending", 2.0, 3.0)  # logged after the checkpoint: must survive it
    rng = rng_snapshot(a)
    path = a.save_checkpoint()
    assert path == os.path.join(a.args.output_dir, "checkpoint-2")
    assert sorted(os.listdir(a.args.output_dir)) == ["checkpoint-2", "metrics.jsonl", "reward_curve.png"]
    torch.rand(5), random.random(), np.random.rand(), torch.rand(5, generator=a._shuffle)  # move every RNG

    b = make_trainer(seed=1)  # other initial weights, other seeds
    b.begin_training(2, "resume", resume_from=path)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0, msg=name)
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert len(opt_b["state"]) == len(opt_a["state"]) > 0
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(opt_b["state"][index][key], value, rtol=0, atol=0)
    assert b.lr_scheduler.state_dict() == a.lr_scheduler.state_dict()
    assert b.lr_scheduler.get_last_lr() == a.lr_scheduler.get_last_lr()
    assert b.state.global_step == 2 and b.state.log_history == a.state.log_history
    assert b._micro_step == a._micro_step and b.training_log.loss_sum == pytest.approx(
        a.training_log.loss_sum
    )
    assert b.metrics.flush() == {"pending": 2.0}
    torch_state, py_state, np_state, shuffle_state = rng_snapshot(b)
    assert torch.equal(torch_state, rng[0]) and py_state == rng[1]
    assert np.array_equal(np_state, rng[2]) and torch.equal(shuffle_state, rng[3])
    assert b.restored["position"] == 3 and b.restored["note"] == "x"
    torch.testing.assert_close(b.restored["buffer"][0]["advantages"], torch.arange(4.0))


@pytest.mark.gpu
def test_8bit_optimizer_state_round_trips(make_trainer):
    """bitsandbytes AdamW8bit's quantised state (uint8 + absmax) survives a checkpoint exactly.
    Compared on the live per-parameter state: bitsandbytes' state_dict() nests its tensors under a
    key of its own (0.50), which a walk over state_dict()["state"] would not see."""
    a = make_trainer(optim="adamw_8bit", hidden_size=64)
    a.train()
    path = a.save_checkpoint()
    b = make_trainer(optim="adamw_8bit", hidden_size=64, seed=1)
    b.begin_training(2, "resume", resume_from=path)

    def live_state(trainer) -> list[dict]:
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        return [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]

    states_a, states_b = live_state(a), live_state(b)
    tensors = [v for state in states_a for v in state.values() if torch.is_tensor(v)]
    assert any(v.dtype == torch.uint8 for v in tensors)  # really 8-bit (mlp weights >= 4096 elements)
    for state_a, state_b in zip(states_a, states_b, strict=True):
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            if torch.is_tensor(value):
                assert value.device == state_b[key].device
                torch.testing.assert_close(state_b[key], value, rtol=0, atol=0)
            else:
                assert state_b[key] == value


def test_resume_true_picks_the_latest_and_ignores_temp_folders(tmp_path):
    out = tmp_path / "out"
    for name in ("checkpoint-2", "checkpoint-10", ".tmp-checkpoint-12-abc", "checkpoint-x"):
        (out / name).mkdir(parents=True)
    assert ckpt.latest_checkpoint(str(out)) == str(out / "checkpoint-10")
    assert ckpt.resolve_resume(False, str(out)) is None
    ckpt.remove_stale_temps(str(out))
    assert not (out / ".tmp-checkpoint-12-abc").exists() and (out / "checkpoint-10").exists()


def test_resume_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        ckpt.resolve_resume(True, str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-7"), str(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match="not a complete fastppo checkpoint.*optimizer.pt"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-3"), str(tmp_path))


def test_checkpoint_of_another_model_shape_is_refused_before_loading(tmp_path, make_trainer):
    a = make_trainer(max_steps=1)
    a.train()
    path = a.save_checkpoint()
    b = make_trainer(output_dir=str(tmp_path / "b" / "out"), hidden_size=48)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"different model shape: model\.embed_tokens\.weight is \(16, 32\)"):
        b.begin_training(1, "resume", resume_from=path)
    for name, value in b.model.state_dict().items():
        assert torch.equal(value, before[name]), name  # nothing half-loaded


def test_nan_weights_are_never_checkpointed(caplog, make_trainer):
    trainer = make_trainer(max_steps=1)
    trainer.train()
    with torch.no_grad():
        trainer.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    assert trainer.save_checkpoint() is None
    assert ckpt.list_checkpoints(trainer.args.output_dir) == []
    assert "NOT written" in caplog.text and "up_proj" in caplog.text


def test_failure_before_the_rename_leaves_no_checkpoint(monkeypatch, make_trainer):
    trainer = make_trainer(max_steps=1)
    trainer.train()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert os.listdir(trainer.args.output_dir) == ["metrics.jsonl", "reward_curve.png"]  # no temp left


@pytest.mark.parametrize("where", ["while-writing", "before-rename"])
def test_sigkill_during_a_save_leaves_no_checkpoint(tmp_path, where):
    """A real SIGKILL (no cleanup runs): the temp folder stays, no checkpoint-N appears, and the
    next save removes the leftover."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from fastppo import checkpoint as ckpt
        ckpt.atomic_directory  # imported before the patch
        def kill(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        if {where!r} == "before-rename":
            ckpt.os.replace = kill
        with ckpt.atomic_directory(os.path.join({str(tmp_path)!r}, "checkpoint-5")) as temp:
            open(os.path.join(temp, "optimizer.pt"), "wb").write(b"x" * 1000)
            if {where!r} == "while-writing":
                kill()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".tmp-checkpoint-5-")
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    ckpt.remove_stale_temps(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_saving_the_same_step_again_replaces_it(tmp_path):
    path = str(tmp_path / "checkpoint-1")
    for payload in (b"old", b"new"):
        with ckpt.atomic_directory(path) as temp:
            with open(os.path.join(temp, "f"), "wb") as f:
                f.write(payload)
    with open(os.path.join(path, "f"), "rb") as f:
        assert f.read() == b"new"
    assert os.listdir(tmp_path) == ["checkpoint-1"]


@pytest.mark.parametrize(("limit", "left"), [(1, ["checkpoint-3"]), (2, ["checkpoint-3", "checkpoint-4"])])
def test_rotation_keeps_the_checkpoint_just_written(tmp_path, limit, left):
    """Resumed from checkpoint-2 while the abandoned run's checkpoint-4 exists: the new checkpoint-3
    is kept whatever its step number, and the others go oldest first."""
    for step in (2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt.rotate_checkpoints(str(tmp_path), limit, keep=str(tmp_path / "checkpoint-3"))
    ckpt.remove_stale_temps(str(tmp_path))  # what a crash mid-delete would leave is a temp folder
    assert sorted(os.listdir(tmp_path)) == left


def test_checkpoint_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        temp = ckpt.temp_directory(str(tmp_path / "checkpoint-1"))
    finally:
        os.umask(old)
    assert os.stat(temp).st_mode & 0o777 == 0o755  # readable by others, as save_pretrained's folders


def test_resuming_a_finished_run_trains_no_further(tmp_path, make_trainer):
    make_trainer(save_strategy="steps", save_steps=2).train()
    trainer = make_trainer(save_strategy="steps", save_steps=1)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2"]


def test_lora_adapters_round_trip(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
        return get_peft_model(build_policy(build_tokenizer(), hidden_size=32), config)

    trained = lora_model()
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.normal_()
    trained.save_pretrained(tmp_path)
    fresh = lora_model()
    ckpt.load_pretrained_weights(fresh, str(tmp_path))
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import datasets
    from transformers import TrainerCallback
    from fastppo import GRPOConfig, GRPOTrainer
    from fastppo.demo import build_policy, build_tokenizer

    out, mode = sys.argv[1], sys.argv[2]

    def id_reward(completion_ids, **kwargs):
        return [float(len(ids) + ids[0] % 3) if ids else 0.0 for ids in completion_ids]

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:  # after checkpoint-5 (mid-rollout), before step 6 is logged
                os.kill(os.getpid(), signal.SIGKILL)

    tokenizer = build_tokenizer()
    args = GRPOConfig(
        output_dir=out, per_device_train_batch_size=4, num_generations=4, steps_per_generation=2,
        num_iterations=2, beta=0.1, sync_ref_model=True, ref_model_sync_steps=2, max_completion_length=4,
        max_steps=12, logging_steps=1,
        learning_rate=1e-2, lr_scheduler_type="linear", save_strategy="steps", save_steps=1,
        report_to="none", disable_tqdm=True, seed=3,
    )
    trainer = GRPOTrainer(
        model=build_policy(tokenizer, hidden_size=32), processing_class=tokenizer, reward_funcs=id_reward,
        args=args, callbacks=[Kill()] if mode == "kill" else None,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["say : cat", "say : dog", "say : sun"]}),
    )
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    """
)


def run_script(out: str, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESUME_SCRIPT, out, mode], capture_output=True, timeout=300)


def metric_records(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow  # three training subprocesses
def test_sigkilled_grpo_run_resumes_exactly(tmp_path):
    """GRPO SIGKILLed inside a rollout's optimisation (num_iterations=2, checkpoint-5 holds the rollout
    buffer at pass 1 of 4; the synced reference has its own weights) and resumed with
    resume_from_checkpoint=True logs the same per-step values (losses, rewards, KL, grad norms,
    learning rates, token counts) as an uninterrupted run."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert run_script(full, "full").returncode == 0
    killed = run_script(cut, "kill")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert sorted(metric_records(cut)) == [1, 2, 3, 4, 5]
    resumed = run_script(cut, "resume")
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    expected, got = metric_records(full), metric_records(cut)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    assert "reward" in got[9] and "kl" in got[10]  # rollouts at steps 1, 5, 9 (9: the synced reference)
    for step in range(1, 13):
        timing = {k for k in expected[step] if k.startswith("time/") or k == "tokens/s"}
        assert got[step].keys() == expected[step].keys(), step
        for key in expected[step].keys() - timing:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
