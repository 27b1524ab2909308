"""What every fastppo trainer shares: the accelerator, optimizer and scheduler, gradient accumulation,
the optimizer-step flow (log / save / evaluate / callbacks), metrics files and saving.

Subclasses (GRPO, PPO) write ``train()`` as their numbered steps and call ``backward`` per
minibatch and ``end_micro_step`` after it; this class decides when the optimizer steps. Losses are
scaled by the subclass (the loss type owns its normaliser), never by accelerate.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, get_scheduler
from transformers.trainer_utils import TrainOutput, enable_full_determinism, set_seed

from ..logging import (
    METRICS_FILE,
    REWARD_PLOT_FILE,
    JsonlWriter,
    MetricsBuffer,
    ProgressBar,
    plot_reward_curve,
)
from ..memory.optim import create_optimizer


def interval(value: float, total: int) -> int:
    """A TrainingArguments step interval: an int, or a float < 1 meaning that fraction of ``total``."""
    return max(1, math.ceil(value * total)) if value < 1 else int(value)


def seed_everything(args: Any) -> None:
    """Seed python/numpy/torch (and make kernels deterministic with ``full_determinism``). Called by
    the trainers before they build models, as TRL does: LoRA adapters are randomly initialised."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


class Callbacks:
    """transformers ``TrainerCallback`` objects, called in order; a returned control replaces ours."""

    def __init__(self, callbacks: list[TrainerCallback | type] | None, trainer: TrainerBase):
        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in (callbacks or [])]
        self.trainer = trainer

    def __call__(self, event: str, **kwargs: Any) -> TrainerControl:
        t = self.trainer
        for callback in self.callbacks:
            result = getattr(callback, event)(
                t.args,
                t.state,
                t.control,
                model=t.model,
                processing_class=t.processing_class,
                optimizer=t.optimizer,
                lr_scheduler=t.lr_scheduler,
                **kwargs,
            )
            if result is not None:
                t.control = result
        return t.control


class TrainerBase:
    """Shared machinery; see the module docstring. ``self.model`` is the trained policy (unwrapped).
    Subclasses call ``seed_everything(args)`` before building their models."""

    def __init__(
        self,
        args: Any,
        model: nn.Module,
        processing_class: Any,
        callbacks: list[TrainerCallback] | None,
        optimizers: tuple[Any, Any],
    ):
        self.args = args
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        # gradient_accumulation_steps=1: accelerate would divide every loss by the accumulation count,
        # which is wrong for dapo (normalised by the token count of the whole accumulated batch).
        self.accelerator = Accelerator(cpu=args.use_cpu, mixed_precision=precision)
        if self.accelerator.num_processes > 1:
            raise ValueError("multi-process training is not supported yet; run a single process")
        self.model = model
        self.processing_class = processing_class
        self.optimizer, self.lr_scheduler = optimizers
        self.state = TrainerState(
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        self.callbacks = Callbacks(callbacks, self)
        self.metrics = MetricsBuffer()
        self.log_writer: JsonlWriter | None = None
        self.progress: ProgressBar | None = None
        self._micro_step = 0  # minibatches backpropagated so far (accumulation position)
        self._window_loss = 0.0  # summed scaled loss of the current accumulation window
        self._steps_loss: list[float] = []  # per-step losses since the last log
        self._loss_sum = 0.0  # over the whole run (TrainOutput.training_loss)
        self._train_start = time.perf_counter()
        self.reward_plot: str | None = None
        self._last_log_time = time.perf_counter()
        self._tokens_since_log = 0
        self._latest: dict[str, float] = {}  # the last logged values, shown by the progress bar

    def add_callback(self, callback: TrainerCallback | type) -> None:
        self.callbacks.callbacks.append(callback() if isinstance(callback, type) else callback)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # --- optimisation -------------------------------------------------------------------------------

    def trained_modules(self) -> list[nn.Module]:
        """Modules whose trainable parameters the optimizer steps (PPO adds its critic)."""
        return [self.model]

    def create_optimizer(self) -> torch.optim.Optimizer:
        """AdamW (``args.optim``: torch, fused, or bitsandbytes 8-bit) over the trainable parameters of
        ``trained_modules()``; no weight decay on biases and norm weights (as Trainer)."""
        args = self.args
        return create_optimizer(
            self.trained_modules(),
            str(getattr(args.optim, "value", args.optim)),
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )

    def create_scheduler(self, num_training_steps: int) -> Any:
        return get_scheduler(
            self.args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
        )

    def begin_training(self, max_steps: int, description: str) -> None:
        """Optimizer/scheduler, device placement, state, metrics file, progress bar, on_train_begin."""
        args = self.args
        if self.optimizer is None:
            self.optimizer = self.create_optimizer()
        if self.lr_scheduler is None:
            self.lr_scheduler = self.create_scheduler(max_steps)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler
        )
        self.model = self.accelerator.unwrap_model(self.model)  # single process: the module itself
        self.model.train()
        self.control = TrainerControl()
        self.state.max_steps = max_steps
        self.state.logging_steps = interval(args.logging_steps, max_steps)
        self.state.save_steps = interval(args.save_steps, max_steps)
        self.state.eval_steps = interval(args.eval_steps or args.logging_steps, max_steps)
        self.state.train_batch_size = args.per_device_train_batch_size
        self.state.num_train_epochs = args.num_train_epochs
        self.state.log_history = []
        os.makedirs(args.output_dir, exist_ok=True)
        self.log_writer = JsonlWriter(os.path.join(args.output_dir, METRICS_FILE))
        self.progress = ProgressBar(max_steps, disable=bool(args.disable_tqdm), description=description)
        self._last_log_time = self._train_start = time.perf_counter()
        self.callbacks("on_train_begin")
        if args.eval_on_start and getattr(self, "eval_dataset", None) is not None:
            self.evaluate()

    def backward(self, scaled_loss: torch.Tensor) -> None:
        """Backpropagate one minibatch's already-scaled loss; the optimizer steps every
        ``gradient_accumulation_steps`` minibatches (see ``end_micro_step``)."""
        if self._micro_step % self.args.gradient_accumulation_steps == 0:
            self.callbacks("on_step_begin")
        self.accelerator.backward(scaled_loss)
        self._window_loss += float(scaled_loss.detach())  # CPU sync: one scalar per minibatch

    def end_micro_step(self) -> bool:
        """Count a minibatch; step the optimizer at the end of an accumulation window.
        Returns True when training must stop (max_steps reached or a callback asked)."""
        self._micro_step += 1
        if self._micro_step % self.args.gradient_accumulation_steps != 0:
            return False
        grad_norm = self.accelerator.clip_grad_norm_(
            self.model.parameters(), self.args.max_grad_norm if self.args.max_grad_norm else float("inf")
        )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self._steps_loss.append(self._window_loss)
        self._loss_sum += self._window_loss
        self._window_loss = 0.0
        self.metrics.add("grad_norm", float(grad_norm))
        self.on_optimizer_step()
        return self._step_flow()

    def on_optimizer_step(self) -> None:
        """Hook for subclasses (e.g. syncing the reference model); runs before the step's callbacks."""

    def _step_flow(self) -> bool:
        """DefaultFlowCallback's schedule, then the user's callbacks, then act on the control flags."""
        args, state, control = self.args, self.state, self.control
        step = state.global_step
        control.should_log = args.logging_strategy == "steps" and (
            step % state.logging_steps == 0 or (step == 1 and args.logging_first_step)
        )
        control.should_save = args.save_strategy == "steps" and step % state.save_steps == 0
        control.should_evaluate = args.eval_strategy == "steps" and step % state.eval_steps == 0
        if step >= state.max_steps:
            control.should_training_stop = True
            control.should_log = args.logging_strategy == "steps"
        control = self.callbacks("on_step_end")
        if control.should_log:
            self.log({})
        if control.should_evaluate:
            self.evaluate()
        if control.should_save:
            self.save_checkpoint()
        control.should_log = control.should_save = control.should_evaluate = False
        if self.progress is not None:
            self.progress.update(step, self._latest)
        return control.should_training_stop

    def add_tokens(self, count: int) -> None:
        """Tokens (prompt + completion) trained on, for ``tokens/s`` and ``num_tokens``."""
        self._tokens_since_log += count
        self.state.num_input_tokens_seen += count

    # --- logging ------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], training: bool = True) -> None:
        """Write ``logs`` into log_history, metrics.jsonl and the callbacks' ``on_log``; with
        ``training``, first add the training metrics of the window since the last log (means over
        all its minibatches), the loss, learning rate and throughput."""
        record = dict(logs)
        if training:
            self._add_training_metrics(record)
        record["epoch"] = round(self.state.epoch, 4)
        record["step"] = self.state.global_step
        self.state.log_history.append(record)
        if self.log_writer is not None:
            self.log_writer.write(record)
        if training:
            self._latest = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self.callbacks("on_log", logs=record)

    def _add_training_metrics(self, record: dict[str, float]) -> None:
        now = time.perf_counter()
        if self._steps_loss:
            record["loss"] = sum(self._steps_loss) / len(self._steps_loss)
            self._steps_loss = []
        record.update(self.metrics.flush())
        if self.lr_scheduler is not None:
            record["learning_rate"] = float(self.lr_scheduler.get_last_lr()[0])
        if self._tokens_since_log:
            record["tokens/s"] = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            record["num_tokens"] = self.state.num_input_tokens_seen
        self._tokens_since_log, self._last_log_time = 0, now

    def end_training(self) -> TrainOutput:
        """Close the progress bar, draw the reward curve (``self.reward_plot``), fire on_train_end."""
        if self.progress is not None:
            self.progress.close()
        self.reward_plot = plot_reward_curve(
            self.state.log_history,
            os.path.join(self.args.output_dir, REWARD_PLOT_FILE),
            title=f"{type(self).__name__} reward",
        )
        self.callbacks("on_train_end")
        runtime = time.perf_counter() - self._train_start
        steps = self.state.global_step
        return TrainOutput(
            steps,
            self._loss_sum / max(steps, 1),
            {"train_runtime": runtime, "train_steps_per_second": steps / max(runtime, 1e-9)},
        )

    @property
    def metrics_file(self) -> str | None:
        """Path of the JSONL metrics file (set once training began)."""
        return None if self.log_writer is None else self.log_writer.path

    # --- saving -------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``save_pretrained`` of the policy (adapters only for PEFT) and its tokenizer."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def save_checkpoint(self) -> str:
        """``<output_dir>/checkpoint-<step>``: the policy, tokenizer and trainer state; older ones
        beyond ``save_total_limit`` are removed."""
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        self.save_model(path)
        self.state.save_to_json(os.path.join(path, "trainer_state.json"))
        with open(os.path.join(path, "training_args.json"), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())
        self._rotate_checkpoints()
        self.callbacks("on_save")
        return path

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        root = self.args.output_dir
        found = sorted(
            (int(d.split("-")[1]), d)
            for d in os.listdir(root)
            if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
        )
        for _, name in found[:-limit]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError
