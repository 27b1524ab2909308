"""What both trainers share, as the steps their ``train()`` calls in order (nothing here calls back into
a trainer's loop):

  begin_training    optimizer, scheduler, resume (``checkpoint.load_checkpoint``), metrics file
  prompt_stream     this process's rows of each rollout (a resumed run continues its stream)
  sample            completions for dataset rows with the current policy
  micro_batches     the micro-batches of the rollout under optimisation, from where it stands
  backward          one micro-batch's already-scaled loss (the loss type owns its normaliser, so
                    accelerate never scales it)
  optimizer_step    at the end of an accumulation window: the mean gradient over processes,
                    clipping, the non-finite guard (``fastppo.guards``), optimizer and LR schedule
  after_step        transformers' step schedule and the callbacks: log / evaluate / save; stop?
  end_training      progress bar, reward curve, on_train_end

Around them: the accelerator (the models are not wrapped in DDP: ``fastppo.distributed``), FSDP2
sharding, the forward plan every pass follows (``policy_forward``), the reference policy, the
logging window (``TrainingLog``), evaluation's prompt loop, saving, and the checkpoint state: the
counters, the rollout under optimisation with its position (so a run resumed inside a rollout
continues exactly, FIELD-NOTES 11), a synced reference's weights and the trainer's own extras.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, get_scheduler
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_utils import TrainOutput, enable_full_determinism, set_seed, speed_metrics

from .. import checkpoint as ckpt
from .. import cpu_runtime, sharding
from ..adapters import has_adapters
from ..batch import PolicyBatch
from ..data import Loading, PromptBatches, is_streamed
from ..distributed import (
    all_reduce_gradients,
    broadcast_parameters,
    check_distributed_type,
    evaluation_share,
    rank_rows,
    sum_over_processes,
)
from ..guards import NonFiniteGuard
from ..optim import optimizer_from_config
from ..policy_forward import PolicyForward
from ..reference import ReferencePolicy
from ..rollout import Rollout, Sampler, SamplingSettings, sample_rollout
from .training_log import TrainingLog

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


class RolloutBuffer(abc.ABC):
    """A rollout under optimisation: its micro-batches over every pass, in order, and how many were
    handed out. Checkpoints fall on optimizer-step boundaries, after the backward of every
    micro-batch handed out, so ``done`` is where a resumed run continues."""

    done: int = 0

    @abc.abstractmethod
    def __len__(self) -> int:
        """Micro-batches over all passes."""

    @abc.abstractmethod
    def micro_batch(self, index: int) -> PolicyBatch: ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and lists only (checkpoints load with ``weights_only=True``)."""

    @classmethod
    @abc.abstractmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> RolloutBuffer: ...

    @property
    def finished(self) -> bool:
        return self.done == len(self)

    def remaining(self) -> Iterator[PolicyBatch]:
        while self.done < len(self):
            self.done += 1
            yield self.micro_batch(self.done - 1)


class TrainerBase:
    """Shared machinery; see the module docstring. ``self.model`` is the trained policy (unwrapped).
    Subclasses call ``seed_everything(args)`` before building their models, set ``self.reference``
    (``reference.build_reference``) and ``self.sampler``, and name their ``RolloutBuffer`` type."""

    REWARD_METRIC = "reward"  # what the reward curve plots (PPO: objective/scores)
    KL_METRIC = "kl"
    BUFFER: ClassVar[type[RolloutBuffer]]  # the trainer's rollout buffer (rebuilt from checkpoints)

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
        cpu_runtime.configure_cpu_threads(model, self.accelerator.device)  # threads sized to the model
        # FSDP2 when the run asked for it (fastppo.sharding); None: every process holds whole models
        self.sharding = sharding.sharding_settings(args, self.accelerator)
        self.model = model
        self.processing_class = processing_class
        self.optimizer, self.lr_scheduler = optimizers
        self.policy_forward = PolicyForward(args.forward_plan())
        self.reference: ReferencePolicy | None = None
        self.sampler: Sampler | None = None
        self._sampler_weights_step: int | None = None  # optimizer step the sampler's weights are of
        self.eos_token_ids: list[int] = []
        self.state = TrainerState(
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        # report_to's integrations (TensorBoard, W&B, ...) first, then the user's, as in Trainer
        reporters = get_reporting_integration_callbacks(args.report_to)
        self.callbacks = Callbacks([*reporters, *(callbacks or [])], self)
        self.training_log = TrainingLog(self.accelerator)
        self._log_kind = "other"  # what log() is writing: "step", "summary" or "other" (``logging_as``)
        self.metrics = self.training_log.metrics  # what the trainers record into, weighted per minibatch
        self.reward_plot: str | None = None
        self.guard = NonFiniteGuard(args.max_consecutive_nonfinite_steps)
        self._micro_step = 0  # micro-batches backpropagated so far (accumulation position)
        self._window_loss = 0.0  # summed scaled loss of the current accumulation window
        self._shuffle = torch.Generator().manual_seed(args.seed)  # minibatch order, apart from sampling
        # Where the run stands in its stream of rollouts (checkpointed): rollouts drawn so far, and
        # the one under optimisation (None between rollouts).
        self.rollouts_drawn = 0
        self.buffer: RolloutBuffer | None = None

    def add_callback(self, callback: TrainerCallback | type) -> None:
        self.callbacks.callbacks.append(callback() if isinstance(callback, type) else callback)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def ref_model(self) -> nn.Module | None:
        """TRL's name for the frozen reference model (fastppo's ``reference`` role holds it): its own
        weights, or None when it holds none (beta / kl_coef 0: no reference; a PEFT policy's
        reference is the policy with its adapters off, None in TRL too). With ``num_frozen_layers``
        it is the module of the layers above the shared trunk, not a whole causal LM."""
        return None if self.reference is None else self.reference.own_weights()

    def untouched_rng(self) -> contextlib.AbstractContextManager:
        """Evaluation samples from a fork of torch's RNG (CPU and this GPU), so training's random
        stream, and with it an exact resume, does not depend on when or whether evaluation ran."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    # --- models ---------------------------------------------------------------------------------

    def trained_modules(self) -> list[nn.Module]:
        """Modules whose trainable parameters the optimizer steps (PPO adds its critic)."""
        return [self.model]

    def optimizer_owner(self) -> nn.Module:
        """The modules the optimizer steps, as one module (for torch.distributed.checkpoint's names)."""
        modules = self.trained_modules()
        return modules[0] if len(modules) == 1 else nn.ModuleList(modules)

    def _whole_trained_modules(self) -> list[nn.Module]:
        """Trained modules every process holds whole (all of them unless sharded)."""
        return [m for m in self.trained_modules() if not sharding.is_sharded(m)]

    def shard_models(self, *others: nn.Module) -> None:
        """With fsdp: the policy, the reference's own weights (a frozen copy) and ``others`` (a
        separate value model, reward models), each sharded in place (``fastppo.sharding``) after every
        process took the main process's weights. Called before the optimizer exists, so it is built
        over the shards."""
        if self.sharding is None:
            return
        if self.optimizer is not None:  # it would hold the parameters sharding replaces
            raise ValueError(
                "optimizers=(optimizer, ...) cannot be combined with fsdp: the optimizer must be built "
                "over the shards, which the trainer does (set optim and learning_rate in the config)"
            )
        if has_adapters(self.model):
            raise ValueError("fsdp with a PEFT (LoRA) policy is not supported yet; train it unsharded")
        own = None if self.reference is None else self.reference.own_weights()
        models = [self.model, *([own] if own is not None else []), *others]
        broadcast_parameters(models, self.accelerator)
        for module in models:
            sharding.shard(module, self.sharding)

    # --- the steps of train() -------------------------------------------------------------------

    def begin_training(self, max_steps: int, description: str, resume_from: str | None = None) -> None:
        """Optimizer/scheduler, device placement, state, metrics file, progress bar, on_train_begin.

        ``resume_from``: a checkpoint folder (``checkpoint.resolve_resume`` turns TRL's
        ``resume_from_checkpoint`` into one), restored before on_train_begin. The metrics file is
        rewritten from the checkpoint's log history (records a killed run wrote after its last
        checkpoint go).
        """
        args = self.args
        if self.optimizer is None:
            self.optimizer = optimizer_from_config(args, self.trained_modules(), self.sharding is not None)
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                args.lr_scheduler_type,
                self.optimizer,
                num_warmup_steps=args.get_warmup_steps(max_steps),
                num_training_steps=max_steps,
                scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
            )
        # The model is not wrapped (no DDP: see fastppo.distributed); every process starts from rank
        # 0's weights, and optimizer_step averages the gradients. Sharded models took rank 0's
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
            ckpt.load_checkpoint(self, resume_from)
        # Where this train() call starts (after a resume): its summary covers its own steps, as HF's.
        self._call_start = (time.time(), self.state.global_step, self.training_log.loss_sum)
        self.training_log.open(
            args.output_dir,
            self.state.log_history,
            max_steps,
            self.state.global_step,
            disable=bool(args.disable_tqdm),
            description=description,
        )
        self.callbacks("on_train_begin")
        if args.eval_on_start and getattr(self, "eval_dataset", None) is not None:
            self.evaluate()

    @property
    def finished(self) -> bool:
        """max_steps reached (also by the run a checkpoint resumed), or a callback stopped training."""
        return self.control.should_training_stop or self.state.global_step >= self.state.max_steps

    def prompt_stream(self, size: int, seed: int, shuffle: bool = True) -> Iterator[list[dict[str, Any]]]:
        """This process's rows of each rollout's ``size`` prompts (whole GRPO groups stay on one
        process), endless (the step count ends training): reshuffled each epoch, and a resumed run
        continues after the batches drawn before its checkpoint (``fastppo.data``: the same order
        with DataLoader workers; a stream is replayed to there). A stream's ``state.epoch`` counts
        its full passes (the fraction of one needs a length)."""
        loading = Loading.from_args(self.args, self.device)
        batches = PromptBatches(self.train_dataset, size, seed, shuffle, self.rollouts_drawn, loading)
        streamed = is_streamed(self.train_dataset)
        for rows in batches:
            self.state.epoch = (
                float(batches.passes)
                if streamed
                else self.args.epochs_done(self.rollouts_drawn, len(self.train_dataset))
            )
            self.rollouts_drawn += 1
            yield rows[rank_rows(len(rows), self.accelerator, "prompts per rollout")]

    def sample(self, rows: list[dict[str, Any]], n: int, settings: SamplingSettings) -> Rollout:
        """``n`` completions for each dataset row, with the current policy (under autocast). A
        sampler with weights of its own (``Sampler.sync_weights``) first takes the policy's, when an
        optimizer step (or a resume) changed them since it last did."""
        sync_weights = getattr(self.sampler, "sync_weights", None)
        if sync_weights is not None and self._sampler_weights_step != self.state.global_step:
            sync_weights()
            self._sampler_weights_step = self.state.global_step
        with self.accelerator.autocast():
            return sample_rollout(
                self.sampler,
                self.processing_class,
                rows,
                n,
                settings,
                self.eos_token_ids,
                self.device,
                self.args.prompt_settings(),
            )

    def micro_batches(self, buffer: RolloutBuffer) -> Iterator[PolicyBatch]:
        """``buffer``'s micro-batches from where it stands, as the rollout under optimisation (what a
        checkpoint saves); cleared once the last one has been trained on."""
        self.buffer = buffer
        yield from buffer.remaining()
        self.buffer = None

    def add_tokens(self, count: int) -> None:
        """Tokens (prompt + completion) trained on, for ``tokens/s`` and ``num_tokens``."""
        self.training_log.add_tokens(count)
        self.state.num_input_tokens_seen += count

    def backward(self, scaled_loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's already-scaled loss (its normaliser is the loss type's)."""
        if self._micro_step % self.args.micro_batches_per_step == 0:
            self.callbacks("on_step_begin")
        self.accelerator.backward(scaled_loss)
        self._window_loss += float(scaled_loss.detach())  # CPU sync: one scalar per minibatch
        self._micro_step += 1

    @property
    def window_complete(self) -> bool:
        """The micro-batch just backpropagated ends an accumulation window: time to step."""
        return self._micro_step % self.args.micro_batches_per_step == 0

    def optimizer_step(self) -> None:
        """Step the optimizer and the LR schedule on the window's gradient, unless its loss or
        gradient norm is not finite (then the step is skipped: ``fastppo.guards``); count the step."""
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
        self.training_log.add_step_loss(loss)
        self._window_loss = 0.0
        self.metrics.add("grad_norm", grad_norm)

    def after_step(self) -> bool:
        """After an optimizer step: DefaultFlowCallback's schedule, then the user's callbacks, then
        log / evaluate / save as the control flags say. True when training must stop."""
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
            self.log_training_step()
        if control.should_evaluate:
            self.evaluate()
        if control.should_save:
            self.save_checkpoint()
        control.should_log = control.should_save = control.should_evaluate = False
        self.training_log.show(step)
        return control.should_training_stop

    def end_training(self) -> TrainOutput:
        """HF Trainer's ending (``_finalize_training``): the summary row (``train_loss``: the mean step
        loss over the steps this call trained, for a resumed run those after its checkpoint, as HF's;
        ``train_runtime``; samples and steps per second; ``total_flos``, 0: fastppo counts no FLOPs;
        ``epoch``, ``step``) logged to log_history and the callbacks' on_log (not to metrics.jsonl,
        which keeps the per-step records), then the progress bar closed, the reward curve drawn
        (``self.reward_plot``) and on_train_end. Returns ``TrainOutput(global_step, training_loss,
        metrics)``."""
        self.accelerator.wait_for_everyone()  # every process leaves train() with its collectives done
        start_time, start_step, start_loss_sum = self._call_start
        steps = self.state.global_step - start_step
        samples_per_step = (
            self.args.per_device_train_batch_size
            * self.args.micro_batches_per_step
            * self.accelerator.num_processes
        )
        # non-finite (skipped) steps add no loss but count, as in TrainingLog.add_step_loss
        train_loss = (self.training_log.loss_sum - start_loss_sum) / max(steps, 0.001)
        metrics = speed_metrics("train", start_time, num_samples=steps * samples_per_step, num_steps=steps)
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        with self.logging_as("summary"):
            self.log(metrics)
        metrics["epoch"] = self.state.log_history[-1]["epoch"]  # HF's log() adds it to this dict too
        self.reward_plot = self.training_log.close(
            self.state.log_history,
            self.args.output_dir,
            title=f"{type(self).__name__} reward",
            metric=self.REWARD_METRIC,
            kl_metric=self.KL_METRIC,
        )
        self.callbacks("on_train_end")
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # --- logging and evaluation -----------------------------------------------------------------

    def log_training_step(self) -> None:
        """Step 6's log: the window's training record, then ``log`` with it, as HF Trainer's
        ``_maybe_log_save_evaluate`` builds its record before calling ``log``; so an override of
        ``log`` written for Trainer (``log(self, logs, start_time=None)``) sees the whole record."""
        with self.logging_as("step"):
            self.log(self.training_metrics())

    @contextlib.contextmanager
    def logging_as(self, kind: str) -> Iterator[None]:
        """What the records ``log`` writes inside the block are, since an override of ``log`` with
        Trainer's signature passes on only the dict: ``"step"``, a training step's (metrics.jsonl,
        and the progress bar shows it); ``"summary"``, train()'s closing row (log_history and
        on_log, as HF's, but not metrics.jsonl, whose records stay one per step or evaluation).
        Outside: ``"other"`` (evaluations, a user's own calls), written to metrics.jsonl."""
        self._log_kind = kind
        try:
            yield
        finally:
            self._log_kind = "other"

    def training_metrics(self) -> dict[str, float]:
        """The window since the last log: its training metrics (means over all its minibatches),
        the loss, learning rate and throughput."""
        record: dict[str, float] = {}
        lr = None if self.lr_scheduler is None else float(self.lr_scheduler.get_last_lr()[0])
        self.training_log.flush_window(record, self.state.num_input_tokens_seen, self.guard.skipped, lr)
        return record

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Write ``logs`` into log_history, metrics.jsonl and the callbacks' ``on_log``, with HF
        ``Trainer.log``'s signature. ``start_time`` is taken for that signature only: the
        throughput Trainer would time from it is already in the training record."""
        record = dict(logs)
        record["epoch"] = round(self.state.epoch, 4)
        logs = dict(record)  # what callbacks get, as from Trainer: the step is state.global_step
        record["step"] = self.state.global_step
        self.state.log_history.append(record)
        if self._log_kind != "summary":
            self.training_log.write(record, training=self._log_kind == "step")
        self.callbacks("on_log", logs=logs)

    @property
    def metrics_file(self) -> str | None:
        """Path of the JSONL metrics file (set once training began)."""
        return None if self.training_log.writer is None else self.training_log.writer.path

    def evaluation_rollouts(
        self, dataset: Any, prompts_per_call: int, n: int, settings: SamplingSettings
    ) -> Iterator[tuple[Rollout, list[bool]]]:
        """This process's share of ``dataset``, ``prompts_per_call`` prompts at a time: each share's
        rollout and which of its prompts count (the last process's share is padded with repeats so
        every process samples as many times: sharded generation needs it). Sampled from a forked
        RNG (``untouched_rng``). An iterable dataset is read whole first (every process reads
        the same rows, then takes its share)."""
        if is_streamed(dataset):
            dataset = list(dataset)
        indices, counted = evaluation_share(len(dataset), self.accelerator)
        for start in range(0, len(indices), prompts_per_call):
            rows = [dataset[i] for i in indices[start : start + prompts_per_call]]
            with self.untouched_rng():
                rollout = self.sample(rows, n, settings)
            yield rollout, counted[start : start + prompts_per_call]

    def report_evaluation(self, metrics: dict[str, float]) -> dict[str, float]:
        """During training the metrics go into the log next to the training records; on_evaluate."""
        if self.training_log.writer is not None:
            self.log(metrics)
        self.callbacks("on_evaluate", metrics=metrics)
        return metrics

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- saving and checkpoints -----------------------------------------------------------------

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
        """``checkpoint.save_checkpoint`` of this trainer, then on_save; None when a trained weight
        is not finite (nothing written)."""
        path = ckpt.save_checkpoint(self)
        if path is not None:
            self.callbacks("on_save")
        return path

    def generators(self) -> dict[str, torch.Generator]:
        """The trainer's own ``torch.Generator``s by name; their states travel in the checkpoint."""
        return {"shuffle": self._shuffle}

    def counters_state(self) -> dict[str, Any]:
        """Counters that make a resumed run log and stop exactly as an uninterrupted one."""
        return {
            "micro_step": self._micro_step,
            **self.training_log.state_dict(),
            "guard": self.guard.state_dict(),
            "num_processes": self.accelerator.num_processes,
        }

    def load_counters_state(self, state: dict[str, Any]) -> None:
        self._micro_step = int(state["micro_step"])
        self.training_log.load_state_dict(state)
        self.guard.load_state_dict(state["guard"])

    def extras_state(self) -> dict[str, Any]:
        """The rollout under optimisation and its position (TRL does not save it: FIELD-NOTES 11), a
        synced reference's own weights, and the trainer's ``checkpoint_extras()``."""
        buffer = self.buffer
        finished = buffer is None or buffer.finished
        return {
            "rollouts_drawn": self.rollouts_drawn,
            "buffer_done": 0 if finished else buffer.done,
            "buffer": None if finished else buffer.state_dict(),
            "reference": None if self.reference is None else self.reference.checkpoint_state(),
            "trainer": self.checkpoint_extras(),
        }

    def load_extras_state(self, extras: dict[str, Any]) -> None:
        """Inverse of ``extras_state``; tensors arrive on the CPU."""
        self.rollouts_drawn = int(extras["rollouts_drawn"])
        self.buffer = None
        if extras["buffer"] is not None:
            self.buffer = self.BUFFER.from_state_dict(extras["buffer"], self.device)
            self.buffer.done = int(extras["buffer_done"])
        if self.reference is not None:
            self.reference.load_checkpoint_state(extras["reference"])
        self.restore_extras(extras["trainer"])

    def checkpoint_extras(self) -> dict[str, Any]:
        """Trainer-specific state (tensors, numbers, strings, lists, dicts only: loaded weights_only)."""
        return {}

    def restore_extras(self, extras: dict[str, Any]) -> None:
        """Inverse of ``checkpoint_extras``; tensors arrive on the CPU."""
