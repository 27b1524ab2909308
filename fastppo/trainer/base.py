"""What every fastppo trainer shares: the accelerator, optimizer and scheduler, gradient accumulation,
the optimizer-step flow (log / save / evaluate / callbacks), metrics files and saving.

Subclasses (GRPO, PPO) write ``train()`` as their numbered steps and call ``backward`` per
minibatch and ``end_micro_step`` after it; this class decides when the optimizer steps (and skips a
step whose loss or gradient is not finite: ``fastppo.guards``). Losses are scaled by the subclass
(the loss type owns its normaliser), never by accelerate.

Checkpoints (``fastppo.checkpoint``) hold everything this class owns; a subclass adds its own state
through three hooks, all called at an optimizer-step boundary:
  ``generators()``          -> the ``torch.Generator``s it draws from (state saved and restored)
  ``checkpoint_extras()``   -> a dict of tensors / numbers / strings / lists / dicts (rollout buffer,
                               its position, value model, the reference's own layers, ...)
  ``restore_extras(extras)`` <- that dict, tensors on the CPU (move them where they belong)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, get_scheduler
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_utils import TrainOutput, enable_full_determinism, set_seed

from .. import checkpoint as ckpt
from .. import sharding
from ..adapters import has_adapters
from ..distributed import (
    all_reduce_gradients,
    broadcast_object,
    broadcast_parameters,
    check_distributed_type,
    merge_metric_sums,
    sum_over_processes,
)
from ..guards import NonFiniteGuard
from ..metrics import (
    METRICS_FILE,
    REWARD_PLOT_FILE,
    JsonlWriter,
    MetricsBuffer,
    ProgressBar,
    plot_reward_curve,
)
from ..optim import BNB_OPTIMIZERS, create_optimizer, warn_once
from ..reference import FrozenCopyReference

logger = logging.getLogger("fastppo")


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

    REWARD_METRIC = "reward"  # what the reward curve plots (PPO: objective/scores)
    KL_METRIC = "kl"

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
        # split_batches: the trainers split their own batches across processes, and with it the
        # prepared LR scheduler steps once per optimizer step instead of once per process.
        self.accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision=precision,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        check_distributed_type(self.accelerator)
        # FSDP2 when the run asked for it (fastppo.sharding); None: every process holds whole models
        self.sharding = sharding.sharding_settings(args, self.accelerator)
        self.model = model
        self.processing_class = processing_class
        self.optimizer, self.lr_scheduler = optimizers
        self.state = TrainerState(
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        # report_to's integrations (TensorBoard, W&B, ...) first, then the user's, as in Trainer
        reporters = get_reporting_integration_callbacks(args.report_to)
        self.callbacks = Callbacks([*reporters, *(callbacks or [])], self)
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
        self.guard = NonFiniteGuard(getattr(args, "max_consecutive_nonfinite_steps", 3))
        # Where the run stands in its stream of rollouts (the subclasses checkpoint it): rollouts drawn
        # so far, the one being optimised (None between rollouts) and its passes done (a checkpoint
        # can fall between two of them).
        self._rollouts_drawn = 0
        self._buffer: Any = None
        self._buffer_done = 0

    def add_callback(self, callback: TrainerCallback | type) -> None:
        self.callbacks.callbacks.append(callback() if isinstance(callback, type) else callback)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def untouched_rng(self) -> contextlib.AbstractContextManager:
        """Evaluation samples from a fork of torch's RNG (CPU and this GPU), so training's random
        stream, and with it an exact resume, does not depend on when or whether evaluation ran."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    # --- optimisation -------------------------------------------------------------------------------

    @property
    def micro_steps_per_update(self) -> int:
        """Minibatches backpropagated per optimizer step (PPO: a mini-batch's micro-batches)."""
        return self.args.gradient_accumulation_steps

    def trained_modules(self) -> list[nn.Module]:
        """Modules whose trainable parameters the optimizer steps (PPO adds its critic)."""
        return [self.model]

    def shard_policy_and_reference(self, reference: Any, *others: nn.Module) -> None:
        """With fsdp: the policy, a frozen reference copy (``FrozenCopyReference.model``) and
        ``others`` (a separate value model, reward models), each sharded in place
        (``fastppo.sharding``) after every process took the main process's weights. Called by
        subclasses before the optimizer exists, so it is built over the shards."""
        if self.sharding is None:
            return
        if self.optimizer is not None:  # it would hold the parameters sharding replaces
            raise ValueError(
                "optimizers=(optimizer, ...) cannot be combined with fsdp: the optimizer must be built "
                "over the shards, which the trainer does (set optim and learning_rate in the config)"
            )
        if has_adapters(self.model):
            raise ValueError("fsdp with a PEFT (LoRA) policy is not supported yet; train it unsharded")
        copy = [reference.model] if isinstance(reference, FrozenCopyReference) else []
        models = [self.model, *copy, *others]
        broadcast_parameters(models, self.accelerator)
        for module in models:
            sharding.shard(module, self.sharding)

    def _whole_trained_modules(self) -> list[nn.Module]:
        """Trained modules every process holds whole (all of them unless sharded)."""
        return [m for m in self.trained_modules() if not sharding.is_sharded(m)]

    def _optimizer_owner(self) -> nn.Module:
        """The modules the optimizer steps, as one module (for torch.distributed.checkpoint's names)."""
        modules = self.trained_modules()
        return modules[0] if len(modules) == 1 else nn.ModuleList(modules)

    def create_optimizer(self) -> torch.optim.Optimizer:
        """AdamW (``args.optim``: torch, fused, or bitsandbytes 8-bit) over the trainable parameters of
        ``trained_modules()``; no weight decay on biases and norm weights (as Trainer)."""
        args = self.args
        name = str(getattr(args.optim, "value", args.optim))
        if self.sharding is not None and name in BNB_OPTIMIZERS:
            warn_once(f"optim={name!r} with fsdp: bitsandbytes does not shard its state here; adamw_torch")
            name = "adamw_torch"
        return create_optimizer(
            self.trained_modules(),
            name,
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

    def begin_training(self, max_steps: int, description: str, resume_from: str | None = None) -> None:
        """Optimizer/scheduler, device placement, state, metrics file, progress bar, on_train_begin.

        ``resume_from``: a checkpoint folder (``checkpoint.resolve_resume`` turns TRL's
        ``resume_from_checkpoint`` into one); everything the base owns is restored from it and the
        subclass's ``restore_extras`` is called, before on_train_begin. The metrics file is rewritten
        from the checkpoint's log history (records a killed run wrote after its last checkpoint go).
        """
        args = self.args
        if self.optimizer is None:
            self.optimizer = self.create_optimizer()
        if self.lr_scheduler is None:
            self.lr_scheduler = self.create_scheduler(max_steps)
        # The model is not wrapped (no DDP: see fastppo.distributed); every process starts from rank
        # 0's weights, and end_micro_step averages the gradients. Sharded models took rank 0's
        # weights before sharding, and accelerate's FSDP prepare wants the model too: left alone.
        if self.sharding is None:
            self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.optimizer, self.lr_scheduler)
        broadcast_parameters(self._whole_trained_modules(), self.accelerator)
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
        ckpt.remove_stale_temps(args.output_dir)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        main = self.accelerator.is_main_process  # one metrics file and one progress bar per run
        self.log_writer = JsonlWriter(os.path.join(args.output_dir, METRICS_FILE)) if main else None
        for record in (
            self.state.log_history if main else []
        ):  # resumed: the file says what the checkpoint says
            self.log_writer.write(record)
        self.progress = ProgressBar(
            max_steps, disable=bool(args.disable_tqdm) or not main, description=description
        )
        self.progress.update(self.state.global_step, {})
        self._last_log_time = self._train_start = time.perf_counter()
        self.callbacks("on_train_begin")
        if args.eval_on_start and getattr(self, "eval_dataset", None) is not None:
            self.evaluate()

    def backward(self, scaled_loss: torch.Tensor) -> None:
        """Backpropagate one minibatch's already-scaled loss; the optimizer steps every
        ``micro_steps_per_update`` minibatches (see ``end_micro_step``)."""
        if self._micro_step % self.micro_steps_per_update == 0:
            self.callbacks("on_step_begin")
        self.accelerator.backward(scaled_loss)
        self._window_loss += float(scaled_loss.detach())  # CPU sync: one scalar per minibatch

    def end_micro_step(self) -> bool:
        """Count a minibatch; step the optimizer at the end of an accumulation window, unless its loss
        or gradient norm is not finite (then the step is skipped: ``fastppo.guards``).
        Returns True when training must stop (max_steps reached or a callback asked)."""
        self._micro_step += 1
        if self._micro_step % self.micro_steps_per_update != 0:
            return False
        params = [p for module in self.trained_modules() for p in module.parameters() if p.requires_grad]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm else float("inf")
        # data parallel: the mean gradient (sharded modules: FSDP's reduce-scatter averaged it already)
        all_reduce_gradients(self._whole_trained_modules(), self.accelerator)
        if self.sharding is None:
            grad_norm = float(self.accelerator.clip_grad_norm_(params, max_norm))  # CPU sync, once a step
        else:
            grad_norm = sharding.clip_grad_norm(params, max_norm)
        # the mean over processes (a NaN anywhere stays NaN): every process then takes the same
        # decision below, and logs the same values (the next collectives depend on them)
        loss = sum_over_processes(self._window_loss, self.accelerator) / self.accelerator.num_processes
        scaler = self.accelerator.scaler
        verdict = self.guard.check(
            loss, grad_norm, self.state.global_step + 1, scaler_overflow_ok=scaler is not None
        )
        if verdict.apply or (scaler is not None and math.isfinite(loss)):
            # fp16 overflow: the GradScaler skips the update and lowers its scale inside step(), and
            # accelerate's scheduler then skips its step too.
            self.optimizer.step()
            self.lr_scheduler.step()
        if not verdict.apply:
            logger.warning(
                "optimizer step %d skipped: non-finite %s", self.state.global_step + 1, verdict.reason
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        if math.isfinite(loss):  # a skipped NaN window must not turn the logged and final loss into NaN
            self._steps_loss.append(loss)
            self._loss_sum += loss
        self._window_loss = 0.0
        self.metrics.add("grad_norm", grad_norm)
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
        logs = dict(record)  # what callbacks get, as from Trainer: the step is state.global_step
        record["step"] = self.state.global_step
        self.state.log_history.append(record)
        if self.log_writer is not None:
            self.log_writer.write(record)
        if training:
            self._latest = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self.callbacks("on_log", logs=logs)

    def _add_training_metrics(self, record: dict[str, float]) -> None:
        now = time.perf_counter()
        accelerator = self.accelerator
        if self._steps_loss:  # already means over the processes (end_micro_step)
            record["loss"] = sum(self._steps_loss) / len(self._steps_loss)
            self._steps_loss = []
        self.metrics.load_state_dict(merge_metric_sums(self.metrics.state_dict(), accelerator))
        record.update(self.metrics.flush())
        record["skipped_steps"] = self.guard.skipped  # run total of non-finite steps skipped
        if self.lr_scheduler is not None:
            record["learning_rate"] = float(self.lr_scheduler.get_last_lr()[0])
        tokens = sum_over_processes(self._tokens_since_log, accelerator)
        if tokens:
            record["tokens/s"] = tokens / max(now - self._last_log_time, 1e-9)
            record["num_tokens"] = sum_over_processes(self.state.num_input_tokens_seen, accelerator)
        self._tokens_since_log, self._last_log_time = 0, now

    def end_training(self) -> TrainOutput:
        """Close the progress bar, draw the reward curve (``self.reward_plot``), fire on_train_end."""
        if self.progress is not None:
            self.progress.close()
        self.accelerator.wait_for_everyone()  # every process leaves train() with its collectives done
        self.reward_plot = plot_reward_curve(
            self.state.log_history,
            os.path.join(self.args.output_dir, REWARD_PLOT_FILE),
            title=f"{type(self).__name__} reward",
            metric=self.REWARD_METRIC,
            kl_metric=self.KL_METRIC,
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
        """``save_pretrained`` of the policy (adapters only for PEFT) and its tokenizer, by the main
        process (the weights are the same on every process; sharded ones are gathered first, so
        every process must call this)."""
        weights = sharding.full_state_dict(self.model) if self.sharding is not None else None
        if not self.accelerator.is_main_process:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir, state_dict=weights)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def save_checkpoint(self) -> str | None:
        """``<output_dir>/checkpoint-<step>``, written atomically (``fastppo.checkpoint``): the policy,
        tokenizer, trainer state and, unless ``save_only_model``, optimizer, scheduler, RNG states and
        the subclass's ``checkpoint_extras()``. Older ones beyond ``save_total_limit`` are removed.

        Returns None, writing nothing, when a trained weight holds NaN/inf: a checkpoint must never be
        a worse resume point than the previous one.
        """
        bad = ckpt.nonfinite_parameters(self.trained_modules())  # the same on every process...
        if self.sharding is not None:  # ...unless each holds a shard: all must take the same branch
            bad = sorted({name for names in gather_object([bad]) for name in names})
        if bad:
            logger.error(
                "checkpoint at step %d NOT written: %d trained parameter(s) hold NaN/inf (first: %s)",
                self.state.global_step,
                len(bad),
                bad[0],
            )
            return None
        accelerator = self.accelerator
        main, rank = accelerator.is_main_process, accelerator.process_index
        path = os.path.join(self.args.output_dir, f"{ckpt.PREFIX}{self.state.global_step}")
        temp = broadcast_object(ckpt.temp_directory(path) if main else None, accelerator)
        try:
            self.save_model(temp)  # written by the main process (sharded weights gathered by all)
            if main:  # state, optimizer and schedule are the same on every process
                self.state.save_to_json(os.path.join(temp, ckpt.STATE_FILE))
                with open(os.path.join(temp, ckpt.ARGS_FILE), "w", encoding="utf-8") as f:
                    f.write(self.args.to_json_string())
                if not self.args.save_only_model:
                    ckpt.save_torch(self.lr_scheduler.state_dict(), temp, ckpt.SCHEDULER_FILE)
                    if self.sharding is None:
                        ckpt.save_torch(self.optimizer.state_dict(), temp, ckpt.OPTIMIZER_FILE)
            if self.sharding is not None and not self.args.save_only_model:  # every process its shards
                sharding.save_optimizer(
                    self._optimizer_owner(), self.optimizer, os.path.join(temp, sharding.OPTIMIZER_DIR)
                )
            if not self.args.save_only_model:  # each process's own data, RNG and buffers
                ckpt.save_torch(ckpt.rng_state(self.generators()), temp, ckpt.rank_file(ckpt.RNG_FILE, rank))
                ckpt.save_torch(self._base_state(), temp, ckpt.rank_file(ckpt.BASE_FILE, rank))
                ckpt.save_torch(self.checkpoint_extras(), temp, ckpt.rank_file(ckpt.EXTRAS_FILE, rank))
            accelerator.wait_for_everyone()
            if main:
                ckpt.publish(temp, path)
                ckpt.rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, keep=path)
        except BaseException:
            if main:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        self.callbacks("on_save")
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore a ``save_checkpoint`` folder into this trainer (after ``begin_training`` built the
        optimizer and scheduler). Checked before anything changes: the fsdp setting, the process count
        and (a checkpoint of another model shape) the weights' shapes; then optimizer, scheduler,
        state, RNGs, and ``restore_extras``."""
        path = ckpt.resolve_resume(path, self.args.output_dir)
        saved_sharded = os.path.isdir(os.path.join(path, sharding.OPTIMIZER_DIR))
        if saved_sharded != (self.sharding is not None):
            raise ValueError(
                f"{path!r} was saved {'with' if saved_sharded else 'without'} fsdp and this run is "
                f"{'not ' if self.sharding is None else ''}sharded: resume with the same fsdp setting"
            )
        # the main process's counters say how many processes wrote the checkpoint (every run has one)
        saved_processes = ckpt.load_torch(path, ckpt.BASE_FILE).get("num_processes", 1)
        if saved_processes != self.accelerator.num_processes:
            raise ValueError(
                f"{path!r} was saved by {saved_processes} process(es) but this run has "
                f"{self.accelerator.num_processes}: resume with the same number of processes"
            )
        ckpt.load_pretrained_weights(self.accelerator.unwrap_model(self.model), path)
        try:
            if self.sharding is None:
                self.optimizer.load_state_dict(ckpt.load_torch(path, ckpt.OPTIMIZER_FILE))
            else:
                sharding.load_optimizer(
                    self._optimizer_owner(), self.optimizer, os.path.join(path, sharding.OPTIMIZER_DIR)
                )
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(
                f"optimizer state in {path!r} does not fit this run's optimizer (different trainable "
                f"parameters, optim or LoRA config?): {exc}"
            ) from exc
        self.lr_scheduler.load_state_dict(ckpt.load_torch(path, ckpt.SCHEDULER_FILE))
        saved = TrainerState.load_from_json(os.path.join(path, ckpt.STATE_FILE))
        self.state.global_step = saved.global_step
        self.state.epoch = saved.epoch
        self.state.log_history = saved.log_history
        self.state.num_input_tokens_seen = saved.num_input_tokens_seen
        rank = self.accelerator.process_index
        self._load_base_state(ckpt.load_torch(path, ckpt.rank_file(ckpt.BASE_FILE, rank)))
        ckpt.restore_rng_state(ckpt.load_torch(path, ckpt.rank_file(ckpt.RNG_FILE, rank)), self.generators())
        self.restore_extras(ckpt.load_torch(path, ckpt.rank_file(ckpt.EXTRAS_FILE, rank)))

    def _base_state(self) -> dict[str, Any]:
        """Counters that make a resumed run log and stop exactly as an uninterrupted one."""
        return {
            "micro_step": self._micro_step,
            "loss_sum": self._loss_sum,
            "steps_loss": list(self._steps_loss),
            "tokens_since_log": self._tokens_since_log,
            "metrics": self.metrics.state_dict(),
            "guard": self.guard.state_dict(),
            "num_processes": self.accelerator.num_processes,
        }

    def _load_base_state(self, state: dict[str, Any]) -> None:
        self._micro_step = int(state["micro_step"])
        self._loss_sum = float(state["loss_sum"])
        self._steps_loss = [float(v) for v in state["steps_loss"]]
        self._tokens_since_log = int(state["tokens_since_log"])
        self.metrics.load_state_dict(state["metrics"])
        self.guard.load_state_dict(state["guard"])

    def continue_rollouts(self, batches: Iterator[Any]) -> bool:
        """After ``begin_training``: skip the prompt batches of the rollouts drawn before a checkpoint
        and finish the rollout it fell inside. True when the run is already over."""
        for _ in range(self._rollouts_drawn):
            next(batches)
        stop = self.state.global_step >= self.state.max_steps  # resumed from the run's last step
        if not stop and self._buffer is not None:  # the checkpoint fell inside a rollout: finish it
            stop = self._optimise(self._buffer, done=self._buffer_done)
        return stop

    def _optimise(self, buffer: Any, done: int = 0) -> bool:  # pragma: no cover - abstract
        """The optimizer passes over one rollout, from pass ``done``; True when training must stop."""
        raise NotImplementedError

    # --- subclass checkpoint hooks (see the module docstring) ----------------------------------------

    def generators(self) -> dict[str, torch.Generator]:
        """The trainer's own ``torch.Generator``s by name; their states travel in the checkpoint."""
        return {}

    def checkpoint_extras(self) -> dict[str, Any]:
        """Trainer-specific state (tensors, numbers, strings, lists, dicts only: loaded weights_only)."""
        return {}

    def restore_extras(self, extras: dict[str, Any]) -> None:
        """Inverse of ``checkpoint_extras``; tensors arrive on the CPU."""

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError
