"""PPOConfig: legacy TRL PPOConfig (``OnPolicyConfig`` + ``PPOConfig``, TRL 0.12-0.19) names and defaults.

Checked against TRL v0.19.1's ``OnPolicyConfig`` and ``PPOConfig`` source (TRL 1.16 no longer ships
them). Every ``transformers.TrainingArguments`` field exists; what fastppo implements is listed in
``SUPPORTED_PPO``; any other field set to a non-default value is rejected (``fastppo.config``).
Batch sizes follow v0.19's arithmetic (a rollout is per_device_train_batch_size x
gradient_accumulation_steps rows per process, split into num_mini_batches mini-batches, one
optimizer step each, walked in micro-batches of per_device_train_batch_size rows); they are
read-only properties here, not fields. Deliberate differences: ``bf16`` / ``gradient_checkpointing``
/ ``optim`` resolve per machine (as in GRPOConfig); ``sft_model_path`` / ``reward_model_path``
default to ``None`` (fastppo never downloads; legacy TRL's scripts read them, its trainer did not);
``max_grad_norm`` defaults to 0 (no clipping, as legacy's loop never clipped); one optimizer step
per mini-batch, as legacy's loops are written (under accelerate's accumulation its optimizer only
stepped every gradient_accumulation_steps micro-batches, across mini-batches: once per PPO epoch
when num_mini_batches divides gradient_accumulation_steps).
"""

from __future__ import annotations

import math
from typing import ClassVar

from transformers import TrainingArguments

from .config import (
    FastppoOptions,
    check_choice,
    check_int,
    check_number,
    option,
    require,
    strict_config,
    unsupported,
)
from .kernels.ppo_loss.settings import PolicyLossSettings
from .rollout import PromptSettings, SamplingSettings

KL_ESTIMATORS = ("k1", "k3")
CRITICS = ("policy_head", "own_layers")

# PPO fields implemented by PPOTrainer.
SUPPORTED_PPO = frozenset(
    """
    exp_name dataset_num_proc num_mini_batches total_episodes local_rollout_forward_batch_size
    num_sample_generations response_length stop_token stop_token_id temperature missing_eos_penalty
    sft_model_path reward_model_path num_ppo_epochs whiten_rewards kl_coef kl_estimator cliprange vf_coef
    cliprange_value gamma lam remove_unused_columns generation_kwargs critic
    """.split()
)


@strict_config
class PPOConfig(FastppoOptions, TrainingArguments):
    """Configuration of ``fastppo.PPOTrainer`` (legacy TRL names and defaults; see the module docstring)."""

    SUPPORTED: ClassVar[frozenset[str]] = SUPPORTED_PPO

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "generation_kwargs"]

    # --- OnPolicyConfig ---------------------------------------------------------------------------
    exp_name: str = option("ppo_config", "Name of this experiment.")
    dataset_num_proc: int | None = option(None, "Processes used to tokenize the dataset.")
    num_mini_batches: int = option(1, "Mini-batches each rollout batch is split into per PPO epoch.")
    total_episodes: int | None = option(
        None, "Completions to train on in total; None: num_train_epochs * len(train_dataset)."
    )
    local_rollout_forward_batch_size: int = option(64, "Rows per forward pass while rolling out.")
    num_sample_generations: int = option(10, "Times to print sample completions (needs eval_dataset).")
    response_length: int = option(53, "Tokens generated per completion.")
    stop_token: str | None = option(
        None,
        "'eos': end completions at EOS (fastppo always does; legacy TRL without it ran to response_length).",
    )
    stop_token_id: int | None = option(None, "End completions at this token id too (as well as at EOS).")
    temperature: float = option(0.7, "Sampling temperature.")
    missing_eos_penalty: float | None = option(
        None, "Subtracted from the score of a completion that does not end with the stop token."
    )
    sft_model_path: str | None = option(None, "Policy path, for scripts (fastppo: None, never downloads).")
    model_adapter_name: str | None = unsupported(None, "named PEFT adapters")
    ref_adapter_name: str | None = unsupported(None, "named PEFT adapters")
    ds3_gather_for_generation: bool = option(True, "DeepSpeed ZeRO-3 only (inert).")
    # --- PPOConfig --------------------------------------------------------------------------------
    reward_model_path: str | None = option(None, "Reward model path, for scripts (fastppo: None).")
    num_ppo_epochs: int = option(4, "Passes over each rollout batch.")
    whiten_rewards: bool = option(False, "Whiten the per-token rewards before GAE.")
    kl_coef: float = option(0.05, "Weight of the per-token KL penalty in the reward.")
    kl_estimator: str = option("k1", "'k1': log(pi/ref), unbiased; 'k3': lower variance, always >= 0.")
    cliprange: float = option(0.2, "Policy ratio clip range.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    cliprange_value: float = option(0.2, "Clip range of the value prediction around its rollout value.")
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "GAE lambda.")
    # --- TrainingArguments defaults legacy TRL's PPO differs on -------------------------------------
    max_grad_norm: float = option(0.0, "Gradient clipping norm; 0: none (legacy TRL PPO never clipped).")
    # --- fastppo ----------------------------------------------------------------------------------
    critic: str = option(
        "policy_head",
        "fastppo, without value_model: 'policy_head' = a value head on the policy's final hidden states "
        "(one pass, no extra layers); 'own_layers' = a trainable copy of the layers above the frozen "
        "trunk (num_frozen_layers) with its own head, sharing the trunk's pass.",
    )
    remove_unused_columns: bool = option(
        False, "Keep the dataset's other columns: reward functions receive them as keyword lists."
    )
    generation_kwargs: dict | None = option(
        None, "fastppo: extra generate() arguments (top_p, top_k, ...), applied last."
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # FastppoOptions: TrainingArguments' checks and fastppo's switches
        self._check_ppo()

    def _check_ppo(self) -> None:
        check_int("num_mini_batches", self.num_mini_batches, 1)
        if self.total_episodes is not None:
            check_int("total_episodes", self.total_episodes, 1)
        check_int("local_rollout_forward_batch_size", self.local_rollout_forward_batch_size, 1)
        check_int("num_sample_generations", self.num_sample_generations, 0)
        check_int("response_length", self.response_length, 1)
        require(
            self.stop_token in (None, "eos"),
            f"stop_token must be None or 'eos', got {self.stop_token!r}",
        )
        if self.stop_token_id is not None:
            check_int("stop_token_id", self.stop_token_id, 0)
        check_number("temperature", self.temperature, 0.0, float("inf"), low_open=True, high_open=True)
        if self.missing_eos_penalty is not None:
            check_number("missing_eos_penalty", self.missing_eos_penalty, 0.0, float("inf"), high_open=True)
        check_int("num_ppo_epochs", self.num_ppo_epochs, 1)
        check_number("kl_coef", self.kl_coef, 0.0, float("inf"), high_open=True)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_number("cliprange", self.cliprange, 0.0, 1.0, low_open=True, high_open=True)
        check_number("vf_coef", self.vf_coef, 0.0, float("inf"), high_open=True)
        check_number("cliprange_value", self.cliprange_value, 0.0, float("inf"), high_open=True)
        check_number("gamma", self.gamma, 0.0, 1.0)
        check_number("lam", self.lam, 0.0, 1.0)
        require(
            not (self.stop_token is not None and self.stop_token_id is not None),
            f"set stop_token ({self.stop_token!r}) or stop_token_id ({self.stop_token_id}), not both",
        )
        require(  # legacy TRL's exact_div (it also checks batch_size, a multiple of local_batch_size)
            self.local_batch_size % self.num_mini_batches == 0,
            f"`local_batch_size` must be a multiple of `num_mini_batches`, inexact division: "
            f"{self.local_batch_size} / {self.num_mini_batches} = "
            f"{self.local_batch_size / self.num_mini_batches}"
            f" (local_batch_size = per_device_train_batch_size={self.per_device_train_batch_size} x "
            f"gradient_accumulation_steps={self.gradient_accumulation_steps})",
        )
        check_choice("critic", self.critic, CRITICS)
        require(
            self.critic != "own_layers" or self.num_frozen_layers is not None,
            "critic='own_layers' copies the layers above the frozen trunk: set num_frozen_layers",
        )

    # --- derived batch sizes (legacy TRL 0.19's names and arithmetic) -----------------------------

    @property
    def local_batch_size(self) -> int:
        """Rows per rollout on this process: per_device_train_batch_size x gradient_accumulation_steps."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def batch_size(self) -> int:
        """Rows per rollout over all processes."""
        return self.local_batch_size * self.world_size

    @property
    def local_mini_batch_size(self) -> int:
        """Rows per optimizer step on this process: the rollout split into num_mini_batches."""
        return self.local_batch_size // self.num_mini_batches

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches accumulated into one optimizer step: the mini-batch in slices of
        per_device_train_batch_size rows, the last one shorter when that does not divide it (legacy
        TRL's micro-batch loop; a mini-batch smaller than per_device_train_batch_size is one)."""
        return math.ceil(self.local_mini_batch_size / self.per_device_train_batch_size)

    def stop_id(self, eos_token_id: int | None) -> int | None:
        """The token that ends a completion: stop_token_id, or EOS with stop_token='eos', else None."""
        return eos_token_id if self.stop_token == "eos" else self.stop_token_id

    def num_updates(self, dataset_rows: int) -> int:
        """Rollout batches in the run (legacy TRL's num_total_batches)."""
        episodes = self.total_episodes or int(self.num_train_epochs * dataset_rows)
        return max(1, math.ceil(episodes / self.batch_size))

    def optimizer_steps(self, dataset_rows: int) -> int:
        """Optimizer steps in the run: max_steps, else num_ppo_epochs x num_mini_batches per rollout."""
        if self.max_steps > 0:
            return self.max_steps
        return self.num_updates(dataset_rows) * self.num_ppo_epochs * self.num_mini_batches

    def epochs_done(self, rollouts: int, dataset_rows: int) -> float:
        """``state.epoch`` after ``rollouts`` rollouts of ``batch_size`` prompts."""
        return rollouts * self.batch_size / dataset_rows

    def samples_every(self, dataset_rows: int) -> int:
        """Rollouts between two printed sample tables (num_sample_generations over the run); 0: none."""
        if not self.num_sample_generations:
            return 0
        return max(1, self.num_updates(dataset_rows) // self.num_sample_generations)

    def loss_settings(self) -> PolicyLossSettings:
        """The kernel's policy loss: legacy TRL's clipped surrogate, a masked mean over the
        micro-batch's tokens (bnpo), no KL term (the KL is in the rewards)."""
        return PolicyLossSettings(
            clip_low=self.cliprange, beta=0.0, loss_type="bnpo", temperature=self.temperature
        )

    def sampling_settings(self, do_sample: bool = True) -> SamplingSettings:
        """How completions are drawn (``do_sample=False``: greedy evaluation and samples)."""
        return SamplingSettings(
            max_new_tokens=self.response_length,
            temperature=self.temperature,
            top_k=0,
            do_sample=do_sample,
            extra=tuple((self.generation_kwargs or {}).items()),
        )

    def prompt_settings(self) -> PromptSettings:
        return PromptSettings(keep_columns=not self.remove_unused_columns)
