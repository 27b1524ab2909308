"""The fastppo command line: `demo` in a subprocess, `train` from a YAML file, early clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastppo.cli import main
from fastppo.demo import build_policy, build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a fresh interpreter per run
@pytest.mark.parametrize("where", ["elsewhere", "checkout"])
def test_demo_subprocess_writes_plot_and_metrics(tmp_path, where):
    """`python -m fastppo demo` from any folder, including the checkout's root (where `kernels/`
    would shadow Hugging Face's `kernels` package if the working directory stayed on sys.path)."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastppo",
            "demo",
            "--max-steps",
            "5",
            "--output-dir",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path if where == "elsewhere" else REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "reward" in result.stdout
    assert (out / "reward_curve.png").stat().st_size > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and "reward" in json.loads(lines[-1])


@pytest.fixture
def user_files(tmp_path):
    """A saved model, a JSONL dataset and a reward module, as a user would have them."""
    tokenizer = build_tokenizer()
    build_policy(tokenizer, hidden_size=32).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as f:
        for word in ("cat", "dog", "sun", "red"):
            f.write(json.dumps({"prompt": f"say : {word}", "word": word}) + "\n")
    (tmp_path / "my_rewards.py").write_text(
        "def says_word(completions, word, **kwargs):\n"
        "    return [float(w in c.split()) for c, w in zip(completions, word)]\n"
    )
    return tmp_path


def write_config(path, **spec):
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_train_from_yaml_config(user_files, capsys):
    cfg = write_config(
        user_files / "cfg.yaml",
        model=str(user_files / "model"),
        dataset=str(user_files / "data.jsonl"),
        reward_funcs=[f"{user_files / 'my_rewards.py'}:says_word"],
        args={
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "max_completion_length": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "disable_tqdm": True,
        },
    )
    out = user_files / "out"
    assert main(["train", "--config", cfg, "--output-dir", str(out), "--set", "max_steps=2"]) == 0
    assert (out / "config.json").exists() and (out / "metrics.jsonl").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "reward curve" in capsys.readouterr().out


def test_train_ppo_from_yaml_config_saves_policy_and_critic(user_files):
    cfg = write_config(
        user_files / "ppo.yaml",
        algo="ppo",
        model=str(user_files / "model"),
        dataset=str(user_files / "data.jsonl"),
        reward_funcs=[f"{user_files / 'my_rewards.py'}:says_word"],
        args={
            "per_device_train_batch_size": 4,
            "response_length": 4,
            "logging_steps": 1,
            "save_strategy": "no",
            "disable_tqdm": True,
        },
    )
    out = user_files / "ppo-out"
    assert main(["train", "--config", cfg, "--output-dir", str(out), "--set", "max_steps=2"]) == 0
    assert (out / "config.json").exists() and (out / "value_head.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "objective/scores" in records[0]


def test_train_reports_a_missing_model_before_anything_else(user_files, capsys):
    code = main(
        [
            "train",
            "--model",
            str(user_files / "no-such-model"),
            "--dataset",
            "missing.jsonl",
            "--reward",
            "my_rewards:nothing",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "does not exist" in err  # the model, not the dataset or reward


def test_train_config_errors_are_readable(user_files, capsys):
    cfg = write_config(user_files / "bad.yaml", model=str(user_files / "model"), datset="x")
    assert main(["train", "--config", cfg]) == 2
    assert "'datset' (did you mean 'dataset'" in capsys.readouterr().err
    cfg = write_config(
        user_files / "bad2.yaml",
        model=str(user_files / "model"),
        dataset=str(user_files / "data.jsonl"),
        reward_funcs=["my_rewards_missing:f"],
        args={"num_generations": 1},
    )
    assert main(["train", "--config", cfg]) == 2
    assert "cannot import reward module 'my_rewards_missing'" in capsys.readouterr().err
