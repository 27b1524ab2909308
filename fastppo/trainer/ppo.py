"""PPOTrainer: the actor-critic RLHF loop of legacy TRL (0.12-0.19), on fastppo's rollout engine and
fused loss kernel (the same ones GRPO uses).

One update, as ``train()`` reads it:
  1. rollout  - one completion per prompt of a ``batch_size`` batch, sampled by the current policy
  2. record   - with the weights that sampled (the old policy), under no grad: log-probs and values of
                the sampled tokens, reference log-probs, and each completion's score
  3. rewards  - per token ``-kl_coef * KL(old || ref)``, the score added at the last token (after the
                missing-EOS penalty), optionally whitened; GAE advantages (whitened) and returns
  4. optimise - ``num_ppo_epochs`` passes over shuffled mini-batches, one optimizer step each: the
                clipped surrogate against the recorded log-probs (fused kernel) plus ``vf_coef`` x the
                clipped value loss
  5. log      - legacy TRL's metric names, averaged over every minibatch of the logging window

Deliberate differences from legacy TRL: the score lands on the last token of the completion (legacy
put it one position later when that fitted, on a padding token); masked means leave padding out of
every statistic (legacy averaged entropy and ratios over padding too); a completion ends at EOS or
``stop_token_id``, whichever comes first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import TrainOutput

from ..advantages import (
    generalized_advantage_estimation,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    shaped_rewards,
)
from ..kernels import linear_ppo_loss, linear_token_logprobs
from ..kernels.ppo_loss import PolicyLossSettings, PolicyLossStats, policy_objective
from ..logging import print_completions
from ..modeling import eos_token_ids, load_causal_lm, load_tokenizer, prepare_policy
from ..ppo_config import PPOConfig
from ..reference import build_reference
from ..rewards import combine_rewards, load_rewards, score_completions
from ..rollout import GenerateSampler, Rollout, Sampler, SamplingSettings, prompt_batches, sample_rollout
from ..scoring import (
    PolicyBatch,
    completion_hidden_states,
    head_operands,
    lm_parts,
    plain_token_logprobs,
    sequence_inputs,
)
from ..value import Critic, PolicyValueHead, SeparateValueModel, clipped_value_loss
from .base import TrainerBase, seed_everything


@dataclasses.dataclass
class RolloutRecord:
    """Steps 2-3 for one rollout of B completions; ``batch`` carries old log-probs and advantages."""

    batch: PolicyBatch  # the whole rollout; old_logprobs, advantages: [B, Lc]
    values: torch.Tensor  # [B, Lc] fp32 critic values at sampling time, 0 outside the mask
    returns: torch.Tensor  # [B, Lc] GAE returns (advantages before whitening + values)
    scores: torch.Tensor  # [B] score of each completion (after the missing-EOS penalty)
    kl: torch.Tensor  # [B, Lc] per-token KL estimate to the reference, 0 outside the mask
    non_score_rewards: torch.Tensor  # [B, Lc] -kl_coef * kl


class PPOTrainer(TrainerBase):
    """Proximal Policy Optimization with a critic (Ouyang et al. 2022), legacy TRL's signature."""

    def __init__(
        self,
        args: PPOConfig,
        processing_class: Any,
        model: str | nn.Module,
        ref_model: nn.Module | None = None,
        reward_model: Any = None,
        train_dataset: Any = None,
        value_model: nn.Module | None = None,
        data_collator: Any = None,
        eval_dataset: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        callbacks: list | None = None,
        peft_config: Any = None,
        sampler: Sampler | None = None,
    ):
        if not isinstance(args, PPOConfig):
            raise ValueError(f"args must be a fastppo PPOConfig, got {type(args).__name__}")
        if reward_model is None:
            raise ValueError("reward_model is required: a sequence-classification model or a reward function")
        if data_collator is not None:
            raise ValueError("data_collator is not used: prompts are padded by the rollout engine; pass None")
        if ref_model is not None and peft_config is not None:
            raise ValueError(
                "pass either ref_model or peft_config: with PEFT the reference is the base model"
            )
        seed_everything(args)
        self.train_dataset = check_prompt_dataset("train_dataset", train_dataset, args.batch_size)
        self.eval_dataset = check_prompt_dataset("eval_dataset", eval_dataset, 1, required=False)
        policy = load_causal_lm(model, {}, False)
        tokenizer = load_tokenizer(policy, processing_class, False)
        policy = prepare_policy(
            policy,
            tokenizer,
            peft_config=peft_config,
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            disable_dropout=True,  # legacy TRL: dropout would make the recorded log-probs stale
        )
        super().__init__(args, policy, tokenizer, callbacks, optimizers)
        self.model.to(self.device)
        self.critic: Critic = self._build_critic(value_model)
        stop_id = args.stop_id(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(
            {*eos_token_ids(policy, tokenizer), *([] if stop_id is None else [stop_id])}
        )
        self.rewards = load_rewards(
            reward_model,
            weights=None,
            reward_processing_classes=tokenizer,
            device=self.device,
        )
        self.reference = self._build_reference(ref_model)
        self.sampler = sampler or GenerateSampler(self.model, tokenizer.pad_token_id, self.eos_token_ids)
        self.loss_settings = PolicyLossSettings(
            clip_low=args.cliprange, beta=0.0, loss_type="bnpo", temperature=args.temperature
        )
        self._shuffle = torch.Generator().manual_seed(args.seed)  # minibatch order, apart from sampling
        self._episode = 0
        self._ratio_means: list[float] = []  # per minibatch, for val/ratio_var
        self.callbacks("on_init_end")

    def _build_critic(self, value_model: nn.Module | None) -> Critic:
        if value_model is None:
            return PolicyValueHead(self.model)
        for module in value_model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return SeparateValueModel(value_model.to(self.device))

    def _build_reference(self, ref_model: nn.Module | None) -> Any:
        args = self.args
        if ref_model is None:
            source = self.model
        else:
            check_same_vocab(self.model, ref_model)
            source = ref_model.to(self.device)
        return build_reference(
            source,
            beta=args.kl_coef,
            sync=False,
            fused=args.use_fused_kernels,
            chunk_bytes=args.kernel_chunk_bytes,
        )

    def trained_modules(self) -> list[nn.Module]:
        return [self.model, *self.critic.trained_modules()]

    # --- the loop -----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run PPO for ``max_steps`` optimizer steps, or over ``total_episodes`` completions."""
        if resume_from_checkpoint:
            raise ValueError("resume_from_checkpoint is not supported yet")
        args = self.args
        updates = args.num_updates(len(self.train_dataset))
        steps = (
            args.max_steps if args.max_steps > 0 else updates * args.num_ppo_epochs * args.num_mini_batches
        )
        self.begin_training(steps, "PPO")
        sample_every = max(1, updates // args.num_sample_generations) if args.num_sample_generations else 0
        batches = prompt_batches(self.train_dataset, args.batch_size, args.data_seed or args.seed)
        for update, rows in enumerate(batches):
            self.state.epoch = update * args.batch_size / len(self.train_dataset)
            t0 = time.perf_counter()
            rollout = self._rollout(rows)  # 1
            t1 = time.perf_counter()
            record = self._record(rollout)  # 2
            self._rewards_and_advantages(record)  # 3
            self.metrics.add("time/rollout", t1 - t0)
            self.metrics.add("time/score", time.perf_counter() - t1)
            self._episode = (update + 1) * args.batch_size  # completions sampled so far (legacy "episode")
            self._log_rollout(rollout, record)
            if sample_every and self.eval_dataset is not None and update % sample_every == 0:
                self.print_samples()
            if self._optimise(record):  # 4 (+ 5 at each optimizer step)
                break
        return self.end_training()

    def _rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Step 1: one completion per prompt with the current policy."""
        args = self.args
        with self.accelerator.autocast():
            return sample_rollout(
                self.sampler,
                self.processing_class,
                rows,
                1,
                self._sampling(),
                self.eos_token_ids,
                self.device,
                keep_columns=not args.remove_unused_columns,
            )

    @torch.no_grad()
    def _record(self, rollout: Rollout) -> RolloutRecord:
        """Step 2: what the old policy and critic said about the samples, in forward chunks of
        ``local_rollout_forward_batch_size`` rows, and the scores."""
        args = self.args
        batch = PolicyBatch.from_rollout(rollout, mask_truncated=False)
        size = batch.completion_ids.shape
        old_logprobs = torch.zeros(size, device=self.device)
        values = torch.zeros(size, device=self.device)
        ref_logprobs = torch.zeros(size, device=self.device) if self.reference is not None else None
        with self._evaluating(), self.accelerator.autocast():
            for chunk in batch.split(args.local_rollout_forward_batch_size):
                width = chunk.completion_ids.shape[1]
                logp, value = self._logprobs_and_values(chunk)
                old_logprobs[chunk.rows, :width] = logp
                values[chunk.rows, :width] = value
                if ref_logprobs is not None:
                    ref_logprobs[chunk.rows, :width] = self.reference.logprobs(chunk, args.temperature)
        mask = batch.loss_mask.float()
        batch.old_logprobs = old_logprobs * mask
        scores = self._scores(rollout)
        kl = (
            torch.zeros_like(mask)
            if ref_logprobs is None
            else kl_per_token(batch.old_logprobs, ref_logprobs * mask, args.kl_estimator) * mask
        )
        return RolloutRecord(batch, values * mask, torch.zeros_like(mask), scores, kl, -args.kl_coef * kl)

    def _scores(self, rollout: Rollout) -> torch.Tensor:
        """``[B]`` the reward model's (or functions') score of each completion, with the penalty."""
        per_func = score_completions(
            self.rewards,
            rollout.prompts,
            rollout.completions,
            rollout.completion_id_lists,
            rollout.columns,
            {"trainer_state": self.state, "log_metric": self.metrics.add, "log_extra": lambda *a, **k: None},
        )
        scores = combine_rewards(per_func, self.rewards.weights).to(self.device)
        unscored = torch.isnan(scores)
        if bool(unscored.any()):
            raise ValueError(
                f"the reward returned None for completion {int(unscored.nonzero()[0])}: PPO needs a score "
                "for every completion"
            )
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * rollout.is_truncated.float()
        return scores

    def _rewards_and_advantages(self, record: RolloutRecord) -> None:
        """Step 3: KL-shaped per-token rewards, GAE, whitened advantages (into ``record.batch``)."""
        args = self.args
        batch = record.batch
        mask = batch.loss_mask.float()
        last = (batch.completion_mask.sum(1) - 1).clamp(min=0)  # [B] the completion's last token
        rewards, _ = shaped_rewards(record.kl, record.scores, last, args.kl_coef)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, record.returns = generalized_advantage_estimation(
            rewards, record.values, args.gamma, args.lam
        )
        batch.advantages = masked_whiten(advantages, mask) * mask

    def _optimise(self, record: RolloutRecord) -> bool:
        """Step 4: ``num_ppo_epochs`` shuffled passes; the base steps the optimizer every
        ``gradient_accumulation_steps`` micro-batches, i.e. once per mini-batch. True: stop."""
        args = self.args
        scale = 1.0 / args.gradient_accumulation_steps  # each micro-batch loss is a masked mean
        self.add_tokens(record.batch.num_tokens * args.num_ppo_epochs)
        for _ in range(args.num_ppo_epochs):
            for mb in record.batch.split(args.per_device_train_batch_size, self._shuffle):
                start = time.perf_counter()
                width = mb.completion_ids.shape[1]
                with self.accelerator.autocast():
                    pg_loss, stats, values = self._loss_and_values(mb)
                    value_loss = clipped_value_loss(
                        values,
                        record.values[mb.rows, :width],
                        record.returns[mb.rows, :width],
                        mb.loss_mask,
                        args.cliprange_value,
                    )
                self.backward((pg_loss + args.vf_coef * value_loss.loss) * scale)
                self.metrics.add("time/minibatch", time.perf_counter() - start)
                self._record_minibatch(mb, stats, pg_loss, value_loss)
                if self.end_micro_step():
                    return True
        return False

    # --- forwards -----------------------------------------------------------------------------------

    def _logprobs_and_values(self, chunk: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, Lc]`` log-probs of the sampled tokens and values, from one policy pass when the
        critic reads the policy's hidden states."""
        args = self.args
        mask = chunk.completion_mask.bool()
        if args.use_fused_kernels:
            hidden = completion_hidden_states(self.model, chunk)
            logp = hidden_token_logprobs(self.model, hidden, chunk, args.temperature, args.kernel_chunk_bytes)
        else:
            logits, hidden = completion_logits_and_hidden(self.model, chunk, self.critic.uses_policy_hidden)
            logp = plain_token_logprobs(logits, chunk.completion_ids, args.temperature)[0].masked_fill(
                ~mask, 0.0
            )
        return logp, self.critic.values(chunk, hidden if self.critic.uses_policy_hidden else None)

    def _loss_and_values(self, mb: PolicyBatch) -> tuple[torch.Tensor, PolicyLossStats, torch.Tensor]:
        """The clipped surrogate of a micro-batch (ratio against the recorded log-probs), its stats,
        and the critic's values, with grad."""
        args = self.args
        settings = self.loss_settings
        if args.use_fused_kernels:
            hidden = completion_hidden_states(self.model, mb)
            loss, stats = hidden_policy_loss(self.model, hidden, mb, settings, args.kernel_chunk_bytes)
        else:
            logits, hidden = completion_logits_and_hidden(self.model, mb, self.critic.uses_policy_hidden)
            logp, entropy = plain_token_logprobs(
                logits, mb.completion_ids, settings.temperature, with_entropy=True
            )
            loss, stats = policy_objective(
                logp, mb.old_logprobs, mb.advantages, mb.loss_mask, settings, None, entropy
            )
        return loss, stats, self.critic.values(mb, hidden if self.critic.uses_policy_hidden else None)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout, no checkpointing) for the policy and critic while recording."""
        modules = self.trained_modules()
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)

    # --- metrics ------------------------------------------------------------------------------------

    def _log_rollout(self, rollout: Rollout, record: RolloutRecord) -> None:
        """Legacy TRL's objective/* metrics (per-sequence sums averaged over the rollout), val/*."""
        batch = record.batch
        mask = batch.loss_mask.float()
        non_score = record.non_score_rewards.sum(1).mean()
        self.metrics.add("objective/kl", float(record.kl.sum(1).mean()))
        self.metrics.add("objective/entropy", float((-batch.old_logprobs * mask).sum(1).mean()))
        self.metrics.add("objective/non_score_reward", float(non_score))
        self.metrics.add("objective/rlhf_reward", float(non_score + record.scores.mean()))
        self.metrics.add("objective/scores", float(record.scores.mean()))
        self.metrics.add("val/explained_variance", explained_variance(record.values, record.returns, mask))
        is_eos = torch.isin(batch.completion_ids, torch.tensor(self.eos_token_ids, device=self.device))
        self.metrics.add("val/num_eos_tokens", float((is_eos & batch.completion_mask.bool()).sum()))
        self.metrics.add("completions/mean_length", float(rollout.lengths.float().mean()))
        self.metrics.add("completions/clipped_ratio", float(rollout.is_truncated.float().mean()))
        self.metrics.add("episode", float(self._episode))

    def _record_minibatch(
        self, mb: PolicyBatch, stats: PolicyLossStats, pg_loss: torch.Tensor, value_loss
    ) -> None:
        tokens = float(mb.loss_mask.sum())
        log_ratio = (stats.logprobs - mb.old_logprobs) * mb.loss_mask
        ratio_mean = float(stats.ratio_mean)
        self._ratio_means.append(ratio_mean)
        self.metrics.add(
            "policy/approxkl_avg", float(0.5 * masked_mean(log_ratio.square(), mb.loss_mask)), tokens
        )
        self.metrics.add("policy/clipfrac_avg", float(stats.clip_region), tokens)
        self.metrics.add("policy/entropy_avg", float(stats.entropy_mean), tokens)
        self.metrics.add("loss/policy_avg", float(pg_loss.detach()), tokens)
        self.metrics.add("loss/value_avg", float(value_loss.loss.detach()), tokens)
        self.metrics.add("val/clipfrac_avg", float(value_loss.clipfrac), tokens)
        self.metrics.add("val/ratio", ratio_mean, tokens)

    def log(self, logs: dict[str, float], training: bool = True) -> None:
        """Adds legacy TRL's ``lr`` and ``val/ratio_var`` (variance of the minibatch mean ratios)."""
        if training:
            logs = {**logs, "lr": float(self.lr_scheduler.get_last_lr()[0])}
            if len(self._ratio_means) > 1:
                logs["val/ratio_var"] = float(torch.tensor(self._ratio_means).var())
            self._ratio_means = []
        super().log(logs, training)

    # --- evaluation, samples, saving ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, *args: Any, metric_key_prefix: str = "eval", **kwargs: Any) -> dict[str, float]:
        """Mean score of one greedy completion per ``eval_dataset`` prompt."""
        if self.eval_dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        rows = self._evaluation_rows()
        metrics = {f"{metric_key_prefix}_objective/scores": sum(r["score"] for r in rows) / len(rows)}
        if self.log_writer is not None:
            self.log(metrics, training=False)
        self.callbacks("on_evaluate", metrics=metrics)
        return metrics

    def print_samples(self) -> None:
        """A table of greedy completions for the eval prompts (legacy TRL's generate_completions)."""
        print_completions(self._evaluation_rows(), self.state.global_step)

    def _evaluation_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        size = self.args.local_rollout_forward_batch_size
        for start in range(0, len(self.eval_dataset), size):
            batch = [self.eval_dataset[i] for i in range(start, min(start + size, len(self.eval_dataset)))]
            with self.accelerator.autocast():
                rollout = sample_rollout(
                    self.sampler,
                    self.processing_class,
                    batch,
                    1,
                    self._sampling(do_sample=False),
                    self.eos_token_ids,
                    self.device,
                    keep_columns=not self.args.remove_unused_columns,
                )
            scores = self._scores(rollout)
            rows += [
                {"prompt": p, "completion": c, "score": float(s)}
                for p, c, s in zip(rollout.prompts, rollout.completions, scores, strict=True)
            ]
        return rows

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy and tokenizer (``save_pretrained``), and the critic next to them (field note 9)."""
        output_dir = output_dir or self.args.output_dir
        super().save_model(output_dir, _internal_call)
        self.critic.save(output_dir)

    def _sampling(self, do_sample: bool = True) -> SamplingSettings:
        args = self.args
        return SamplingSettings(
            max_new_tokens=args.response_length,
            temperature=args.temperature,
            top_k=0,
            do_sample=do_sample,
            extra=tuple((args.generation_kwargs or {}).items()),
        )


# --- helpers shared by the forwards (scoring.py's fused and plain branches, from hidden states) ------


def hidden_token_logprobs(
    model: nn.Module, hidden: torch.Tensor, batch: PolicyBatch, temperature: float, chunk_bytes: int
) -> torch.Tensor:
    """``[b, Lc]`` fp32 log-probs of the completion tokens from completion hidden states ``[b, Lc, H]``
    through the chunked fused kernel; 0 where ``completion_mask`` is 0."""
    _, head = lm_parts(model)
    hidden, weight, bias = head_operands(head, hidden)
    labels = torch.where(batch.completion_mask.bool(), batch.completion_ids, -100)
    with torch.autocast(hidden.device.type, enabled=False):
        return linear_token_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, chunk_bytes=chunk_bytes
        )


def hidden_policy_loss(
    model: nn.Module, hidden: torch.Tensor, batch: PolicyBatch, settings: PolicyLossSettings, chunk_bytes: int
) -> tuple[torch.Tensor, PolicyLossStats]:
    """The clipped-ratio loss from completion hidden states through the chunked fused kernel."""
    _, head = lm_parts(model)
    hidden, weight, bias = head_operands(head, hidden)
    keep = batch.loss_mask.bool()
    old = None if batch.old_logprobs is None else batch.old_logprobs.masked_fill(~keep, 0.0)
    with torch.autocast(hidden.device.type, enabled=False):
        return linear_ppo_loss(
            hidden,
            weight,
            batch.completion_ids,
            old,
            batch.advantages,
            batch.loss_mask,
            bias=bias,
            compute_entropy=True,
            chunk_bytes=chunk_bytes,
            **dataclasses.asdict(settings),
        )


def completion_logits_and_hidden(
    model: nn.Module, batch: PolicyBatch, with_hidden: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain path: ``[b, Lc, V]`` logits predicting the completion tokens and, when asked, the final
    hidden states ``[b, Lc, H]`` at the same positions."""
    length = batch.completion_ids.shape[1]
    out = model(
        **sequence_inputs(batch), use_cache=False, output_hidden_states=with_hidden, logits_to_keep=length + 1
    )
    hidden = out.hidden_states[-1][:, -(length + 1) : -1] if with_hidden else None
    return out.logits[:, :-1], hidden


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens: 1 is a perfect critic,
    0 one no better than a constant, negative a harmful one (NaN when the returns do not vary)."""
    if float(mask.sum()) < 2:
        return math.nan
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else math.nan


def check_same_vocab(policy: nn.Module, other: nn.Module, name: str = "ref_model") -> None:
    """The reference must score the policy's token ids: same output vocabulary size."""
    mine = policy.get_output_embeddings().weight.shape[0]
    theirs = other.get_output_embeddings().weight.shape[0]
    if mine != theirs:
        raise ValueError(
            f"{name} has a vocabulary of {theirs} tokens but the policy has {mine}; they must match"
        )


def check_prompt_dataset(name: str, dataset: Any, min_rows: int, required: bool = True) -> Any:
    """A map-style dataset whose rows hold "input_ids" (legacy TRL PPO) or "prompt" text/messages."""
    if dataset is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or isinstance(dataset, dict):
        raise ValueError(f"{name} must be a datasets.Dataset or a list of dicts")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    first = dataset[0]
    if not isinstance(first, dict) or not ({"input_ids", "prompt"} & set(first)):
        columns = list(first) if isinstance(first, dict) else type(first).__name__
        raise ValueError(
            f"{name} needs an 'input_ids' (tokenised prompts) or a 'prompt' column; it has {columns}"
        )
    if len(dataset) < min_rows:
        raise ValueError(
            f"{name} has {len(dataset)} rows but one rollout needs batch_size = "
            f"per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches = {min_rows}"
        )
    return dataset
