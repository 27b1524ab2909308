"""GRPOTrainer: a drop-in for TRL's, on fastppo's rollout engine and fused loss kernel.

``train()`` reads as its steps, one rollout per turn of its loop:
  1. rollout    - sample ``num_generations`` completions for each prompt of a generation batch
  2. score      - rewards; reference log-probs (beta > 0); old log-probs only when the rollout feeds
                  more than one optimizer step (``GRPOConfig.records_old_logprobs``): a scoring
                  forward, or the sampler's own with ``old_logprobs_from_sampler``
  3. advantages - group-relative (``scale_rewards``), one per completion
  4. optimise   - ``num_iterations`` passes over ``steps_per_generation`` minibatches: loss, backward
  5. step       - every ``gradient_accumulation_steps`` minibatches (a window may span rollouts)
  6. log / evaluate / save - TRL's metric names, averaged over every minibatch of the logging window

Metrics: ``kl`` is logged only when beta > 0 (with beta == 0 there is no reference model to measure
against, and logging 0 or NaN would mislead). ``ratio/mean`` is exactly 1 on the first update of a
rollout: the old policy *is* the current one then, and only the ratio's gradient acts. As TRL logs
them: clip_ratio/* for the clipped loss types, ``cispo_clip_ratio`` and ``vespo/phi_seq_mean`` for
theirs, ``entropy_coef`` (each optimizer step) and ``policy_loss`` (the loss before the entropy bonus)
when the bonus is on; fastppo adds ``entropy_mask/kept_ratio`` (``top_entropy_quantile``: the fraction
of tokens trained on) and ``off_policy_mask/kept_ratio`` (the fraction of sequences kept).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import TrainOutput, speed_metrics

from ..advantages import group_relative_advantages, nanstd, normalize_then_sum_advantages
from ..batch import PolicyBatch, pad_to_multiple, sequence_inputs
from ..checkpoint import resolve_resume
from ..data import check_prompt_dataset, check_streamed_training, is_streamed
from ..distributed import (
    gather_counted,
    gather_ragged,
    gather_rows,
    merge_metric_sums,
    rank_rows,
    sum_over_processes,
)
from ..grpo_config import GRPOConfig
from ..kernels.ppo_loss import Gather, PolicyLossSettings, PolicyLossStats, high_entropy_mask
from ..kernels.ppo_loss.settings import CLIPPED_LOSS_TYPES, ITEM_NORMALISED_LOSS_TYPES
from ..metrics import MetricsBuffer, print_completions
from ..modeling import build_policy, eos_token_ids
from ..moe import RouterAuxLoss
from ..reference import build_reference
from ..rewards import combine_rewards, load_rewards, score_completions, score_rewards
from ..rollout import GenerateSampler, Rollout, Sampler, sampler_old_logprobs
from ..samplers import build_sampler
from .base import RolloutBuffer, TrainerBase, seed_everything
from .entropy_control import EntropyControl


@dataclasses.dataclass
class Scores:
    """Step 2's output for one rollout of B completions."""

    rewards_per_func: torch.Tensor  # [B, F] NaN where a function returned None
    rewards: torch.Tensor  # [B] weighted sum over functions, NaN where no function scored
    minibatches: list[PolicyBatch]  # shuffled, per_device_train_batch_size rows, with old/ref log-probs


@dataclasses.dataclass
class Advantages:
    """Step 3's output."""

    values: torch.Tensor  # [B] one advantage per completion
    std: torch.Tensor  # [B] the reward spread it was scaled by (for frac_reward_zero_std)


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """How a rollout's minibatch losses are formed and scaled under accumulation (``_loss_scaling``)."""

    settings: PolicyLossSettings  # num_items_in_batch filled in for dapo / cispo / vespo
    scale: float  # each minibatch's loss is multiplied by this before backward
    bonus_per_coef: float  # the kernel's entropy_coef per unit of the applied coefficient

    def for_coef(self, coef: float) -> PolicyLossSettings:
        """The settings with the entropy bonus at ``coef`` (TRL's meaning, whatever the scale)."""
        return dataclasses.replace(self.settings, entropy_coef=coef * self.bonus_per_coef)


@dataclasses.dataclass
class MinibatchPasses(RolloutBuffer):
    """A GRPO rollout under optimisation: ``num_iterations`` passes over the same minibatches (drawn
    once per rollout, as TRL does, so old log-probs are taken on exactly what the first pass trains)."""

    minibatches: list[PolicyBatch]
    num_iterations: int
    done: int = 0

    def __len__(self) -> int:
        return len(self.minibatches) * self.num_iterations

    def micro_batch(self, index: int) -> PolicyBatch:
        return self.minibatches[index % len(self.minibatches)]

    def state_dict(self) -> dict[str, Any]:
        return {"minibatches": [mb.state_dict() for mb in self.minibatches], "passes": self.num_iterations}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> MinibatchPasses:
        return cls([PolicyBatch.from_state_dict(mb, device) for mb in state["minibatches"]], state["passes"])


class GRPOTrainer(TrainerBase):
    """Group Relative Policy Optimization (Shao et al. 2024) with TRL's signature and config.

    Custom generation plugs in as ``sampler``: any ``fastppo.rollout.Sampler`` (tokenised prompts
    in; completion ids, and the log-probs it sampled with when exact, out), in place of TRL's
    experimental ``rollout_func``, which is refused. ``train_dataset`` is required; it and
    ``eval_dataset`` may be ``datasets.Dataset``/``IterableDataset`` (or a torch ``IterableDataset``),
    ``eval_dataset`` also a dict of them (``fastppo.data``).
    """

    BUFFER = MinibatchPasses

    def __init__(
        self,
        model: str | nn.Module,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Any = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        sampler: Sampler | None = None,
    ):
        if rollout_func is not None:
            raise ValueError(
                "rollout_func is not supported by fastppo's GRPOTrainer: pass your generation as a "
                "fastppo.rollout.Sampler instead, GRPOTrainer(sampler=...) (token ids in, completion ids "
                "and optionally their exact log-probs out; see the Sampler protocol's docstring)"
            )
        for name, value in (("tools", tools), ("environment_factory", environment_factory)):
            if value is not None:
                raise ValueError(f"{name} is not supported by fastppo's GRPOTrainer (agent/tool rollouts)")
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = GRPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        if not isinstance(args, GRPOConfig):
            raise ValueError(f"args must be a fastppo GRPOConfig, got {type(args).__name__}")
        if reward_funcs is None:
            raise ValueError(
                "reward_funcs is required: a function, a reward model (path or module), or a list"
            )
        seed_everything(args)
        self.train_dataset = _check_dataset("train_dataset", train_dataset, args)
        self.eval_dataset = _check_dataset("eval_dataset", eval_dataset, args)
        init_kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            init_kwargs["quantization_config"] = quantization_config
        policy, tokenizer = build_policy(
            model,
            processing_class,
            args,
            init_kwargs=init_kwargs,
            trust_remote_code=args.trust_remote_code,
            peft_config=peft_config,
            disable_dropout=args.disable_dropout,
        )
        super().__init__(args, policy, tokenizer, callbacks, optimizers)
        prompts, processes = args.prompts_per_rollout, self.accelerator.num_processes
        if prompts % processes:  # checked now, not at the first rollout
            raise ValueError(
                f"a rollout has generation_batch_size / num_generations = {prompts} prompts, which must "
                f"split evenly across the {processes} processes (each prompt's group stays on one "
                "process): raise generation_batch_size or lower num_generations"
            )
        self.model.to(self.device)
        self.eos_token_ids = eos_token_ids(policy, tokenizer)
        self.router_aux = RouterAuxLoss.from_model(self.model, args.router_aux_loss_coef)  # MoE policies
        self.rewards = load_rewards(
            reward_funcs,
            weights=args.reward_weights,
            reward_processing_classes=reward_processing_classes,
            model_init_kwargs=args.model_init_kwargs,
            trust_remote_code=args.trust_remote_code,
            chat_template_kwargs=args.chat_template_kwargs,
            device=self.device,
        )
        self.reward_processing_classes = self.rewards.processing_classes  # TRL's attribute
        self.reference = build_reference(
            self.model, self.policy_forward, kl_coef=args.beta, sync=args.sync_ref_model
        )
        self.shard_models(*self.rewards.models())
        self.sampler = sampler or build_sampler(
            args, self.model, tokenizer.pad_token_id, self.eos_token_ids, self.sharding is not None
        )
        if args.old_logprobs_from_sampler and isinstance(self.sampler, GenerateSampler):
            raise ValueError(
                "old_logprobs_from_sampler=True, but generate returns no log-probs: set "
                "use_transformers_continuous_batching=True, or pass a sampler that returns them"
            )
        self.entropy_control = EntropyControl.from_config(args)
        # the top_entropy_quantile threshold over every process's tokens, as TRL's
        self._gather: Gather | None = (
            None if self.accelerator.num_processes == 1 else lambda v: gather_ragged(v, self.accelerator)
        )
        self._pending_extra: dict[str, list] = {}
        self._samples: list[dict[str, Any]] = []  # the last rollout's table rows (log_completions)
        self.callbacks("on_init_end")

    # --- the loop -----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run GRPO for ``max_steps`` optimizer steps (or ``num_train_epochs``); metrics go to
        ``self.metrics_file`` (JSONL) and the reward curve to ``self.reward_plot`` (PNG)."""
        args = self.args
        resume = resolve_resume(resume_from_checkpoint, args.output_dir)
        rows = 0 if is_streamed(self.train_dataset) else len(self.train_dataset)  # streamed: max_steps is set
        self.begin_training(args.optimizer_steps(rows), "GRPO", resume_from=resume)
        prompts = self.prompt_stream(args.prompts_per_rollout, args.data_order_seed, args.shuffle_dataset)
        while not self.finished:
            buffer = self.buffer  # the rollout a checkpoint fell inside, else None: a new one
            if buffer is None:
                rows = next(prompts)
                with self.metrics.timed("time/rollout"):
                    rollout = self._rollout(rows)  # 1. rollout
                with self.metrics.timed("time/score"):
                    scores = self._score(rollout)  # 2. score
                    advantages = self._advantages(scores)  # 3. advantages
                if args.log_completions:
                    self._samples = self._completion_rows(rollout, scores, advantages.values)
                buffer = MinibatchPasses(scores.minibatches, args.num_iterations)
            self._optimise(buffer)  # 4. optimise, 5. step, 6. log / evaluate / save
        return self.end_training()

    def _rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Step 1: ``num_generations`` completions per prompt with the current policy."""
        rollout = self.sample(rows, self.args.num_generations, self.args.sampling_settings())
        for name, value in completion_metrics(rollout.lengths, rollout.is_truncated).items():
            self.metrics.add(name, value)
        self.metrics.add("prompts/truncated", float(rollout.num_truncated_prompts))
        return rollout

    def _score(self, rollout: Rollout) -> Scores:
        """Step 2: rewards; reference and (when needed) old log-probs per minibatch, under no grad.

        The minibatches are drawn here once per rollout (as TRL does) and reused by every pass, so
        old log-probs are taken on exactly the batches the first pass trains on.
        """
        args = self.args
        batch = PolicyBatch.from_rollout(rollout, args.mask_truncated_completions)
        if args.records_old_logprobs and args.old_logprobs_from_sampler:
            batch.old_logprobs = sampler_old_logprobs(rollout, type(self.sampler).__name__)
        minibatches = batch.split(args.per_device_train_batch_size, self._shuffle, args.pad_to_multiple_of)
        self._pending_extra = {}  # log_extra columns: this rollout's only (a table row each)
        with self.accelerator.autocast():
            for mb in minibatches:
                self._score_minibatch(mb)
        scored = score_rewards(
            self.rewards,
            rollout.prompts,
            rollout.completions,
            rollout.completion_id_lists,
            rollout.columns,
            {"trainer_state": self.state, "log_metric": self.metrics.add, "log_extra": self._log_extra},
            skip_invalid=args.skip_invalid_rewards,
        )
        per_func, valid = scored.per_func.to(self.device), scored.valid.to(self.device)
        for mb in minibatches:  # invalid samples (skip_invalid_rewards) leave the loss entirely
            mb.loss_mask = mb.loss_mask * valid[mb.rows, None]
        return Scores(per_func, combine_rewards(per_func, self.rewards.weights), minibatches)

    def _score_minibatch(self, mb: PolicyBatch) -> None:
        """Old log-probs (when the rollout feeds several optimizer steps) and reference log-probs of
        one minibatch, no grad; a reference sharing the frozen trunk reads the policy's trunk pass,
        so one trunk pass serves both."""
        temperature, trunk = self.args.temperature, None
        if self.args.records_old_logprobs and mb.old_logprobs is None:  # else the sampler's (exact) ones
            with self.policy_forward.scoring(self.model):
                policy_pass = self.policy_forward.run(self.model, mb)
                mb.old_logprobs = self.policy_forward.logprobs(policy_pass, mb, temperature)
            trunk = policy_pass.trunk
        if self.reference is not None:
            mb.ref_logprobs = self.reference.logprobs(mb, temperature, trunk)

    def _advantages(self, scores: Scores) -> Advantages:
        """Step 3: group-relative advantages, attached to each minibatch; reward metrics.

        Over the whole generation batch: with several processes the rewards of every process are
        gathered first (batch-level scaling and the metrics need all of them; groups never straddle
        processes), and each process keeps the advantages of its own rows.
        """
        args = self.args
        per_func = gather_rows(scores.rewards_per_func, self.accelerator)  # [B_global, F]
        rewards = combine_rewards(per_func, self.rewards.weights)
        if args.multi_objective_aggregation == "normalize_then_sum":
            values, std = normalize_then_sum_advantages(
                per_func, self.rewards.weights.to(self.device), args.num_generations
            )
        else:
            values, std = group_relative_advantages(rewards, args.num_generations, args.scale_rewards)
        for name, value in reward_metrics(per_func, rewards, self.rewards.names).items():
            self.metrics.add(name, value)
        self.metrics.add(
            "frac_reward_zero_std", float(torch.isclose(std, torch.zeros_like(std)).float().mean())
        )
        mine = rank_rows(values.shape[0], self.accelerator, "completions per rollout")
        values, std = values[mine], std[mine]
        for mb in scores.minibatches:
            mb.advantages = values[mb.rows]
        return Advantages(values, std)

    def _optimise(self, buffer: MinibatchPasses) -> None:
        """Steps 4-6 over the rollout's passes, from where a checkpoint left them: each minibatch's
        loss and backward; an optimizer step at the end of each accumulation window, then the
        reference sync and log / evaluate / save. Stops early when training must stop."""
        scaling = self._loss_scaling(buffer.minibatches)
        if buffer.done == 0:  # a resumed rollout's tokens were counted before the checkpoint
            self.add_tokens(sum(mb.num_tokens for mb in buffer.minibatches))
        for mb in self.micro_batches(buffer):
            # the coefficient of the previous optimizer step, for every micro-batch of this window
            settings = scaling.for_coef(self.entropy_control.applied())
            with self.metrics.timed("time/minibatch"):
                with self.accelerator.autocast(), self.router_aux.recording(self.model) as router_logits:
                    loss, stats = self.policy_forward.policy_loss(self.model, mb, settings, self._gather)
                    scaled = loss * scaling.scale  # 4. optimise
                    if self.router_aux.enabled:
                        scaled = scaled + self._router_aux_term(router_logits, mb)
                self.backward(scaled)
            self._record_loss_stats(stats, mb, loss, settings)
            if self.window_complete:
                self.optimizer_step()  # 5. step
                self._end_entropy_window()
                self._sync_reference()
                if self.after_step():  # 6. log / evaluate / save
                    return

    def _router_aux_term(self, router_logits: list[torch.Tensor], mb: PolicyBatch) -> torch.Tensor:
        """What an MoE policy's load-balancing loss adds to a minibatch's scaled loss, as TRL:
        ``router_aux_loss_coef * aux_loss / gradient_accumulation_steps`` whatever the loss type;
        the unweighted loss is logged as TRL's ``aux_loss``."""
        mask = None if self.args.padding_free else sequence_inputs(mb)["attention_mask"]
        aux = self.router_aux.loss(router_logits, mask)
        self.metrics.add("aux_loss", float(aux.detach()))  # CPU sync
        return self.router_aux.coef * aux / self.args.gradient_accumulation_steps

    def _loss_scaling(self, minibatches: list[PolicyBatch]) -> LossScaling:
        """The loss settings and the factor each minibatch's loss is scaled by under accumulation
        (TRL's normalisers, so 8 x 1 updates exactly like 4 x 2 where the normaliser is global):
        grpo / bnpo / dr_grpo / sapo / luspo losses are divided by gradient_accumulation_steps; dapo /
        cispo / vespo divide the summed token losses by the token count of the whole accumulation
        window (estimated, as TRL does, from this rollout: tokens * gradient_accumulation_steps /
        steps_per_generation). TRL's entropy bonus is each micro-batch's mean entropy over
        gradient_accumulation_steps whatever the loss type; the kernel subtracts ``entropy_coef``
        times that mean from the loss before ``scale``, hence ``bonus_per_coef``."""
        args, settings = self.args, self.args.loss_settings()
        accumulation = args.gradient_accumulation_steps
        if settings.loss_type not in ITEM_NORMALISED_LOSS_TYPES:
            return LossScaling(settings, 1.0 / accumulation, 1.0)
        tokens = float(sum(mb.loss_mask.sum() for mb in minibatches))  # CPU sync
        # every process normalises by the mean window over processes, so the averaged gradient
        # is the whole batch's token sum over its token count (one process: its own)
        tokens = sum_over_processes(tokens, self.accelerator) / self.accelerator.num_processes
        window = tokens * accumulation / args.steps_per_generation
        return LossScaling(
            dataclasses.replace(settings, num_items_in_batch=max(window, 1.0)), 1.0, 1.0 / accumulation
        )

    def _end_entropy_window(self) -> None:
        """After an optimizer step: adaptive control measures the window's entropy over every process
        and moves the coefficient; ``entropy_coef`` is logged whenever the bonus is on (TRL)."""
        control = self.entropy_control
        if control.adaptive:
            control.end_window(
                sum_over_processes(control.window_entropy_sum, self.accelerator),
                sum_over_processes(control.window_tokens, self.accelerator),
            )
        if control.enabled:
            self.metrics.add("entropy_coef", control.coef)

    def _sync_reference(self) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` optimizer steps the reference moves towards the
        policy (before the step's checkpoint, which then holds the synced weights)."""
        args = self.args
        if (
            self.reference is not None
            and args.sync_ref_model
            and self.state.global_step % args.ref_model_sync_steps == 0
        ):
            self.reference.sync(self.model, args.ref_model_mixup_alpha)

    @staticmethod
    def get_high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """TRL's ``get_high_entropy_mask``: True for the unmasked tokens whose entropy is at or above
        the ``threshold`` quantile of the unmasked entropies (ties at the threshold kept; no unmasked
        token: all False), ``[B, T]`` bool. Over this call's tokens; training takes the quantile
        over every process's (the kernel's ``gather``)."""
        return high_entropy_mask(entropies, mask, threshold).bool()

    def checkpoint_extras(self) -> dict[str, Any]:
        """Adaptive entropy control's state (TRL saves it as entropy_ctrl_state.json)."""
        return (
            {"entropy_control": self.entropy_control.state_dict()} if self.args.use_adaptive_entropy else {}
        )

    def restore_extras(self, extras: dict[str, Any]) -> None:
        """As TRL: a checkpoint without the controller's state (from a run without it) leaves the
        configured start."""
        if self.args.use_adaptive_entropy and "entropy_control" in extras:
            self.entropy_control.load_state_dict(extras["entropy_control"])

    def log_training_step(self) -> None:
        super().log_training_step()
        if self.args.log_completions:
            print_completions(self._samples, self.state.global_step, self.args.num_completions_to_print)

    # --- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``eval_loss`` and the mean reward of completions sampled for ``eval_dataset`` (TRL's
        metric names, prefixed), with HF's ``eval_runtime`` / ``eval_samples_per_second`` /
        ``eval_steps_per_second``; fires ``on_evaluate`` with them.

        ``num_generations_eval`` sampled completions per prompt, or one greedy completion when
        ``eval_do_sample=False``. ``eval_loss`` is TRL's: the GRPO loss of each eval batch (one
        sampling call's completions, ``per_device_eval_batch_size`` of them) with advantages from
        its own groups, on-policy (ratio 1), no accumulation scaling, averaged over the completions.
        Values reward functions pass to ``log_metric`` are averaged into the result; ``log_extra``
        columns are dropped (they feed the training completions table). ``ignore_keys``: TRL's
        signature, unused. With several processes each samples its share of the prompts and the
        metrics are over all of them. A dict of datasets (or the trainer's, or a name of one of
        them) is evaluated one by one, each set's metrics prefixed ``eval_<name>_`` as HF Trainer
        does. An IterableDataset is read whole (it must be finite).
        """
        args = self.args
        if isinstance(eval_dataset, str):  # HF: the name of one of the trainer's eval datasets
            if not isinstance(self.eval_dataset, dict) or eval_dataset not in self.eval_dataset:
                named = list(self.eval_dataset) if isinstance(self.eval_dataset, dict) else []
                raise ValueError(f"evaluate({eval_dataset!r}): no eval dataset of that name (have {named})")
            dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            dataset = self.eval_dataset
        else:
            dataset = _check_dataset("eval_dataset", eval_dataset, args)
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (here or in the trainer)")
        if isinstance(dataset, dict):  # Trainer.evaluate: each set on its own, its name in the keys
            metrics: dict[str, float] = {}
            for name, named_set in dataset.items():
                metrics.update(self.evaluate(named_set, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        start_time = time.time()
        n = (args.num_generations_eval or args.num_generations) if args.eval_do_sample else 1
        per_call = max(1, args.per_device_eval_batch_size // n)  # prompts per generate call
        per_func, lengths, truncated, counted = [], [], [], []
        loss_sum = 0.0  # eval batches' losses, each weighted by its counted completions
        logged = MetricsBuffer()
        extra = {"trainer_state": self.state, "log_metric": logged.add, "log_extra": lambda *a, **k: None}
        sampling = args.sampling_settings(do_sample=args.eval_do_sample)
        for rollout, counts in self.evaluation_rollouts(dataset, per_call, n, sampling):
            scored = score_completions(
                self.rewards,
                rollout.prompts,
                rollout.completions,
                rollout.completion_id_lists,
                rollout.columns,
                extra,
            )
            per_func.append(scored)
            loss_sum += self._eval_batch_loss(rollout, scored, n, counts) * n * sum(counts)
            lengths.append(rollout.lengths)
            truncated.append(rollout.is_truncated)
            counted += counts
        counts = torch.tensor(counted, device=self.device).repeat_interleave(n)  # [completions]
        per_func_all, lengths_all, truncated_all = (
            gather_counted(torch.cat(parts).to(self.device), counts, self.accelerator).cpu()
            for parts in (per_func, lengths, truncated)
        )
        rewards = combine_rewards(per_func_all, self.rewards.weights)
        logged.load_state_dict(merge_metric_sums(logged.state_dict(), self.accelerator))
        found = {
            "loss": sum_over_processes(loss_sum, self.accelerator) / rewards.shape[0],
            **logged.flush(),
            **reward_metrics(per_func_all, rewards, self.rewards.names),
            **completion_metrics(lengths_all, truncated_all),
        }
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in found.items()}
        samples, batch = rewards.shape[0], args.per_device_eval_batch_size * self.accelerator.num_processes
        metrics.update(
            speed_metrics(
                metric_key_prefix, start_time, num_samples=samples, num_steps=math.ceil(samples / batch)
            )
        )
        return self.report_evaluation(metrics)

    def _eval_batch_loss(self, rollout: Rollout, per_func: torch.Tensor, n: int, counts: list[bool]) -> float:
        """TRL's eval loss of one eval batch (its ``prediction_step``): the GRPO loss of the batch's
        completions, advantages from its own groups of ``n``, reference log-probs when beta > 0,
        on-policy; no accumulation, so dapo / cispo / vespo divide by the batch's mean token count
        over processes and the entropy bonus is the plain mean (at the coefficient training applies).
        The prompts ``counts`` marks False (repeats padding the last process's share) are left out;
        a batch of repeats only still runs (every process takes part in the same collectives) and
        its caller weighs it 0."""
        args = self.args
        batch = PolicyBatch.from_rollout(rollout, args.mask_truncated_completions)
        keep = torch.tensor(counts, dtype=torch.bool).repeat_interleave(n)
        if keep.any() and not keep.all():
            batch, per_func = (
                batch.select(keep.nonzero().squeeze(1).to(batch.rows.device)),
                per_func[keep.to(per_func.device)],
            )
        batch = pad_to_multiple(batch, args.pad_to_multiple_of)
        rewards = combine_rewards(per_func.to(self.device), self.rewards.weights)
        batch.advantages, _ = group_relative_advantages(rewards, n, args.scale_rewards)
        settings = dataclasses.replace(args.loss_settings(), entropy_coef=self.entropy_control.applied())
        if settings.loss_type in ITEM_NORMALISED_LOSS_TYPES:
            tokens = sum_over_processes(float(batch.loss_mask.sum()), self.accelerator)  # CPU sync
            settings = dataclasses.replace(
                settings, num_items_in_batch=max(tokens / self.accelerator.num_processes, 1.0)
            )
        with self.accelerator.autocast(), self.policy_forward.scoring(self.model):
            if self.reference is not None:
                batch.ref_logprobs = self.reference.logprobs(batch, args.temperature, None)
            loss, _ = self.policy_forward.policy_loss(self.model, batch, settings, self._gather)
        return float(loss)  # CPU sync

    # --- helpers ------------------------------------------------------------------------------------

    def _log_extra(self, column: str, values: list) -> None:
        """TRL's ``log_extra``: values extend the column for the current rollout's completions table."""
        self._pending_extra.setdefault(column, []).extend(values)

    def _completion_rows(
        self, rollout: Rollout, scores: Scores, advantages: torch.Tensor
    ) -> list[dict[str, Any]]:
        """Rows of the log_completions table for the current rollout."""
        rollout_rows = []
        extra, self._pending_extra = self._pending_extra, {}
        for i in range(scores.rewards.shape[0]):
            row = {"prompt": rollout.prompts[i], "completion": rollout.completions[i]}
            row.update(
                {name: float(scores.rewards_per_func[i, j]) for j, name in enumerate(self.rewards.names)}
            )
            row.update({k: v[i] for k, v in extra.items() if i < len(v)})
            row["advantage"] = float(advantages[i])
            rollout_rows.append(row)
        return rollout_rows

    def _record_loss_stats(
        self, stats: PolicyLossStats, mb: PolicyBatch, loss: torch.Tensor, settings: PolicyLossSettings
    ) -> None:
        """Per-minibatch loss statistics, weighted by what they average over (tokens or sequences),
        and the entropy the adaptive controller measures (the mean over the tokens trained on, the
        high-entropy mask's kept ones when there is one)."""
        items = float(stats.num_items)
        tokens = float(mb.loss_mask.sum())
        sequences = float(mb.loss_mask.shape[0])
        self.metrics.add("ratio/mean", float(stats.ratio_mean), items)
        if settings.loss_type in CLIPPED_LOSS_TYPES:
            self.metrics.add("clip_ratio/low_mean", float(stats.clip_low), items)
            self.metrics.add("clip_ratio/high_mean", float(stats.clip_high), items)
            self.metrics.add("clip_ratio/region_mean", float(stats.clip_region), items)
        if stats.cispo_clip is not None:
            self.metrics.add("cispo_clip_ratio", float(stats.cispo_clip), items)
        if stats.vespo_phi_mean is not None:  # one weight per sequence
            self.metrics.add("vespo/phi_seq_mean", float(stats.vespo_phi_mean), sequences)
        if stats.entropy_kept is not None:
            self.metrics.add("entropy_mask/kept_ratio", float(stats.entropy_kept), tokens)
        if stats.off_policy_kept is not None:  # one flag per sequence
            self.metrics.add("off_policy_mask/kept_ratio", float(stats.off_policy_kept), sequences)
        entropy = float(stats.entropy_mean)
        self.metrics.add("entropy", entropy, tokens)
        if stats.kl_mean is not None and self.args.beta > 0:
            self.metrics.add("kl", float(stats.kl_mean), tokens)
        # The bonus's entropy: the mean over the tokens trained on (the high-entropy mask's kept ones)
        if self.entropy_control.enabled:
            acting = float(stats.acting_entropy_mean)
            acting_tokens = tokens * (1.0 if stats.entropy_kept is None else float(stats.entropy_kept))
            self.entropy_control.record(acting * acting_tokens, acting_tokens)
            policy_loss = float(loss.detach()) + settings.entropy_coef * acting  # CPU sync
            self.metrics.add("policy_loss", policy_loss)


def completion_metrics(lengths: torch.Tensor, is_truncated: torch.Tensor) -> dict[str, float]:
    """TRL's completions/* metrics from lengths ``[B]`` and truncation flags ``[B]``."""
    lengths = lengths.float()
    terminated = lengths[~is_truncated]
    metrics = {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(is_truncated.float().mean()),
    }
    if terminated.numel():
        metrics["completions/mean_terminated_length"] = float(terminated.mean())
    return metrics


def reward_metrics(per_func: torch.Tensor, rewards: torch.Tensor, names: list[str]) -> dict[str, float]:
    """reward, reward_std and rewards/<name>/mean|std (NaN entries, i.e. None rewards, left out)."""
    metrics = {}
    for j, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = float(torch.nanmean(per_func[:, j]))
        metrics[f"rewards/{name}/std"] = float(nanstd(per_func[:, j]))
    metrics["reward"] = float(torch.nanmean(rewards))
    metrics["reward_std"] = float(nanstd(rewards))
    return metrics


def _check_dataset(name: str, dataset: Any, args: GRPOConfig) -> Any:
    """A prompt dataset with a "prompt" column (text or chat messages), map-style or iterable (TRL
    takes both): for training required (TRL: unless an environment owns the data, which fastppo
    does not support), with one rollout's prompts at least and ``max_steps`` when streamed; for
    evaluation also a dict of named datasets."""
    training = name == "train_dataset"
    checked = check_prompt_dataset(
        name,
        dataset,
        ("prompt",),
        min_rows=args.prompts_per_rollout if training else 1,
        rollout_size="generation_batch_size / num_generations",
        required=training,
        streamed_ok=True,
        named_ok=not training,
    )
    if training:
        check_streamed_training(checked, args.max_steps, args.dataloader_num_workers)
    return checked
