"""The ``fastppo`` command: ``demo`` (the embedded task, no downloads) and ``train`` (your model,
dataset and reward functions, from a YAML file and/or flags).

    fastppo demo [--algo grpo|ppo] [--output-dir runs/demo] [--max-steps 300]
    fastppo train --config cfg.yaml [--model PATH] [--dataset NAME_OR_FILE] [--reward module:function]
                  [--output-dir DIR] [--set key=value ...]

A train config holds ``model``, ``dataset`` (+ ``dataset_config``, ``dataset_split``,
``eval_dataset_split``), ``reward_funcs`` (``module:function`` import paths or reward-model paths),
optional ``peft`` (LoraConfig arguments), ``algo`` ("grpo" or "ppo"; PPO also takes an optional
``value_model`` path) and ``args`` (GRPOConfig or PPOConfig fields). Everything is checked
(model path, reward imports, dataset, config fields) before any model is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .config import check_known_keys

TRAIN_KEYS = (
    "algo",
    "model",
    "dataset",
    "dataset_config",
    "dataset_split",
    "eval_dataset_split",
    "reward_funcs",
    "value_model",
    "peft",
    "args",
)
ALGOS = ("grpo", "ppo")
DATASET_FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def import_reward(spec: str) -> Callable | str:
    """``module:function`` or ``path/to/file.py:function`` -> the function; anything else is taken
    as a reward-model path (loaded later by the trainer)."""
    if ":" not in spec:
        return spec
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise ValueError(f"reward file {module_name!r} does not exist")
        loaded = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import reward module {module_name!r} ({exc})") from exc
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward {spec!r}: {module_name!r} has no callable {attr!r}")
    return func


def load_prompts(name: str, config: str | None, split: str) -> Any:
    """A ``datasets.Dataset``: a local .json/.jsonl/.csv/.parquet file, a save_to_disk folder, or a
    ``datasets.load_dataset`` name."""
    import datasets

    extension = os.path.splitext(name)[1].lower()
    if extension in DATASET_FILE_TYPES:
        if not os.path.isfile(name):
            raise ValueError(f"dataset file {name!r} does not exist")
        return datasets.load_dataset(DATASET_FILE_TYPES[extension], data_files=name, split="train")
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
        loaded = datasets.load_from_disk(name)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise ValueError(f"cannot load dataset {name!r} (split {split!r}): {exc}") from exc


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def train_spec(options: argparse.Namespace) -> dict[str, Any]:
    """The YAML config with the flags applied on top (flags win)."""
    import yaml

    spec: dict[str, Any] = {}
    if options.config:
        if not os.path.isfile(options.config):
            raise ValueError(f"config file {options.config!r} does not exist")
        with open(options.config, encoding="utf-8") as f:
            spec = yaml.safe_load(f) or {}
        if not isinstance(spec, dict):
            raise ValueError(f"{options.config}: expected a mapping of {TRAIN_KEYS}")
        check_known_keys(f"config file {options.config}", spec, TRAIN_KEYS)
    spec["args"] = dict(spec.get("args") or {})
    for flag, key in (("model", "model"), ("dataset", "dataset"), ("dataset_split", "dataset_split")):
        if getattr(options, flag):
            spec[key] = getattr(options, flag)
    if options.reward:
        spec["reward_funcs"] = options.reward
    if options.output_dir:
        spec["args"]["output_dir"] = options.output_dir
    for item in options.set or []:
        key, value = parse_override(item)
        spec["args"][key] = value
    for key in ("model", "dataset", "reward_funcs"):
        if not spec.get(key):
            raise ValueError(f"train needs '{key}' (in the config file or as a flag)")
    spec.setdefault("algo", "grpo")
    if spec["algo"] not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {spec['algo']!r}")
    if spec.get("value_model") and spec["algo"] != "ppo":
        raise ValueError("value_model is a PPO option (algo: ppo)")
    return spec


def build_trainer(
    spec: dict[str, Any], config: Any, rewards: list, train_dataset: Any, eval_dataset: Any, peft_config: Any
) -> Any:
    """The trainer of ``spec["algo"]`` with the loaded pieces (PPO: one summed reward, optional critic)."""
    if spec["algo"] == "grpo":
        from .trainer.grpo import GRPOTrainer

        return GRPOTrainer(
            model=spec["model"],
            reward_funcs=rewards,
            args=config,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=peft_config,
        )
    from .trainer.ppo import PPOTrainer

    value_model = None
    if spec.get("value_model"):
        from transformers import AutoModelForSequenceClassification

        value_model = AutoModelForSequenceClassification.from_pretrained(spec["value_model"], num_labels=1)
    return PPOTrainer(
        args=config,
        processing_class=None,
        model=spec["model"],
        reward_model=rewards if len(rewards) > 1 else rewards[0],
        train_dataset=train_dataset,
        value_model=value_model,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )


def run_train(options: argparse.Namespace) -> int:
    spec = train_spec(options)
    from .grpo_config import GRPOConfig
    from .modeling import check_model_source
    from .ppo_config import PPOConfig

    args = dict(spec["args"])
    check_model_source(spec["model"], bool(args.get("trust_remote_code", False)))  # before any heavy work
    if spec.get("value_model"):
        check_model_source(spec["value_model"], False)
    rewards = spec["reward_funcs"]
    rewards = [import_reward(r) for r in (rewards if isinstance(rewards, list) else [rewards])]
    args.setdefault("output_dir", os.path.join("runs", "train"))
    config = (GRPOConfig if spec["algo"] == "grpo" else PPOConfig)(**args)
    train_dataset = load_prompts(
        spec["dataset"], spec.get("dataset_config"), spec.get("dataset_split", "train")
    )
    eval_dataset = None
    if spec.get("eval_dataset_split"):
        eval_dataset = load_prompts(spec["dataset"], spec.get("dataset_config"), spec["eval_dataset_split"])
    peft_config = None
    if spec.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **spec["peft"])
    trainer = build_trainer(spec, config, rewards, train_dataset, eval_dataset, peft_config)
    trainer.train()
    trainer.save_model()
    print(f"saved the policy to {config.output_dir}")
    print(f"metrics: {trainer.metrics_file}")
    if trainer.reward_plot:
        print(f"reward curve: {trainer.reward_plot}")
    return 0


def run_demo_command(options: argparse.Namespace) -> int:
    from .demo import run_demo

    start = time.perf_counter()
    summary = run_demo(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        seed=options.seed,
        algo=options.algo,
        progress=not options.no_progress,
    )
    print(
        f"fastppo demo ({options.algo}): {summary['global_step']} steps "
        f"in {time.perf_counter() - start:.1f} s, "
        f"reward {summary['reward_start']:.2f} -> {summary['reward_end']:.2f}"
    )
    print(f"metrics: {summary['metrics_file']}")
    print(f"reward curve: {summary['reward_plot']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo.run import ALGOS

    parser = argparse.ArgumentParser(prog="fastppo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train the embedded task (tiny Llama, no downloads)")
    demo.add_argument("--algo", choices=ALGOS, default="grpo")
    demo.add_argument("--output-dir", default=os.path.join("runs", "demo"))
    demo.add_argument("--max-steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=run_demo_command)
    train = commands.add_parser("train", help="GRPO on your model, dataset and reward functions")
    train.add_argument("--config", help="YAML file (keys: " + ", ".join(TRAIN_KEYS) + ")")
    train.add_argument("--model", help="model folder or Hub id")
    train.add_argument("--dataset", help="dataset file (.json/.jsonl/.csv/.parquet), folder or Hub name")
    train.add_argument("--dataset-split", help="split to train on (default: train)")
    train.add_argument("--reward", action="append", help="module:function or reward-model path (repeatable)")
    train.add_argument("--output-dir")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="a GRPOConfig field (repeatable)")
    train.set_defaults(run=run_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # bitsandbytes' CPU backend warns at import that an optional 4-bit CPU kernel is missing; fastppo
    # never runs 4-bit matmuls on CPU, so the line would only confuse a first run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark suite parses its own options
        from .benchmarks.suite import main as bench

        return bench(argv[1:])
    options = build_parser().parse_args(argv)
    try:
        return options.run(options)
    except ValueError as exc:  # bad input: one readable line, no traceback
        print(f"fastppo {options.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
