"""GRPOConfig: TRL 1.16's GRPOConfig names and defaults, plus fastppo's own switches.

A drop-in for ``trl.GRPOConfig``: every TRL and ``transformers.TrainingArguments`` field exists under
the same name. What fastppo implements is listed in ``SUPPORTED``; any other field set to a non-default
value is rejected (see ``fastppo.config``). Deliberate differences from TRL 1.16, all documented:

- ``bf16=None`` / ``gradient_checkpointing=None`` resolve per machine: on with CUDA (TRL's defaults),
  off on CPU (where transformers would refuse bf16 and checkpointing only costs time).
- ``optim=None`` resolves per machine: ``adamw_8bit`` (bitsandbytes, ~2 bytes of state per parameter
  instead of 8) on CUDA when bitsandbytes can run it, else ``adamw_torch`` (TRL: ``adamw_torch_fused``).
- ``model_init_kwargs["attn_implementation"]`` (TRL's spelling), when not given: ``flash_attention_2``
  when flash-attn is installed (CUDA), else ``fastppo_varlen`` for padding-free batches on CUDA, else
  ``sdpa`` (``fastppo.memory.packing.pick_attn_implementation``).
- ``use_liger_kernel=True`` is accepted and logged once: fastppo's own fused kernels serve it (TRL
  applies Liger's layer kernels).
- ``max_prompt_length`` (dropped by TRL) is kept: prompts are truncated from the left to that length.
- ``use_transformers_continuous_batching``: the log-probs the engine sampled with come back
  (``return_logprobs`` defaults to True), logits processors it would drop are refused, and the
  policy is never cast (``fastppo.samplers.continuous``); ``transformers_continuous_batching_config``
  without it, or with ``cache_implementation``, is refused rather than ignored.
- ``cache_implementation="static"`` pads prompts to a few bucket widths so the compiled decode step
  is not rebuilt for every new prompt width (``fastppo.samplers.static``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

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
from .kernels.ppo_loss.settings import CLIPPED_LOSS_TYPES, IMPORTANCE_LEVELS, LOSS_TYPES, PolicyLossSettings
from .rollout import PromptSettings, SamplingSettings
from .samplers.continuous import engine_kwargs

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# Loss types that sum token contributions (TRL warns when they meet sequence-level ratios).
TOKEN_SUMMED_LOSSES = ("bnpo", "dr_grpo", "dapo", "cispo")

# GRPO fields implemented by GRPOTrainer.
SUPPORTED_GRPO = frozenset(
    """
    model_init_kwargs trust_remote_code disable_dropout remove_unused_columns num_generations
    num_generations_eval
    max_completion_length max_prompt_length shuffle_dataset pad_to_multiple_of generation_batch_size
    steps_per_generation temperature top_p top_k min_p generation_kwargs chat_template_kwargs
    repetition_penalty cache_implementation beta num_iterations epsilon delta epsilon_high
    importance_sampling_level reward_weights multi_objective_aggregation scale_rewards loss_type
    mask_truncated_completions sync_ref_model ref_model_mixup_alpha ref_model_sync_steps log_completions
    num_completions_to_print eval_do_sample
    sapo_temperature_neg sapo_temperature_pos vespo_k_pos vespo_lambda_pos vespo_k_neg vespo_lambda_neg
    use_bias_correction_kl entropy_coef use_adaptive_entropy entropy_coef_min entropy_coef_max
    entropy_coef_delta entropy_target top_entropy_quantile off_policy_mask_threshold
    use_transformers_continuous_batching transformers_continuous_batching_config use_transformers_paged
    old_logprobs_from_sampler router_aux_loss_coef cast_lm_head_to_fp32 use_liger_kernel
    """.split()
)


def resolve_pad_to_multiple_of(value: Any) -> int | None:
    """TRL's ``pad_to_multiple_of``: an int >= 1, its string ("64"), None ("none"/"null"), or "auto"
    (None: TRL pads only on Neuron devices)."""
    if isinstance(value, str) and value.lower() in ("auto", "none", "null"):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value is not None:
        check_int("pad_to_multiple_of", value, 1)
    return value


@strict_config
class GRPOConfig(FastppoOptions, TrainingArguments):
    """Configuration of ``fastppo.GRPOTrainer`` (TRL 1.16 names and defaults; see the module docstring)."""

    SUPPORTED: ClassVar[frozenset[str]] = SUPPORTED_GRPO

    _VALID_DICT_FIELDS = [
        *TrainingArguments._VALID_DICT_FIELDS,
        "model_init_kwargs",
        "generation_kwargs",
        "chat_template_kwargs",
        "transformers_continuous_batching_config",
    ]

    # TrainingArguments fields whose defaults TRL overrides
    learning_rate: float = option(1e-6, "Initial learning rate of AdamW (TRL's default).")
    gradient_checkpointing: bool | None = option(
        None, "Recompute activations in backward; None: on with CUDA."
    )
    bf16: bool | None = option(
        None, "bf16 mixed precision; None: on with a bf16-capable CUDA GPU, else fp32."
    )
    lr_scheduler_kwargs: dict | str | None = option(None, "Extra arguments of the learning-rate scheduler.")
    use_liger_kernel: bool = option(
        False, "Accepted for TRL scripts: fastppo's own fused kernels serve it (logged once); no Liger."
    )
    torch_empty_cache_steps: int | None = unsupported(None, "cache emptying")
    report_to: None | str | list[str] = option(
        "none",
        "transformers logging integrations (tensorboard, wandb, mlflow, trackio, ...), 'all' or 'none'; "
        "metrics also go to <output_dir>/metrics.jsonl.",
    )
    remove_unused_columns: bool | None = option(
        False, "Pass only 'prompt' to reward functions (else all columns)."
    )

    # Model and reference model
    model_init_kwargs: dict[str, Any] | str | None = option(
        None, "from_pretrained kwargs when model is a path."
    )
    trust_remote_code: bool = option(
        False, "Allow models/tokenizers with custom code (policy and reward models)."
    )
    router_aux_loss_coef: float | None = option(
        None,
        "MoE load-balancing auxiliary loss weight (TRL): added to the loss of a model whose config has "
        "output_router_logits; None: the config's router_aux_loss_coef; 0.0: off; a non-MoE model fails.",
    )
    disable_dropout: bool = option(False, "Set every dropout probability of the policy (and reference) to 0.")
    cast_lm_head_to_fp32: bool = option(
        False,
        "ScaleRL (TRL): keep the lm_head weight (and a tied embedding) in fp32 and run the lm_head "
        "projection in fp32 outside autocast; the fused kernels already accumulate in fp32, so this "
        "changes the rounding of the bf16 operands only.",
    )

    # Data and generation
    num_generations: int | None = option(
        8, "Completions sampled per prompt (the group of group-relative advantages)."
    )
    num_generations_eval: int | None = option(
        None, "Completions per prompt in evaluate(); None: num_generations."
    )
    max_completion_length: int | None = option(512, "Maximum number of generated tokens per completion.")
    max_prompt_length: int | None = option(
        None, "fastppo: prompts longer than this are cut from the left; None: keep."
    )
    ds3_gather_for_generation: bool = option(True, "DeepSpeed ZeRO-3 only (inert without DeepSpeed).")
    shuffle_dataset: bool | None = option(True, "Shuffle the training prompts each epoch.")
    pad_to_multiple_of: int | str | None = option(
        "auto",
        "Pad the prompt and completion ids of each batch to a multiple of this; 'auto': no padding "
        "(TRL pads to 128 on Neuron only, which fastppo does not run on).",
    )
    generation_batch_size: int | None = option(
        None, "Completions per rollout; None: per_device_train_batch_size * steps_per_generation."
    )
    steps_per_generation: int | None = option(
        None, "Micro-batches per rollout; None: gradient_accumulation_steps."
    )
    temperature: float = option(
        1.0, "Sampling temperature; log-probs for the ratio and KL are of softmax(logits / T)."
    )
    top_p: float = option(1.0, "Nucleus sampling mass in (0, 1]; 1.0 keeps all tokens.")
    top_k: int = option(0, "Top-k sampling; 0 disables it.")
    min_p: float | None = option(None, "Minimum token probability relative to the most likely token.")
    generation_kwargs: dict | str | None = option(
        None, "Extra GenerationConfig arguments (override the above)."
    )
    chat_template_kwargs: dict | str | None = option(
        None, "Extra apply_chat_template arguments for chat prompts."
    )
    repetition_penalty: float = option(1.0, "Repetition penalty of generation (1.0: none).")
    cache_implementation: str | None = option(
        None, "KV-cache implementation of generate, e.g. 'static' (off by default)."
    )
    use_vllm: bool = unsupported(False, "vLLM generation; a faster Sampler plugs into fastppo.rollout")
    vllm_mode: str = option("colocate", "vLLM only (inert).")
    vllm_model_impl: str = option("vllm", "vLLM only (inert).")
    vllm_enable_sleep_mode: bool = option(False, "vLLM only (inert).")
    vllm_structured_outputs_regex: str | None = option(None, "vLLM only (inert).")
    vllm_server_base_url: str | None = option(None, "vLLM only (inert).")
    vllm_server_host: str = option("0.0.0.0", "vLLM only (inert).")
    vllm_server_port: int = option(8000, "vLLM only (inert).")
    vllm_server_timeout: float = option(240.0, "vLLM only (inert).")
    vllm_group_port: int = option(51216, "vLLM only (inert).")
    vllm_gpu_memory_utilization: float = option(0.3, "vLLM only (inert).")
    vllm_max_model_length: int | None = option(None, "vLLM only (inert).")
    vllm_tensor_parallel_size: int = option(1, "vLLM only (inert).")

    # Loss
    beta: float = option(0.0, "KL coefficient; 0 builds no reference model and logs no kl.")
    num_iterations: int = option(1, "Optimisation passes over each rollout (mu in the GRPO paper).")
    epsilon: float = option(0.2, "Clipping epsilon: the ratio is clipped below at 1 - epsilon.")
    delta: float | None = option(
        None, "Two-sided clipping: the unclipped ratio is capped at delta (INTELLECT-2)."
    )
    epsilon_high: float | None = option(
        None,
        "Upper clipping epsilon (DAPO: 0.28); None: epsilon. cispo: the cap on the ratio itself "
        "(ScaleRL's epsilon_max; 5.0 recommended).",
    )
    sapo_temperature_neg: float = option(
        1.05, "sapo: temperature of the soft gate for tokens with advantage <= 0."
    )
    sapo_temperature_pos: float = option(
        1.0, "sapo: temperature of the soft gate for tokens with advantage > 0."
    )
    vespo_k_pos: float = option(
        2.0, "vespo: power k of the gamma weight for advantage >= 0 (down-weights low ratios)."
    )
    vespo_lambda_pos: float = option(
        3.0, "vespo: decay lambda of the gamma weight for advantage >= 0 (down-weights high ratios)."
    )
    vespo_k_neg: float = option(3.0, "vespo: power k of the gamma weight for advantage < 0.")
    vespo_lambda_neg: float = option(2.0, "vespo: decay lambda of the gamma weight for advantage < 0.")
    importance_sampling_level: str = option("token", "'token' ratios, or one 'sequence' ratio (GSPO).")
    reward_weights: list[float] | None = option(None, "Weight of each reward function; None: all 1.0.")
    multi_objective_aggregation: str = option(
        "sum_then_normalize", "'sum_then_normalize' or 'normalize_then_sum' (GDPO)."
    )
    scale_rewards: str = option(
        "group", "Divide advantages by the reward std of the 'group', the 'batch', or 'none'."
    )
    loss_type: str = option(
        "dapo",
        "The per-token loss and its reduction: 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', "
        "'luspo' or 'vespo' (README: loss types).",
    )
    mask_truncated_completions: bool = option(
        False, "Exclude completions that hit max_completion_length from the loss."
    )
    sync_ref_model: bool = option(
        False, "Mix the policy into the reference every ref_model_sync_steps steps."
    )
    ref_model_mixup_alpha: float = option(0.6, "TR-DPO alpha: ref = alpha * policy + (1 - alpha) * ref.")
    ref_model_sync_steps: int = option(512, "TR-DPO tau: optimizer steps between reference syncs.")
    top_entropy_quantile: float = option(
        1.0,
        "Train on the top rho fraction of tokens by entropy only (Beyond the 80/20 Rule: 0.2); 1 keeps all.",
    )
    entropy_coef: float = option(
        0.0,
        "Entropy bonus: the loss minus entropy_coef times the mean per-token entropy, whatever the loss "
        "type; the initial coefficient under use_adaptive_entropy.",
    )
    use_adaptive_entropy: bool = option(
        False,
        "Skywork-OR1's control: each optimizer step entropy_coef moves by entropy_coef_delta, up while the "
        "entropy is at or below entropy_target, down otherwise; applied only at or below the target.",
    )
    entropy_coef_min: float = option(0.0, "Lower bound of the adaptive entropy coefficient.")
    entropy_coef_max: float = option(1.0, "Upper bound of the adaptive entropy coefficient.")
    entropy_coef_delta: float = option(0.005, "Step of the adaptive entropy coefficient per optimizer step.")
    entropy_target: float = option(
        0.2, "Target mean per-token entropy (nats) of adaptive entropy control, over the tokens trained on."
    )
    max_tool_calling_iterations: int | None = unsupported(None, "tool calling")
    vllm_importance_sampling_correction: bool = option(True, "vLLM only (inert).")
    vllm_importance_sampling_mode: str = option("sequence_mask", "vLLM only (inert).")
    vllm_importance_sampling_clip_max: float | None = option(3.0, "vLLM only (inert).")
    vllm_importance_sampling_clip_min: float | None = option(None, "vLLM only (inert).")
    off_policy_mask_threshold: float | None = option(
        None,
        "Drop sequences with advantage < 0 whose mean KL(old || current) exceeds this (DeepSeek-V3.2); "
        "acts only where old log-probs are recorded (records_old_logprobs). None: off.",
    )
    use_bias_correction_kl: bool = option(
        True, "Multiply the KL term by the importance ratio (DeepSeek-V3.2's unbiased reverse-KL gradient)."
    )

    # Logging
    log_completions: bool = option(False, "Print a table of sampled prompts/completions/rewards at each log.")
    log_multimodal: bool = option(True, "Multimodal only (inert: fastppo is text-only).")
    num_completions_to_print: int | None = option(None, "Rows of that table; None: all.")
    log_unique_prompts: bool = unsupported(False, "completion-table filtering")
    log_completions_hub_repo: str | None = unsupported(None, "uploading completions to the Hub")
    use_transformers_continuous_batching: bool = option(
        False, "Sample with transformers' continuous batching (generate_batch; fastppo.samplers.continuous)."
    )
    transformers_continuous_batching_config: dict | str | None = option(
        None,
        "ContinuousBatchingConfig keywords (max_memory_percent defaults to 0.5, return_logprobs to True).",
    )
    use_transformers_paged: bool = option(
        False, "Deprecated (TRL): use use_transformers_continuous_batching."
    )
    vllm_importance_sampling_cap: float | None = option(None, "vLLM only (inert).")

    # fastppo's own switches (the others are FastppoOptions')
    eval_do_sample: bool = option(
        True, "fastppo: evaluate() samples like training; False: one greedy completion per prompt."
    )
    old_logprobs_from_sampler: bool = option(
        False,
        "fastppo: when old log-probs are recorded, take the sampler's own (continuous batching records "
        "them) instead of a scoring forward; needs the untruncated distribution (top_k=0, top_p=1, "
        "min_p=None). On GPU they differ from a training forward's by the kernels' rounding.",
    )

    def __post_init__(self) -> None:
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        super().__post_init__()  # FastppoOptions: TrainingArguments' checks and fastppo's switches
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)
        self._derive_batch_sizes()
        self._check_grpo()
        self._check_loss_family()
        self._check_sampler()

    # --- checks, one place each -------------------------------------------------------------------

    def _derive_batch_sizes(self) -> None:
        """TRL's rule: one of generation_batch_size / steps_per_generation derives the other."""
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("generation_batch_size and steps_per_generation can not both be set")
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            check_int("steps_per_generation", self.steps_per_generation, 1)
            self.generation_batch_size = global_batch * self.steps_per_generation
        else:
            check_int("generation_batch_size", self.generation_batch_size, 1)
            require(
                self.generation_batch_size % global_batch == 0,
                f"generation_batch_size ({self.generation_batch_size}) must be divisible by the global batch "
                f"size per_device_train_batch_size * num_processes = {global_batch}",
            )
            self.steps_per_generation = self.generation_batch_size // global_batch

    def _check_grpo(self) -> None:
        check_int("num_generations", self.num_generations, 2)  # group-relative advantages need a group
        require(
            self.generation_batch_size % self.num_generations == 0,
            f"generation_batch_size ({self.generation_batch_size} = per_device_train_batch_size "
            f"{self.per_device_train_batch_size} x steps_per_generation {self.steps_per_generation}) must be "
            f"divisible by num_generations ({self.num_generations}) so every prompt keeps its whole group",
        )
        if self.num_generations_eval is not None:
            check_int("num_generations_eval", self.num_generations_eval, 1)
        check_int("max_completion_length", self.max_completion_length, 1)
        if self.max_prompt_length is not None:
            check_int("max_prompt_length", self.max_prompt_length, 1)
        check_number("temperature", self.temperature, 0.0, float("inf"), low_open=True, high_open=True)
        check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_int("top_k", self.top_k, 0)
        if self.min_p is not None:
            check_number("min_p", self.min_p, 0.0, 1.0)
        check_number(
            "repetition_penalty", self.repetition_penalty, 0.0, float("inf"), low_open=True, high_open=True
        )
        check_number("beta", self.beta, 0.0, float("inf"), high_open=True)
        if self.router_aux_loss_coef is not None:
            check_number("router_aux_loss_coef", self.router_aux_loss_coef, 0.0, float("inf"), high_open=True)
        check_int("num_iterations", self.num_iterations, 1)
        check_number("epsilon", self.epsilon, 0.0, 1.0, low_open=True, high_open=True)
        if self.epsilon_high is not None:
            check_number("epsilon_high", self.epsilon_high, 0.0, float("inf"), low_open=True, high_open=True)
        if self.delta is not None:
            check_number("delta", self.delta, 1.0, float("inf"), low_open=True, high_open=True)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_choice("multi_objective_aggregation", self.multi_objective_aggregation, AGGREGATIONS)
        if self.reward_weights is not None:
            require(
                isinstance(self.reward_weights, (list, tuple)) and len(self.reward_weights) > 0,
                f"reward_weights must be a non-empty list of numbers, got {self.reward_weights!r}",
            )
            for i, weight in enumerate(self.reward_weights):
                check_number(
                    f"reward_weights[{i}]", weight, float("-inf"), float("inf"), low_open=True, high_open=True
                )
        check_number("ref_model_mixup_alpha", self.ref_model_mixup_alpha, 0.0, 1.0)
        check_int("ref_model_sync_steps", self.ref_model_sync_steps, 1)
        require(
            not (self.sync_ref_model and self.beta == 0.0),
            "sync_ref_model=True needs beta > 0: with beta == 0 no reference model is built",
        )
        if self.num_completions_to_print is not None:
            check_int("num_completions_to_print", self.num_completions_to_print, 1)

    def _check_loss_family(self) -> None:
        """The loss types' and loss options' own values (TRL's loss family), then TRL's warnings
        about combinations that run but are probably not what was meant."""
        finite = dict(low=float("-inf"), high=float("inf"), low_open=True, high_open=True)
        for name in ("sapo_temperature_neg", "sapo_temperature_pos"):
            check_number(name, getattr(self, name), 0.0, float("inf"), low_open=True, high_open=True)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            check_number(name, getattr(self, name), **finite)
        for name in ("use_bias_correction_kl", "use_adaptive_entropy"):
            require(
                isinstance(getattr(self, name), bool),
                f"{name} must be True or False, got {getattr(self, name)!r}",
            )
        check_number("entropy_coef_min", self.entropy_coef_min, **finite)
        check_number("entropy_coef_max", self.entropy_coef_max, **finite)
        require(
            self.entropy_coef_min <= self.entropy_coef_max,
            f"entropy_coef_min ({self.entropy_coef_min}) must be <= entropy_coef_max "
            f"({self.entropy_coef_max})",
        )
        check_number("entropy_coef_delta", self.entropy_coef_delta, 0.0, float("inf"), high_open=True)
        check_number("entropy_target", self.entropy_target, 0.0, float("inf"), high_open=True)
        check_number("top_entropy_quantile", self.top_entropy_quantile, 0.0, 1.0)
        if self.off_policy_mask_threshold is not None:
            check_number(
                "off_policy_mask_threshold", self.off_policy_mask_threshold, 0.0, float("inf"), high_open=True
            )
        for warning in self._loss_family_warnings():
            warnings.warn(warning, stacklevel=5)  # the caller of GRPOConfig(...)

    def _loss_family_warnings(self) -> list[str]:
        """TRL 1.16's init-time warnings (its trainer logs them), and fastppo's for settings that
        would otherwise do nothing unnoticed."""
        found, level = [], self.importance_sampling_level
        if self.loss_type == "luspo" and level != "sequence":
            found.append(
                "When using `'luspo'` loss, `importance_sampling_level` should be set to `'sequence'` to "
                "mirror the paper's setup."
            )
        if self.loss_type == "vespo" and level != "token":
            found.append(
                "VESPO computes sequence-level importance weights internally. `importance_sampling_level` "
                "should be set to `'token'` (the default)."
            )
        if level == "sequence" and self.loss_type in TOKEN_SUMMED_LOSSES:
            found.append(
                f"When using `importance_sampling_level='sequence'`, the `'{self.loss_type}'` loss sums "
                "per-token contributions, which effectively weights each sequence by its completion length "
                "instead of optimizing the per-sequence objective. To reproduce the GSPO paper's setup, set "
                "`loss_type='grpo'` (see "
                "https://huggingface.co/docs/trl/main/en/paper_index#group-sequence-policy-optimization)."
            )
        if self.loss_type == "cispo" and self.epsilon_high is None:
            found.append(
                f"loss_type='cispo' caps the importance ratio at epsilon_high, which is unset and so takes "
                f"epsilon ({self.epsilon}), as in TRL: every ratio near 1 is capped there; ScaleRL "
                "recommends epsilon_high=5.0"
            )
        if self.delta is not None and self.loss_type not in CLIPPED_LOSS_TYPES:
            found.append(
                f"delta={self.delta} has no effect with loss_type={self.loss_type!r}: it caps the ratio of "
                f"the clipped loss types {CLIPPED_LOSS_TYPES} only (as in TRL)"
            )
        if self.off_policy_mask_threshold is not None and not self.records_old_logprobs:
            found.append(
                f"off_policy_mask_threshold={self.off_policy_mask_threshold} has no effect here: every "
                "update of a rollout is on-policy (the old log-probs are the current ones, KL 0); it acts "
                "with num_iterations > 1 or steps_per_generation > gradient_accumulation_steps"
            )
        return found

    def _check_sampler(self) -> None:
        """The rollout engine's switches (``fastppo.samplers``): TRL's continuous batching names, and
        sampler log-probs standing for the old policy's only where they are its distribution."""
        if self.use_transformers_paged:  # TRL 1.16 maps its deprecated name the same way
            warnings.warn(
                "`use_transformers_paged` is deprecated and will be removed in TRL v2.0.0. Use "
                "`use_transformers_continuous_batching` instead.",
                FutureWarning,
                stacklevel=3,
            )
            self.use_transformers_continuous_batching = True
        if self.use_transformers_continuous_batching:
            engine_kwargs(self.transformers_continuous_batching_config)  # keys and values, now
            require(
                self.cache_implementation is None,
                f"cache_implementation={self.cache_implementation!r} does not apply to continuous batching "
                "(it pages its own KV cache): leave it None, or use_transformers_continuous_batching=False",
            )
        else:
            require(
                self.transformers_continuous_batching_config is None,
                "transformers_continuous_batching_config is set but use_transformers_continuous_batching is "
                "False: it would do nothing; switch continuous batching on or drop the config",
            )
        if self.old_logprobs_from_sampler:
            truncated = {
                name: value
                for name, value, off in (
                    ("top_k", self.top_k, 0),
                    ("top_p", self.top_p, 1.0),
                    ("min_p", self.min_p, None),
                    ("repetition_penalty", self.repetition_penalty, 1.0),
                )
                if value != off
            }
            require(
                not truncated,
                f"old_logprobs_from_sampler=True with {truncated}: the log-probs of a truncated or penalised "
                "distribution are not those training takes (softmax(logits / temperature) over the whole "
                "vocabulary)",
            )

    # --- derived values used by the trainer -------------------------------------------------------

    @property
    def prompts_per_rollout(self) -> int:
        """Prompts of one rollout over all processes (each sampled num_generations times)."""
        return self.generation_batch_size // self.num_generations

    @property
    def micro_batches_per_step(self) -> int:
        """Minibatches backpropagated into one optimizer step."""
        return self.gradient_accumulation_steps

    def optimizer_steps(self, dataset_rows: int) -> int:
        """Optimizer steps in the run: max_steps, else num_train_epochs over the dataset's rollouts."""
        if self.max_steps > 0:
            return self.max_steps
        rollouts_per_epoch = dataset_rows // self.prompts_per_rollout
        micro = self.num_train_epochs * rollouts_per_epoch * self.steps_per_generation * self.num_iterations
        return max(1, math.ceil(micro / self.gradient_accumulation_steps))

    def epochs_done(self, rollouts: int, dataset_rows: int) -> float:
        """``state.epoch`` after ``rollouts`` rollouts (incomplete last batches are dropped)."""
        return rollouts / (dataset_rows // self.prompts_per_rollout)

    @property
    def records_old_logprobs(self) -> bool:
        """Whether the rollout must record old log-probs (TRL's rule).

        Only when one rollout feeds more than one optimizer step (num_iterations > 1, or more
        micro-batches per rollout than per step); otherwise every update of that rollout happens
        before any weight changes, the old policy *is* the current one, and the detached current
        log-probs serve (ratio exactly 1, one forward saved).
        """
        return self.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations) != 0

    def loss_settings(self) -> PolicyLossSettings:
        """The kernel's loss settings at this config's values. The trainer fills in what depends on the
        run: dapo / cispo / vespo's num_items_in_batch per rollout, and the entropy coefficient it
        applies (adaptive control; rescaled to its loss scale, ``GRPOTrainer._loss_scaling``)."""
        return PolicyLossSettings(
            clip_low=self.epsilon,
            clip_high=self.epsilon_high,
            delta=self.delta,
            beta=self.beta,
            kl_estimator="k3",
            kl_bias_correction=self.use_bias_correction_kl,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            temperature=self.temperature,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            entropy_coef=self.entropy_coef,
            top_entropy_quantile=self.top_entropy_quantile,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
        )

    def sampling_settings(self, do_sample: bool = True) -> SamplingSettings:
        """How completions are drawn (``do_sample=False``: greedy evaluation)."""
        return SamplingSettings(
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            do_sample=do_sample,
            cache_implementation=self.cache_implementation,
            extra=tuple((self.generation_kwargs or {}).items()),
        )

    def prompt_settings(self) -> PromptSettings:
        return PromptSettings(
            max_prompt_length=self.max_prompt_length,
            chat_template_kwargs=self.chat_template_kwargs,
            keep_columns=not self.remove_unused_columns,
        )
