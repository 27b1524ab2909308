"""Checkpoints that are either complete or absent, and what it takes to resume from one exactly.

A checkpoint is written into a temporary folder beside its final place (same file system), every file
and the folder are fsynced, and only then is it renamed to ``checkpoint-<step>`` with ``os.replace``.
A run killed at any moment leaves either the previous checkpoints or the new complete one; a stale
``.tmp-checkpoint-*`` folder from a killed run is never taken for a checkpoint and is removed at the
next save or resume.

``save_checkpoint`` / ``load_checkpoint`` write and restore a whole trainer (any ``Checkpointable``:
both trainers are); the rest of this module is the files they are made of.

Layout of ``checkpoint-<step>/`` (the weights as ``save_pretrained`` writes them, so a checkpoint is
also a loadable model folder; the rest is what ``load_checkpoint`` restores):

    config.json, model.safetensors | adapter_model.safetensors, tokenizer files
    trainer_state.json, training_args.json
    optimizer.pt      optimizer.state_dict() (bitsandbytes' 8-bit state included: it lives there)
    scheduler.pt      lr_scheduler.state_dict()
    rng_state.pt      python / numpy / torch CPU / CUDA generators and the trainer's own generators
    trainer_base.pt   the trainer's counters (accumulation position, losses and metrics not yet logged)
    extras.pt         the rollout being optimised and its position, a synced reference's own weights,
                      the trainer's own state (PPO: the critic's weights, the last rollout's metrics)

Every process writes its own RNG, counters and extras (``rank_file``: ``extras-1.pt`` for process 1).

Every ``.pt`` file holds only tensors, numbers, strings and containers of them: it loads with
``torch.load(weights_only=True)``, so resuming never unpickles code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from transformers import TrainerState

from . import sharding
from .adapters import is_peft_model
from .distributed import broadcast_object
from .sharding import OPTIMIZER_DIR, is_sharded, load_full_state_dict, local

logger = logging.getLogger("fastppo")

PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
_CHECKPOINT = re.compile(rf"^{PREFIX}(\d+)$")

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
BASE_FILE = "trainer_base.pt"
EXTRAS_FILE = "extras.pt"
STATE_FILE = "trainer_state.json"
ARGS_FILE = "training_args.json"


# --- finding checkpoints ----------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the checkpoint with the highest step in ``output_dir`` (temp folders ignored), or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``True`` = the latest in ``output_dir``, a path = that one.

    ValueError when there is none, the path is missing, or the folder is not a fastppo checkpoint.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        path = latest_checkpoint(output_dir)
        if path is None:
            raise ValueError(
                f"resume_from_checkpoint=True but output_dir {output_dir!r} holds no checkpoint-<step> folder"
            )
        return path
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint: checkpoint path {path!r} does not exist")
    missing = [f for f in (STATE_FILE, RNG_FILE) if not os.path.isfile(os.path.join(path, f))]
    if not os.path.isfile(os.path.join(path, OPTIMIZER_FILE)) and not os.path.isdir(
        os.path.join(path, OPTIMIZER_DIR)  # written sharded (fsdp)
    ):
        missing.append(OPTIMIZER_FILE)
    if missing:
        raise ValueError(
            f"resume_from_checkpoint: {path!r} is not a complete fastppo checkpoint "
            f"(missing {', '.join(missing)})"
        )
    return path


def remove_stale_temps(output_dir: str) -> None:
    """Delete temp folders left by a run killed while writing a checkpoint."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(TEMP_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate_checkpoints(output_dir: str, limit: int | None, keep: str) -> None:
    """Keep ``keep`` (the checkpoint just written) and the newest ``limit - 1`` others (all when
    ``limit`` is falsy). After resuming from an older checkpoint, the abandoned run's later ones
    count as older than ``keep``. Each is renamed to a temp name before deletion, so a crash
    mid-delete leaves nothing that looks like a checkpoint."""
    if not limit:
        return
    keep = os.path.abspath(keep)
    others = [path for _, path in list_checkpoints(output_dir) if os.path.abspath(path) != keep]
    for path in others[: max(len(others) - (limit - 1), 0)]:
        doomed = tempfile.mkdtemp(prefix=TEMP_PREFIX + "old-", dir=output_dir)
        os.replace(path, os.path.join(doomed, "checkpoint"))
        shutil.rmtree(doomed, ignore_errors=True)


# --- writing atomically -----------------------------------------------------------------------------


def _fsync_tree(root: str) -> None:
    """fsync every file, then every folder bottom-up, so the rename publishes data already on disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # some file systems (and Windows) cannot open a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(final_path: str) -> Iterator[str]:
    """Yield a temp folder beside ``final_path``; on normal exit publish it there atomically.

    An exception (or a kill) leaves ``final_path`` untouched and no partial folder under its name. An
    existing ``final_path`` (the same step saved again) is replaced.
    """
    temp = temp_directory(final_path)
    try:
        yield temp
        publish(temp, final_path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def temp_directory(final_path: str) -> str:
    """A fresh temp folder beside ``final_path`` (``remove_stale_temps`` clears one a kill left)."""
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final_path)}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o777 & ~umask)  # mkdtemp makes it owner-only; save_pretrained's folders are not
    return temp


def publish(temp: str, final_path: str) -> None:
    """fsync everything in ``temp``, then rename it to ``final_path`` (replacing one saved before)."""
    parent = os.path.dirname(os.path.abspath(final_path))
    _fsync_tree(temp)
    if os.path.exists(final_path):  # os.replace cannot overwrite a non-empty folder
        old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-", dir=parent)
        os.replace(final_path, os.path.join(old, "previous"))
        os.replace(temp, final_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final_path)
    _fsync_dir(parent)


def rank_file(name: str, rank: int) -> str:
    """Per-process files (RNG, counters, rollout buffer): ``name`` for process 0, ``<stem>-<rank>.pt``
    for the others, so a one-process checkpoint keeps the plain names."""
    stem, ext = os.path.splitext(name)
    return name if rank == 0 else f"{stem}-{rank}{ext}"


def save_torch(obj: Any, folder: str, name: str) -> None:
    torch.save(obj, os.path.join(folder, name))


def load_torch(folder: str, name: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a checkpoint file with ``weights_only=True`` (tensors and plain data only)."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {folder!r} has no {name}; it was not written by this fastppo version")
    return torch.load(path, map_location=map_location, weights_only=True)


# --- weights ----------------------------------------------------------------------------------------


def nonfinite_parameters(modules: Iterable[nn.Module]) -> list[str]:
    """Names of trainable parameters holding NaN or inf (one CPU sync per parameter; only at save time)."""
    bad = []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad and not bool(torch.isfinite(local(param)).all()):  # own shard
                bad.append(name)
    return bad


def _saved_weights(path: str, adapter: bool) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` wrote into ``path`` (single file or shards)."""
    from safetensors.torch import load_file

    stem = "adapter_model" if adapter else "model"
    single = os.path.join(path, f"{stem}.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(path, f"{stem}.safetensors.index.json")
    if not os.path.isfile(index):
        raise ValueError(f"checkpoint {path!r} has no {stem}.safetensors (nor a sharded index)")
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(os.path.join(path, shard)))
    return weights


def load_pretrained_weights(model: nn.Module, path: str) -> None:
    """Restore the weights ``save_pretrained`` wrote to ``path`` into ``model`` in place.

    Shapes are compared first, so a checkpoint of another model is a ValueError naming the first
    mismatching tensor, not a half-loaded model. PEFT models load their adapters only.
    """
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        saved = _saved_weights(path, adapter=True)
        result = set_peft_model_state_dict(model, saved)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(
                f"checkpoint {path!r} holds adapter weights this model lacks (a different LoRA config?): "
                f"{unexpected[:3]}"
            )
        return
    saved = _saved_weights(path, adapter=False)
    own = model.state_dict()
    unexpected = sorted(set(saved) - set(own))
    if unexpected:
        raise ValueError(
            f"checkpoint {path!r} is from a different model: it holds {unexpected[:3]} which this model lacks"
        )
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"checkpoint {path!r} is from a different model shape: {name} is {tuple(tensor.shape)} "
                f"there and {tuple(own[name].shape)} here"
            )
    # save_pretrained leaves out tied copies (lm_head.weight = embed_tokens.weight): any tensor not in
    # the file must share storage with one that is.
    loaded_storage = {local(own[name]).data_ptr() for name in saved}
    missing = [n for n in own if n not in saved and local(own[n]).data_ptr() not in loaded_storage]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks weights this model has: {missing[:3]}")
    if is_sharded(model):  # every process reads the whole file and keeps its shard
        load_full_state_dict(model, saved)
    else:
        model.load_state_dict(saved, strict=False)


# --- random number generators -----------------------------------------------------------------------


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG a training step draws from: python, numpy, torch CPU/CUDA, and ``generators``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Inverse of ``rng_state``; ValueError when the checkpoint lacks one of ``generators``."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    missing = sorted(set(generators) - set(state["generators"]))
    if missing:
        raise ValueError(f"checkpoint has no state for the trainer's generator(s) {missing}")
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples; a save/load round trip may hand lists back."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- a whole trainer --------------------------------------------------------------------------------


class Checkpointable(Protocol):
    """What ``save_checkpoint`` and ``load_checkpoint`` read and restore of a trainer."""

    args: Any  # GRPOConfig / PPOConfig (output_dir, save_only_model, save_total_limit)
    model: nn.Module  # the policy, saved with save_pretrained
    state: TrainerState
    accelerator: Accelerator
    sharding: Any  # ShardingSettings, or None when every process holds whole models
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any

    def trained_modules(self) -> list[nn.Module]: ...

    def optimizer_owner(self) -> nn.Module:
        """The modules the optimizer steps as one module (torch.distributed.checkpoint's names)."""
        ...

    def save_model(self, output_dir: str) -> None: ...

    def generators(self) -> dict[str, torch.Generator]: ...

    def counters_state(self) -> dict[str, Any]: ...

    def load_counters_state(self, state: dict[str, Any]) -> None: ...

    def extras_state(self) -> dict[str, Any]: ...

    def load_extras_state(self, extras: dict[str, Any]) -> None: ...


def save_checkpoint(trainer: Checkpointable) -> str | None:
    """``<output_dir>/checkpoint-<step>``, written atomically: the policy, tokenizer, trainer state and,
    unless ``save_only_model``, optimizer, scheduler, RNG states, counters and extras. Older ones
    beyond ``save_total_limit`` are removed. Every process must call it (sharded weights gather).

    Returns None, writing nothing, when a trained weight holds NaN/inf: a checkpoint must never be
    a worse resume point than the previous one.
    """
    args, accelerator = trainer.args, trainer.accelerator
    bad = nonfinite_parameters(trainer.trained_modules())  # the same on every process...
    if trainer.sharding is not None:  # ...unless each holds a shard: all must take the same branch
        bad = sorted({name for names in gather_object([bad]) for name in names})
    if bad:
        logger.error(
            "checkpoint at step %d NOT written: %d trained parameter(s) hold NaN/inf (first: %s)",
            trainer.state.global_step,
            len(bad),
            bad[0],
        )
        return None
    main, rank = accelerator.is_main_process, accelerator.process_index
    path = os.path.join(args.output_dir, f"{PREFIX}{trainer.state.global_step}")
    temp = broadcast_object(temp_directory(path) if main else None, accelerator)
    try:
        trainer.save_model(temp)  # written by the main process (sharded weights gathered by all)
        if main:  # state, optimizer and schedule are the same on every process
            trainer.state.save_to_json(os.path.join(temp, STATE_FILE))
            with open(os.path.join(temp, ARGS_FILE), "w", encoding="utf-8") as f:
                f.write(args.to_json_string())
            if not args.save_only_model:
                save_torch(trainer.lr_scheduler.state_dict(), temp, SCHEDULER_FILE)
                if trainer.sharding is None:
                    save_torch(trainer.optimizer.state_dict(), temp, OPTIMIZER_FILE)
        if trainer.sharding is not None and not args.save_only_model:  # every process its shards
            sharding.save_optimizer(
                trainer.optimizer_owner(), trainer.optimizer, os.path.join(temp, OPTIMIZER_DIR)
            )
        if not args.save_only_model:  # each process's own data, RNG and buffers
            save_torch(rng_state(trainer.generators()), temp, rank_file(RNG_FILE, rank))
            save_torch(trainer.counters_state(), temp, rank_file(BASE_FILE, rank))
            save_torch(trainer.extras_state(), temp, rank_file(EXTRAS_FILE, rank))
        accelerator.wait_for_everyone()
        if main:
            publish(temp, path)
            rotate_checkpoints(args.output_dir, args.save_total_limit, keep=path)
    except BaseException:
        if main:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(trainer: Checkpointable, path: str) -> None:
    """Restore a ``save_checkpoint`` folder into ``trainer`` (its optimizer and scheduler built).
    Checked before anything changes: the fsdp setting, the process count and (a checkpoint of another
    model shape) the weights' shapes; then optimizer, scheduler, state, counters, RNGs and extras."""
    accelerator = trainer.accelerator
    path = resolve_resume(path, trainer.args.output_dir)
    saved_sharded = os.path.isdir(os.path.join(path, OPTIMIZER_DIR))
    if saved_sharded != (trainer.sharding is not None):
        raise ValueError(
            f"{path!r} was saved {'with' if saved_sharded else 'without'} fsdp and this run is "
            f"{'not ' if trainer.sharding is None else ''}sharded: resume with the same fsdp setting"
        )
    # the main process's counters say how many processes wrote the checkpoint (every run has one)
    saved_processes = load_torch(path, BASE_FILE).get("num_processes", 1)
    if saved_processes != accelerator.num_processes:
        raise ValueError(
            f"{path!r} was saved by {saved_processes} process(es) but this run has "
            f"{accelerator.num_processes}: resume with the same number of processes"
        )
    load_pretrained_weights(accelerator.unwrap_model(trainer.model), path)
    try:
        if trainer.sharding is None:
            trainer.optimizer.load_state_dict(load_torch(path, OPTIMIZER_FILE))
        else:
            sharding.load_optimizer(
                trainer.optimizer_owner(), trainer.optimizer, os.path.join(path, OPTIMIZER_DIR)
            )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(
            f"optimizer state in {path!r} does not fit this run's optimizer (different trainable "
            f"parameters, optim or LoRA config?): {exc}"
        ) from exc
    trainer.lr_scheduler.load_state_dict(load_torch(path, SCHEDULER_FILE))
    saved = TrainerState.load_from_json(os.path.join(path, STATE_FILE))
    trainer.state.global_step = saved.global_step
    trainer.state.epoch = saved.epoch
    trainer.state.log_history = saved.log_history
    trainer.state.num_input_tokens_seen = saved.num_input_tokens_seen
    rank = accelerator.process_index
    trainer.load_counters_state(load_torch(path, rank_file(BASE_FILE, rank)))
    restore_rng_state(load_torch(path, rank_file(RNG_FILE, rank)), trainer.generators())
    trainer.load_extras_state(load_torch(path, rank_file(EXTRAS_FILE, rank)))
