"""GRPOTrainer: a drop-in for TRL's, on fastppo's rollout engine and fused loss kernel.

One training step, as ``train()`` reads it:
  1. rollout    - sample ``num_generations`` completions for each prompt of a generation batch
  2. score      - rewards; reference log-probs (beta > 0); old log-probs only when the rollout feeds
                  more than one optimizer step (``GRPOConfig.records_old_logprobs``)
  3. advantages - group-relative (``scale_rewards``), one per completion
  4. optimise   - ``num_iterations`` passes over ``steps_per_generation`` minibatches, the optimizer
                  stepping every ``gradient_accumulation_steps`` of them
  5. log        - TRL's metric names, averaged over every minibatch of the logging window

Metrics: ``kl`` is logged only when beta > 0 (with beta == 0 there is no reference model to measure
against, and logging 0 or NaN would mislead). ``ratio/mean`` is exactly 1 on the first update of a
rollout: the old policy *is* the current one then, and only the ratio's gradient acts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import TrainOutput

from ..advantages import group_relative_advantages, nanstd, normalize_then_sum_advantages
from ..checkpoint import resolve_resume
from ..distributed import (
    evaluation_share,
    gather_counted,
    gather_rows,
    merge_metric_sums,
    rank_rows,
    sum_over_processes,
)
from ..grpo_config import GRPOConfig
from ..kernels.ppo_loss import PolicyLossStats
from ..metrics import MetricsBuffer, print_completions
from ..modeling import build_policy, eos_token_ids
from ..reference import SharedTrunkPolicyReference, build_reference
from ..rewards import combine_rewards, load_rewards, score_completions, score_rewards
from ..rollout import GenerateSampler, Rollout, Sampler, SamplingSettings, sample_rollout
from ..scoring import PolicyBatch, policy_loss, score_logprobs
from ..sharding import load_local_state_dict, local_state_dict
from .base import TrainerBase, seed_everything


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


class GRPOTrainer(TrainerBase):
    """Group Relative Policy Optimization (Shao et al. 2024) with TRL's signature and config."""

    _buffer: list[PolicyBatch] | None  # the rollout being optimised: its minibatches

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
        for name, value in (
            ("tools", tools),
            ("rollout_func", rollout_func),
            ("environment_factory", environment_factory),
        ):
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
        self.train_dataset = _check_dataset("train_dataset", train_dataset, args, required=False)
        self.eval_dataset = _check_dataset("eval_dataset", eval_dataset, args, required=False)
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
        prompts, processes = self._prompts_per_rollout, self.accelerator.num_processes
        if prompts % processes:  # checked now, not at the first rollout
            raise ValueError(
                f"a rollout has generation_batch_size / num_generations = {prompts} prompts, which must "
                f"split evenly across the {processes} processes (each prompt's group stays on one "
                "process): raise generation_batch_size or lower num_generations"
            )
        self.model.to(self.device)
        self.eos_token_ids = eos_token_ids(policy, tokenizer)
        self.rewards = load_rewards(
            reward_funcs,
            weights=args.reward_weights,
            reward_processing_classes=reward_processing_classes,
            model_init_kwargs=args.model_init_kwargs,
            trust_remote_code=args.trust_remote_code,
            chat_template_kwargs=args.chat_template_kwargs,
            device=self.device,
        )
        self.reference = build_reference(
            self.model,
            beta=args.beta,
            sync=args.sync_ref_model,
            fused=args.use_fused_kernels,
            chunk_bytes=args.kernel_chunk_bytes,
            padding_free=args.padding_free,
            num_frozen_layers=args.num_frozen_layers,
        )
        self.shard_policy_and_reference(self.reference, *self.rewards.models())
        self.sampler = sampler or GenerateSampler(self.model, tokenizer.pad_token_id, self.eos_token_ids)
        self.loss_settings = args.loss_settings()
        self._shuffle = torch.Generator().manual_seed(args.seed)  # minibatch order, independent of sampling
        self._pending_extra: dict[str, list] = {}
        self._samples: list[dict[str, Any]] = []  # the last rollout's table rows (log_completions)
        self.callbacks("on_init_end")

    # --- the loop -----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run GRPO for ``max_steps`` optimizer steps (or ``num_train_epochs``); metrics go to
        ``self.metrics_file`` (JSONL) and the reward curve to ``self.reward_plot`` (PNG)."""
        if self.train_dataset is None:
            raise ValueError("train() needs a train_dataset with a 'prompt' column")
        args = self.args
        resume = resolve_resume(resume_from_checkpoint, args.output_dir)
        rollouts_per_epoch = len(self.train_dataset) // self._prompts_per_rollout
        self.begin_training(self._total_steps(rollouts_per_epoch), "GRPO", resume_from=resume)
        batches = self._prompt_batches()
        stop = self.continue_rollouts(batches)
        while not stop:
            rows = next(batches)  # endless: the step count ends training
            rows = rows[rank_rows(len(rows), self.accelerator, "prompts per rollout")]  # whole groups
            self.state.epoch = self._rollouts_drawn / rollouts_per_epoch
            self._rollouts_drawn += 1
            t0 = time.perf_counter()
            rollout = self._rollout(rows)  # 1
            t1 = time.perf_counter()
            scores = self._score(rollout)  # 2
            advantages = self._advantages(scores)  # 3
            self.metrics.add("time/rollout", t1 - t0)
            self.metrics.add("time/score", time.perf_counter() - t1)
            if args.log_completions:
                self._samples = self._completion_rows(rollout, scores, advantages.values)
            stop = self._optimise(scores.minibatches)  # 4 (+ 5, logging, at each optimizer step)
        return self.end_training()

    def _rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Step 1: ``num_generations`` completions per prompt with the current policy."""
        args = self.args
        with self.accelerator.autocast():
            rollout = sample_rollout(
                self.sampler,
                self.processing_class,
                rows,
                args.num_generations,
                self._sampling(),
                self.eos_token_ids,
                self.device,
                max_prompt_length=args.max_prompt_length,
                chat_template_kwargs=args.chat_template_kwargs,
                keep_columns=not args.remove_unused_columns,
            )
        for name, value in completion_metrics(rollout.lengths, rollout.is_truncated).items():
            self.metrics.add(name, value)
        self.metrics.add("prompts/truncated", float(rollout.num_truncated_prompts))
        return rollout

    def _score(self, rollout: Rollout) -> Scores:
        """Step 2: rewards; reference and (when needed) old log-probs per minibatch, under no grad.

        The minibatches are drawn here once per rollout (as TRL does) and reused by every pass, so
        old log-probs are taken on exactly the batches the first pass trains on. When both are needed
        and the reference shares the policy's frozen trunk, one trunk pass serves the two.
        """
        args = self.args
        minibatches = PolicyBatch.from_rollout(rollout, args.mask_truncated_completions).split(
            args.per_device_train_batch_size, self._shuffle
        )
        with self.accelerator.autocast():
            for mb in minibatches:
                if args.records_old_logprobs and isinstance(self.reference, SharedTrunkPolicyReference):
                    mb.old_logprobs, mb.ref_logprobs = self.reference.logprobs_with_policy(
                        self.model, mb, args.temperature
                    )
                    continue
                if args.records_old_logprobs:
                    mb.old_logprobs = score_logprobs(
                        self.model,
                        mb,
                        args.temperature,
                        fused=args.use_fused_kernels,
                        chunk_bytes=args.kernel_chunk_bytes,
                        padding_free=args.padding_free,
                    )
                if self.reference is not None:
                    mb.ref_logprobs = self.reference.logprobs(mb, args.temperature)
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

    def _optimise(self, minibatches: list[PolicyBatch], done: int = 0) -> bool:
        """Step 4: ``num_iterations`` passes over the minibatches; True when training must stop.

        Loss scaling under accumulation (TRL's normalisers, so 8 x 1 updates exactly like 4 x 2):
        grpo / bnpo / dr_grpo losses are divided by gradient_accumulation_steps; dapo divides the
        summed token losses by the token count of the whole accumulation window (estimated, as TRL
        does, from this rollout: tokens * gradient_accumulation_steps / steps_per_generation).
        """
        args = self.args
        settings = self.loss_settings
        if settings.loss_type == "dapo":
            tokens = float(sum(mb.loss_mask.sum() for mb in minibatches))  # CPU sync
            # every process normalises by the mean window over processes, so the averaged gradient
            # is the whole batch's token sum over its token count (one process: its own)
            tokens = sum_over_processes(tokens, self.accelerator) / self.accelerator.num_processes
            window = tokens * args.gradient_accumulation_steps / args.steps_per_generation
            settings = dataclasses.replace(settings, num_items_in_batch=max(window, 1.0))
            scale = 1.0
        else:
            scale = 1.0 / args.gradient_accumulation_steps
        if done == 0:  # a resumed rollout's tokens were counted before the checkpoint
            self.add_tokens(sum(mb.num_tokens for mb in minibatches))
        self._buffer = minibatches
        passes = [mb for _ in range(args.num_iterations) for mb in minibatches]
        for index in range(done, len(passes)):
            mb = passes[index]
            start = time.perf_counter()
            with self.accelerator.autocast():
                loss, stats = policy_loss(
                    self.model,
                    mb,
                    settings,
                    fused=args.use_fused_kernels,
                    chunk_bytes=args.kernel_chunk_bytes,
                    padding_free=args.padding_free,
                )
            self.backward(loss * scale)
            self.metrics.add("time/minibatch", time.perf_counter() - start)
            self._record_loss_stats(stats, mb)
            self._buffer_done = index + 1  # before end_micro_step: a checkpoint there saves this position
            if self.end_micro_step():
                return True
        self._buffer = None
        return False

    # --- checkpoint hooks (TrainerBase) --------------------------------------------------------------

    def generators(self) -> dict[str, torch.Generator]:
        return {"shuffle": self._shuffle}

    def checkpoint_extras(self) -> dict[str, Any]:
        """Rollouts drawn, and the rollout under optimisation when a checkpoint falls inside it (TRL
        does not save it: FIELD-NOTES 11); a synced reference's own weights."""
        finished = self._buffer is None or self._buffer_done == len(self._buffer) * self.args.num_iterations
        extras: dict[str, Any] = {
            "rollouts_drawn": self._rollouts_drawn,
            "buffer_done": 0 if finished else self._buffer_done,
            "buffer": None if finished else [_batch_dict(mb) for mb in self._buffer],
        }
        if self.reference is not None and self.args.sync_ref_model:
            extras["reference"] = local_state_dict(self.reference.own_weights())
        return extras

    def restore_extras(self, extras: dict[str, Any]) -> None:
        self._rollouts_drawn = int(extras["rollouts_drawn"])
        self._buffer_done = int(extras["buffer_done"])
        buffer = extras["buffer"]
        self._buffer = None if buffer is None else [_batch_from_dict(b, self.device) for b in buffer]
        if "reference" in extras:
            load_local_state_dict(self.reference.own_weights(), extras["reference"])

    def on_optimizer_step(self) -> None:
        args = self.args
        if (
            self.reference is not None
            and args.sync_ref_model
            and self.state.global_step % args.ref_model_sync_steps == 0
        ):
            self.reference.sync(self.model, args.ref_model_mixup_alpha)

    def log(self, logs: dict[str, float], training: bool = True) -> None:
        super().log(logs, training)
        if training and self.args.log_completions:
            print_completions(self._samples, self.state.global_step, self.args.num_completions_to_print)

    # --- evaluation and saving ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Mean reward of completions sampled for ``eval_dataset`` (TRL's metric names, prefixed).

        ``num_generations_eval`` sampled completions per prompt, or one greedy completion when
        ``eval_do_sample=False``. No loss is computed (there is no fixed target to score against).
        Values reward functions pass to ``log_metric`` are averaged into the result; ``log_extra``
        columns are dropped (they feed the training completions table). ``ignore_keys``: TRL's
        signature, unused. With several processes each samples its share of the prompts
        (``distributed.evaluation_share``) and the metrics are over all of them.
        """
        args = self.args
        dataset = (
            _check_dataset("eval_dataset", eval_dataset, args, required=True)
            if eval_dataset is not None
            else self.eval_dataset
        )
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (here or in the trainer)")
        n = (args.num_generations_eval or args.num_generations) if args.eval_do_sample else 1
        settings = self._sampling(do_sample=args.eval_do_sample)
        per_call = max(1, args.per_device_eval_batch_size // n)  # prompts per generate call
        per_func, lengths, truncated = [], [], []
        logged = MetricsBuffer()
        extra = {"trainer_state": self.state, "log_metric": logged.add, "log_extra": lambda *a, **k: None}
        # each process samples its share of the prompts; the metrics are of all of them
        indices, counted = evaluation_share(len(dataset), self.accelerator)
        for start in range(0, len(indices), per_call):
            rows = [dataset[i] for i in indices[start : start + per_call]]
            with self.accelerator.autocast(), self.untouched_rng():
                rollout = sample_rollout(
                    self.sampler,
                    self.processing_class,
                    rows,
                    n,
                    settings,
                    self.eos_token_ids,
                    self.device,
                    max_prompt_length=args.max_prompt_length,
                    chat_template_kwargs=args.chat_template_kwargs,
                    keep_columns=not args.remove_unused_columns,
                )
            per_func.append(
                score_completions(
                    self.rewards,
                    rollout.prompts,
                    rollout.completions,
                    rollout.completion_id_lists,
                    rollout.columns,
                    extra,
                )
            )
            lengths.append(rollout.lengths)
            truncated.append(rollout.is_truncated)
        counts = torch.tensor(counted, device=self.device).repeat_interleave(n)  # [completions]
        per_func_all, lengths_all, truncated_all = (
            gather_counted(torch.cat(parts).to(self.device), counts, self.accelerator).cpu()
            for parts in (per_func, lengths, truncated)
        )
        rewards = combine_rewards(per_func_all, self.rewards.weights)
        logged.load_state_dict(merge_metric_sums(logged.state_dict(), self.accelerator))
        found = {
            **logged.flush(),
            **reward_metrics(per_func_all, rewards, self.rewards.names),
            **completion_metrics(lengths_all, truncated_all),
        }
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in found.items()}
        if self.log_writer is not None:  # during training: into the log next to the training records
            self.log(metrics, training=False)
        self.callbacks("on_evaluate", metrics=metrics)
        return metrics

    # --- helpers ------------------------------------------------------------------------------------

    @property
    def _prompts_per_rollout(self) -> int:
        return self.args.generation_batch_size // self.args.num_generations

    def _total_steps(self, rollouts_per_epoch: int) -> int:
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        micro = args.num_train_epochs * rollouts_per_epoch * args.steps_per_generation * args.num_iterations
        return max(1, math.ceil(micro / args.gradient_accumulation_steps))

    def _prompt_batches(self) -> Iterator[list[dict[str, Any]]]:
        """Endless generation batches of prompts: reshuffled each epoch, incomplete batches dropped."""
        size, count = self._prompts_per_rollout, len(self.train_dataset)
        generator = torch.Generator().manual_seed(
            self.args.data_seed if self.args.data_seed is not None else self.args.seed
        )
        while True:
            order = (
                torch.randperm(count, generator=generator)
                if self.args.shuffle_dataset
                else torch.arange(count)
            )
            for start in range(0, count - size + 1, size):
                yield [self.train_dataset[int(i)] for i in order[start : start + size]]

    def _sampling(self, do_sample: bool = True) -> SamplingSettings:
        args = self.args
        return SamplingSettings(
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            do_sample=do_sample,
            cache_implementation=args.cache_implementation,
            extra=tuple((args.generation_kwargs or {}).items()),
        )

    def _log_extra(self, column: str, values: list) -> None:
        self._pending_extra[column] = list(values)

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

    def _record_loss_stats(self, stats: PolicyLossStats, mb: PolicyBatch) -> None:
        """Per-minibatch loss statistics, weighted by what they average over (tokens or sequences)."""
        items = float(stats.num_items)
        tokens = float(mb.loss_mask.sum())
        self.metrics.add("ratio/mean", float(stats.ratio_mean), items)
        self.metrics.add("clip_ratio/low_mean", float(stats.clip_low), items)
        self.metrics.add("clip_ratio/high_mean", float(stats.clip_high), items)
        self.metrics.add("clip_ratio/region_mean", float(stats.clip_region), items)
        if stats.entropy_mean is not None:
            self.metrics.add("entropy", float(stats.entropy_mean), tokens)
        if stats.kl_mean is not None and self.args.beta > 0:
            self.metrics.add("kl", float(stats.kl_mean), tokens)


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


def _batch_dict(mb: PolicyBatch) -> dict[str, torch.Tensor | None]:
    return {f.name: getattr(mb, f.name) for f in dataclasses.fields(mb)}


def _batch_from_dict(values: dict[str, Any], device: torch.device) -> PolicyBatch:
    return PolicyBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in values.items()})


def _check_dataset(name: str, dataset: Any, args: GRPOConfig, required: bool) -> Any:
    """A map-style dataset (``datasets.Dataset`` or a list of dicts) with a non-empty "prompt" column."""
    if dataset is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(dataset, dict):
        raise ValueError(f"{name} as a dict of datasets is not supported; pass one datasets.Dataset")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"{name} must be a datasets.Dataset or a list of dicts (an IterableDataset is not supported)"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    first = dataset[0]
    if not isinstance(first, dict) or "prompt" not in first:
        columns = list(first) if isinstance(first, dict) else type(first).__name__
        raise ValueError(f"{name} needs a 'prompt' column (text or chat messages); it has {columns}")
    if name == "train_dataset" and len(dataset) < args.generation_batch_size // args.num_generations:
        raise ValueError(
            f"{name} has {len(dataset)} prompts but one rollout needs "
            f"generation_batch_size / num_generations = {args.generation_batch_size // args.num_generations}"
        )
    return dataset
