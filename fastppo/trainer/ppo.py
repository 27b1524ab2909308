"""PPOTrainer: the actor-critic RLHF loop of legacy TRL (0.12-0.19), on fastppo's rollout engine and
fused loss kernel (the same ones GRPO uses).

``train()`` reads as its steps, one rollout per turn of its loop:
  1. rollout    - one completion per prompt of a ``batch_size`` batch, sampled by the current policy
  2. score      - with the weights that sampled (the old policy), under no grad: log-probs and values
                  of the sampled tokens, reference log-probs, and each completion's score
  3. advantages - per-token rewards ``-kl_coef * KL(old || ref)``, the score added at the last token
                  (after the missing-EOS penalty), optionally whitened; GAE advantages (whitened)
  4. optimise   - ``num_ppo_epochs`` passes over shuffled mini-batches of micro-batches: the clipped
                  surrogate against the recorded log-probs (fused kernel) plus ``vf_coef`` x the
                  clipped value loss, backward
  5. step       - one optimizer step per mini-batch
  6. log / evaluate / save - legacy TRL's metric names, averaged over the logging window

Batch sizes follow TRL 0.19: a rollout is ``per_device_train_batch_size x gradient_accumulation_steps``
rows per process, split into ``num_mini_batches`` mini-batches, one optimizer step each, walked in
micro-batches of ``per_device_train_batch_size`` rows (``PPOConfig.micro_batches_per_step``).
Deliberate differences from legacy TRL: each mini-batch is one optimizer step, as its loops read
(under accelerate's accumulation its optimizer stepped every ``gradient_accumulation_steps``
micro-batches instead, across mini-batch and rollout boundaries); ``max_steps``,
``logging_steps``, ``save_steps`` and the LR schedule count optimizer steps (as transformers'
Trainer), not rollouts; the score lands on the last token of the completion (legacy put
it one position later when that fitted, on a padding token); masked means leave padding out of every
statistic; a completion ends at EOS or ``stop_token_id``, whichever comes first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers.trainer_utils import TrainOutput

from ..advantages import (
    generalized_advantage_estimation,
    masked_mean,
    masked_var,
    masked_whiten,
    shaped_rewards,
)
from ..batch import PolicyBatch
from ..checkpoint import resolve_resume
from ..critic import (
    Critic,
    SeparateValueModel,
    ValueLoss,
    add_critic_to_optimizer,
    build_critic,
    clipped_value_loss,
)
from ..data import check_prompt_dataset
from ..distributed import mean_over_processes
from ..kernels.ppo_loss import PolicyLossStats, kl_estimate
from ..metrics import print_completions
from ..modeling import build_policy, check_model_source, eos_token_ids, switch_off_dropout
from ..policy_forward import eval_mode
from ..ppo_config import PPOConfig
from ..reference import build_reference
from ..reward_model import score_with_reward_model
from ..rewards import check_vocab, combine_rewards, load_rewards, score_rewards
from ..rollout import GenerateSampler, Rollout, Sampler, concat_rollouts
from ..sharding import load_local_state_dict, local_state_dict
from .base import RolloutBuffer, TrainerBase, seed_everything


@dataclasses.dataclass
class RolloutRecord:
    """Steps 2-3 for one rollout of B completions; ``batch`` carries old log-probs and advantages."""

    batch: PolicyBatch  # the whole rollout; old_logprobs, advantages: [B, Lc]
    values: torch.Tensor  # [B, Lc] fp32 critic values at sampling time, 0 outside the mask
    returns: torch.Tensor  # [B, Lc] GAE returns (advantages before whitening + values)
    scores: torch.Tensor  # [B] score of each completion (after the missing-EOS penalty)
    kl: torch.Tensor  # [B, Lc] per-token KL estimate to the reference, 0 outside the mask


@dataclasses.dataclass
class EpochPasses(RolloutBuffer):
    """A PPO rollout under optimisation: its record and the rows of every micro-batch of every epoch,
    in order (drawn when the rollout was made, so a resumed run replays the same order)."""

    record: RolloutRecord
    passes: list[torch.Tensor]  # [micro-batches] row indices into record.batch
    done: int = 0

    def __len__(self) -> int:
        return len(self.passes)

    def micro_batch(self, index: int) -> PolicyBatch:
        return self.record.batch.select(self.passes[index].to(self.record.batch.rows.device))

    def state_dict(self) -> dict[str, Any]:
        record = self.record
        return {
            "batch": record.batch.state_dict(),
            **{name: getattr(record, name) for name in ("values", "returns", "scores", "kl")},
            "passes": list(self.passes),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> EpochPasses:
        batch = PolicyBatch.from_state_dict(state["batch"], device)
        record = RolloutRecord(batch, *(state[n].to(device) for n in ("values", "returns", "scores", "kl")))
        return cls(record, list(state["passes"]))


class PPOTrainer(TrainerBase):
    """Proximal Policy Optimization with a critic (Ouyang et al. 2022), legacy TRL's signature."""

    REWARD_METRIC, KL_METRIC = "objective/scores", "objective/kl"
    BUFFER = EpochPasses

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
        if ref_model is not None and (peft_config is not None or args.num_frozen_layers is not None):
            raise ValueError(
                "ref_model cannot be combined with peft_config or num_frozen_layers: those build the "
                "reference from the policy (adapters disabled / shared trunk)"
            )
        if args.eval_strategy != "no" and eval_dataset is None:
            raise ValueError(f"eval_strategy={args.eval_strategy.value!r} needs an eval_dataset")
        seed_everything(args)
        self.train_dataset = _check_dataset("train_dataset", train_dataset, args.batch_size, required=True)
        self.eval_dataset = _check_dataset("eval_dataset", eval_dataset, 1)
        policy, tokenizer = build_policy(
            model,
            processing_class,
            args,
            init_kwargs={},
            trust_remote_code=False,
            peft_config=peft_config,
            disable_dropout=True,  # legacy TRL: dropout would make the recorded log-probs stale
        )
        super().__init__(args, policy, tokenizer, callbacks, optimizers)
        self.model.to(self.device)
        if value_model is not None:
            switch_off_dropout(value_model)
            value_model = value_model.to(self.device)
        self.critic: Critic = build_critic(self.model, value_model, args.critic, args.num_frozen_layers)
        add_critic_to_optimizer(optimizers[0], self.critic)
        self.eos_only = eos_token_ids(policy, tokenizer)  # what missing_eos_penalty looks for
        stop_id = args.stop_id(tokenizer.eos_token_id)
        self.eos_token_ids = sorted({*self.eos_only, *([] if stop_id is None else [stop_id])})  # end tokens
        self.reward_model, self.rewards = self._build_rewards(reward_model, tokenizer)
        if ref_model is not None:
            check_same_vocab(self.model, ref_model)
            switch_off_dropout(ref_model)
            ref_model = ref_model.to(self.device)
        self.reference = build_reference(
            self.model, self.policy_forward, kl_coef=args.kl_coef, ref_model=ref_model
        )
        critic_model = [self.critic.model] if isinstance(self.critic, SeparateValueModel) else []
        reward_models = [self.reward_model] if self.reward_model is not None else self.rewards.models()
        if self.sharding is not None:
            for scorer in [*critic_model, *reward_models]:
                if scorer.config.pad_token_id is None:
                    # A sharded model runs its own forward (fastppo.sharding), whose pooled output
                    # needs a pad id to find each row's last token. That output is discarded (scores
                    # are read from the hidden states) and every model here reads the policy's ids.
                    scorer.config.pad_token_id = tokenizer.pad_token_id
        self.shard_models(*critic_model, *reward_models)
        self.sampler = sampler or GenerateSampler(self.model, tokenizer.pad_token_id, self.eos_token_ids)
        self._ratio_means: list[float] = []  # per micro-batch, for val/ratio_var
        self._rollout_metrics: dict[str, float] = {}  # the last rollout's objective/*, in every log
        self.callbacks("on_init_end")

    def _build_rewards(self, reward_model: Any, tokenizer: Any) -> tuple[nn.Module | None, Any]:
        """A sequence-classification model (module or path) scores the token ids themselves, as
        legacy TRL did; functions (or a list of them) follow GRPO's reward-function convention."""
        if isinstance(reward_model, str):
            from transformers import AutoModelForSequenceClassification

            check_model_source(reward_model)
            reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model, num_labels=1)
        if isinstance(reward_model, nn.Module):
            check_vocab(reward_model, tokenizer, "reward_model")
            switch_off_dropout(reward_model)
            return reward_model.to(self.device).eval().requires_grad_(False), None
        return None, load_rewards(reward_model, weights=None, device=self.device)

    def trained_modules(self) -> list[nn.Module]:
        return [self.model, *self.critic.trained_modules()]

    # --- the loop -----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run PPO for ``max_steps`` optimizer steps, or over ``total_episodes`` completions."""
        args, rows = self.args, len(self.train_dataset)
        resume = resolve_resume(resume_from_checkpoint, args.output_dir)
        self.begin_training(args.optimizer_steps(rows), "PPO", resume_from=resume)
        sample_every = args.samples_every(rows)
        prompts = self.prompt_stream(args.batch_size, args.data_order_seed)
        while not self.finished:
            buffer = self.buffer  # the rollout a checkpoint fell inside, else None: a new one
            if buffer is None:
                rows = next(prompts)
                with self.metrics.timed("time/rollout"):
                    rollout = self._rollout(rows)  # 1. rollout
                with self.metrics.timed("time/score"):
                    record = self._record(rollout)  # 2. score
                    self._rewards_and_advantages(record)  # 3. advantages
                self._log_rollout(rollout, record)
                buffer = EpochPasses(record, self._passes(record))
            self._optimise(buffer)  # 4. optimise, 5. step, 6. log / evaluate / save
            if (  # legacy TRL: after the update, with the policy it trained
                buffer.finished
                and sample_every
                and self.eval_dataset is not None
                and (self.rollouts_drawn - 1) % sample_every == 0
            ):
                self.generate_completions(sampling=True)
        return self.end_training()

    def _rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Step 1: one completion per prompt with the current policy, generated
        ``local_rollout_forward_batch_size`` prompts at a time (legacy TRL's batch_generation: the
        field bounds the generation batch's memory too)."""
        size, settings = self.args.local_rollout_forward_batch_size, self.args.sampling_settings()
        chunks = [self.sample(rows[i : i + size], 1, settings) for i in range(0, len(rows), size)]
        return concat_rollouts(chunks, self.processing_class.pad_token_id)

    @torch.no_grad()
    def _record(self, rollout: Rollout) -> RolloutRecord:
        """Step 2: what the old policy, the critic and the reference said about the samples, in
        forward chunks of ``local_rollout_forward_batch_size`` rows (eval mode), and the scores."""
        args = self.args
        batch = PolicyBatch.from_rollout(rollout, mask_truncated=False)
        size = batch.completion_ids.shape
        old_logprobs = torch.zeros(size, device=self.device)
        values = torch.zeros(size, device=self.device)
        ref_logprobs = torch.zeros(size, device=self.device) if self.reference is not None else None
        with eval_mode(*self.trained_modules()), self.accelerator.autocast():
            for chunk in batch.split(args.local_rollout_forward_batch_size):
                width = chunk.completion_ids.shape[1]
                logp, value, ref = self._old_scores(chunk)
                old_logprobs[chunk.rows, :width] = logp
                values[chunk.rows, :width] = value
                if ref_logprobs is not None:
                    ref_logprobs[chunk.rows, :width] = ref
        scores, valid = self._scores(rollout, batch)
        batch.loss_mask = batch.loss_mask * valid[:, None]  # skip_invalid_rewards: out of every loss
        mask = batch.loss_mask.float()
        batch.old_logprobs = old_logprobs * mask
        kl = torch.zeros_like(mask)
        if ref_logprobs is not None:
            # the losses' one KL estimator (its log-ratio clamped to +-20, as everywhere in fastppo)
            kl = kl_estimate(batch.old_logprobs, ref_logprobs * mask, args.kl_estimator) * mask
        return RolloutRecord(batch, values * mask, torch.zeros_like(mask), scores, kl)

    def _old_scores(self, chunk: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``[b, Lc]`` log-probs of the sampled tokens, values, and reference log-probs of one chunk,
        from one policy pass: a head critic reads its hidden states; a trunk critic and a
        shared-trunk reference read its trunk pass."""
        policy_pass = self.policy_forward.run(self.model, chunk, with_hidden=self.critic.reads_policy_hidden)
        logp = self.policy_forward.logprobs(policy_pass, chunk, self.args.temperature)
        values = self.critic.values(chunk, policy_pass)
        if self.reference is None:
            return logp, values, None
        return logp, values, self.reference.logprobs(chunk, self.args.temperature, policy_pass.trunk)

    def _scores(self, rollout: Rollout, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B], [B] bool)``: each completion's score, with the missing-EOS penalty, and whether it
        is valid (False only for samples ``skip_invalid_rewards`` dropped; their score is 0)."""
        args = self.args
        if self.reward_model is not None:
            with self.accelerator.autocast():
                scores = score_with_reward_model(self.reward_model, batch)
            valid = torch.isfinite(scores)
            if not args.skip_invalid_rewards and not bool(valid.all()):
                raise ValueError(
                    f"the reward model scored completion {int((~valid).nonzero()[0])} as "
                    f"{float(scores[~valid][0])}; set skip_invalid_rewards=True to drop such samples"
                )
        else:
            scored = score_rewards(
                self.rewards,
                rollout.prompts,
                rollout.completions,
                rollout.completion_id_lists,
                rollout.columns,
                {
                    "trainer_state": self.state,
                    "log_metric": self.metrics.add,
                    "log_extra": lambda *a, **k: None,
                },
                skip_invalid=args.skip_invalid_rewards,
            )
            scores = combine_rewards(scored.per_func, self.rewards.weights).to(self.device)
            valid = scored.valid.to(self.device) & ~torch.isnan(scores)
            if not args.skip_invalid_rewards and not bool(valid.all()):
                raise ValueError(
                    f"the reward returned None for completion {int((~valid).nonzero()[0])}: PPO needs a "
                    "score for every completion (or skip_invalid_rewards=True to drop such samples)"
                )
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        if args.missing_eos_penalty is not None:
            ended = torch.isin(batch.completion_ids, torch.tensor(self.eos_only, device=self.device))
            has_eos = (ended & batch.completion_mask.bool()).any(dim=1)
            scores = scores - args.missing_eos_penalty * (~has_eos).float()
        return scores, valid

    def _rewards_and_advantages(self, record: RolloutRecord) -> None:
        """Step 3: KL-shaped per-token rewards, GAE, whitened advantages (into ``record.batch``)."""
        args = self.args
        batch = record.batch
        mask = batch.loss_mask.float()
        last = (batch.completion_mask.sum(1) - 1).clamp(min=0)  # [B] the completion's last token
        rewards, _ = shaped_rewards(record.kl, record.scores, last, args.kl_coef)
        rewards = rewards * mask
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, record.returns = generalized_advantage_estimation(
            rewards, record.values, args.gamma, args.lam
        )
        batch.advantages = masked_whiten(advantages, mask) * mask

    def _passes(self, record: RolloutRecord) -> list[torch.Tensor]:
        """Row indices of every micro-batch, epoch after epoch (legacy TRL's loops): each epoch a
        fresh shuffle cut into ``num_mini_batches`` mini-batches of ``local_mini_batch_size`` rows,
        each cut into micro-batches of ``per_device_train_batch_size`` rows (the last one shorter
        when that does not divide the mini-batch)."""
        args = self.args
        passes = []
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(record.batch.completion_ids.shape[0], generator=self._shuffle)
            for mini_batch in order.split(args.local_mini_batch_size):
                passes += list(mini_batch.split(args.per_device_train_batch_size))
        return passes

    def _optimise(self, buffer: EpochPasses) -> None:
        """Steps 4-6 over the rollout's micro-batches, from where a checkpoint left them: each one's
        policy and value loss from one pass, backward; an optimizer step at the end of each
        mini-batch, then log / evaluate / save. Stops early when training must stop."""
        args, record = self.args, buffer.record
        if buffer.done == 0:  # a resumed rollout's tokens were counted before the checkpoint
            self.add_tokens(record.batch.num_tokens * args.num_ppo_epochs)
        for mb in self.micro_batches(buffer):
            width = mb.completion_ids.shape[1]
            with self.metrics.timed("time/minibatch"):
                with self.accelerator.autocast():  # 4. optimise
                    pg_loss, stats, values = self._loss_and_values(mb)
                    value_loss = clipped_value_loss(
                        values,
                        record.values[mb.rows, :width],
                        record.returns[mb.rows, :width],
                        mb.loss_mask,
                        args.cliprange_value,
                    )
                # each micro-batch loss is a masked mean; weighted by its share of the mini-batch's
                # rows, the step's gradient is the mean over the mini-batch whatever the micro split
                scale = mb.completion_ids.shape[0] / args.local_mini_batch_size
                self.backward((pg_loss + args.vf_coef * value_loss.loss) * scale)
            self._record_minibatch(mb, stats, pg_loss, value_loss)
            if self.window_complete:
                self.optimizer_step()  # 5. step
                if self.after_step():  # 6. log / evaluate / save
                    return

    def _loss_and_values(self, mb: PolicyBatch) -> tuple[torch.Tensor, PolicyLossStats, torch.Tensor]:
        """The clipped surrogate of a micro-batch (ratio against the recorded log-probs), its stats,
        and the critic's values, with grad, from one pass (the trunk pass shared when there is one)."""
        policy_pass = self.policy_forward.run(self.model, mb, with_hidden=self.critic.reads_policy_hidden)
        loss, stats = self.policy_forward.loss(policy_pass, mb, self.args.loss_settings())
        return loss, stats, self.critic.values(mb, policy_pass)

    # --- metrics ------------------------------------------------------------------------------------

    def _log_rollout(self, rollout: Rollout, record: RolloutRecord) -> None:
        """Legacy TRL's objective/* metrics (per-sequence sums averaged over the rollout, and over the
        processes), val/*; they describe the rollout, so every log record carries the latest
        rollout's values."""
        batch = record.batch
        mask = batch.loss_mask.float()
        non_score = float((-self.args.kl_coef * record.kl).sum(1).mean())
        eos = torch.isin(batch.completion_ids, torch.tensor(self.eos_only, device=self.device))
        metrics = {
            "objective/entropy": float((-batch.old_logprobs * mask).sum(1).mean()),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": non_score + float(record.scores.mean()),
            "objective/scores": float(record.scores.mean()),
            "val/explained_variance": explained_variance(record.values, record.returns, mask),
            "val/num_eos_tokens": float((eos & (mask > 0)).sum()),
            "completions/mean_length": float(rollout.lengths.float().mean()),
            "completions/clipped_ratio": float(rollout.is_truncated.float().mean()),
            "episode": float(self.rollouts_drawn * self.args.batch_size),
        }
        if self.reference is not None:  # without a reference (kl_coef == 0) there is no KL to report
            metrics["objective/kl"] = float(record.kl.sum(1).mean())
        metrics = mean_over_processes(metrics, self.accelerator)  # every process has as many rows
        self._rollout_metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}

    def _record_minibatch(
        self, mb: PolicyBatch, stats: PolicyLossStats, pg_loss: torch.Tensor, value_loss: ValueLoss
    ) -> None:
        tokens = float(mb.loss_mask.sum())
        log_ratio = (stats.logprobs - mb.old_logprobs) * mb.loss_mask
        ratio_mean = float(stats.ratio_mean)
        self._ratio_means.append(ratio_mean)
        approx_kl = float(0.5 * masked_mean(log_ratio.square(), mb.loss_mask))
        self.metrics.add("policy/approxkl_avg", approx_kl, tokens)
        self.metrics.add("policy/clipfrac_avg", float(stats.clip_region), tokens)
        self.metrics.add("policy/entropy_avg", float(stats.entropy_mean), tokens)
        self.metrics.add("loss/policy_avg", float(pg_loss.detach()), tokens)
        self.metrics.add("loss/value_avg", float(value_loss.loss.detach()), tokens)
        self.metrics.add("val/clipfrac_avg", float(value_loss.clipfrac), tokens)
        self.metrics.add("val/ratio", ratio_mean, tokens)

    def training_metrics(self) -> dict[str, float]:
        """Adds the latest rollout's metrics, legacy TRL's ``lr`` and ``val/ratio_var`` (variance of
        the micro-batch mean ratios of the window)."""
        record = {**self._rollout_metrics, **super().training_metrics()}
        record["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        if len(self._ratio_means) > 1:
            record["val/ratio_var"] = float(torch.tensor(self._ratio_means).var())
        self._ratio_means = []
        return record

    # --- evaluation, samples, saving, checkpoints ---------------------------------------------------

    @torch.no_grad()
    def evaluate(self, *args: Any, metric_key_prefix: str = "eval", **kwargs: Any) -> dict[str, float]:
        """Mean score of one greedy completion per ``eval_dataset`` prompt."""
        if self.eval_dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        rows = self._evaluation_rows(self.eval_dataset)
        return self.report_evaluation(
            {f"{metric_key_prefix}_objective/scores": sum(r["score"] for r in rows) / len(rows)}
        )

    def generate_completions(self, sampling: bool = False) -> None:
        """Legacy TRL's table of greedy completions and their scores (its first 5 rows) for the eval
        prompts; ``sampling=True`` (what training calls) samples only its first eval batch,
        ``per_device_eval_batch_size`` prompts per process. Every process must call it."""
        if self.eval_dataset is None:
            raise ValueError("generate_completions() needs an eval_dataset")
        dataset = self.eval_dataset
        if sampling:
            size = min(len(dataset), self.args.per_device_eval_batch_size * self.accelerator.num_processes)
            dataset = [dataset[i] for i in range(size)]
        rows = self._evaluation_rows(dataset)
        if self.accelerator.is_main_process:
            print_completions(rows, self.state.global_step, limit=5)

    def _evaluation_rows(self, dataset: Any) -> list[dict[str, Any]]:
        """Every prompt's greedy completion and score; each process samples its share."""
        rows: list[dict[str, Any]] = []
        size, greedy = (
            self.args.local_rollout_forward_batch_size,
            self.args.sampling_settings(do_sample=False),
        )
        for rollout, counts in self.evaluation_rollouts(dataset, size, 1, greedy):
            scores, _ = self._scores(rollout, PolicyBatch.from_rollout(rollout, mask_truncated=False))
            rows += [
                {"prompt": p, "completion": c, "score": float(s)}
                for p, c, s, counted in zip(rollout.prompts, rollout.completions, scores, counts, strict=True)
                if counted
            ]
        return rows if self.accelerator.num_processes == 1 else gather_object(rows)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy and tokenizer (``save_pretrained``), and the critic next to them (field note 9)."""
        output_dir = output_dir or self.args.output_dir
        super().save_model(output_dir, _internal_call)
        self.critic.save(output_dir, self.accelerator.is_main_process)  # every process: it may gather

    def checkpoint_extras(self) -> dict[str, Any]:
        """The critic's weights (this process's shards) and the last rollout's metrics."""
        return {
            "critic": [local_state_dict(m) for m in self.critic.trained_modules()],
            "rollout_metrics": dict(self._rollout_metrics),
            "ratio_means": list(self._ratio_means),
        }

    def restore_extras(self, extras: dict[str, Any]) -> None:
        for module, state in zip(self.critic.trained_modules(), extras["critic"], strict=True):
            load_local_state_dict(module, state)
        self._rollout_metrics = dict(extras["rollout_metrics"])
        self._ratio_means = list(extras["ratio_means"])


# --- helpers ---------------------------------------------------------------------------------------


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


def _check_dataset(name: str, dataset: Any, min_rows: int, required: bool = False) -> Any:
    """A prompt dataset whose rows hold "input_ids" (legacy TRL PPO) or "prompt" text/messages."""
    return check_prompt_dataset(
        name,
        dataset,
        ("input_ids", "prompt"),
        min_rows=min_rows,
        rollout_size="batch_size = per_device_train_batch_size x gradient_accumulation_steps x processes",
        required=required,
    )
