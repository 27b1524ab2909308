"""Strict configuration machinery shared by GRPOConfig and PPOConfig.

The configs subclass ``transformers.TrainingArguments`` (so every field a TRL user writes exists), but
fastppo implements only part of them. Three rules keep a user from training with a setting that does
nothing: an unknown keyword is a ``ValueError`` that lists close matches; a known field outside the
config's supported set, set to anything but its default, is a ``ValueError`` that names it as
unsupported; a bad number is a ``ValueError`` naming the value and the expected range.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

import torch

from .optim import resolve_config_optim

T = TypeVar("T")

# Fields that only take effect together with a switch fastppo rejects (vLLM, the Hub, trackio) or that
# name a run for a reporter: inert here exactly as in TRL when that switch is off, so any value is
# accepted.
INERT_PREFIXES = ("vllm_", "hub_", "trackio_")
INERT_FIELDS = frozenset(
    # do_*: flags for user scripts (Trainer ignores them too); run_name/project: names the reporting
    # integrations read themselves; local_rank/ddp_timeout: set by launchers; log_*: verbosity;
    # the rest only matter with DeepSpeed or images.
    """
    do_train do_eval do_predict run_name project local_rank ddp_timeout log_level log_level_replica
    log_on_each_node logging_nan_inf_filter skip_memory_metrics ds3_gather_for_generation log_multimodal
    """.split()
)


# TrainingArguments fields the trainers honour (trainer/base.py), shared with PPOConfig.
SUPPORTED_TRAINING_ARGUMENTS = frozenset(
    """
    output_dir per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps
    learning_rate weight_decay adam_beta1 adam_beta2 adam_epsilon max_grad_norm num_train_epochs
    max_steps lr_scheduler_type lr_scheduler_kwargs warmup_steps optim optim_args logging_strategy
    logging_steps logging_first_step save_strategy save_steps save_total_limit save_only_model eval_strategy
    eval_steps eval_on_start seed data_seed full_determinism bf16 fp16 tf32 use_cpu
    gradient_checkpointing gradient_checkpointing_kwargs activation_checkpointing
    activation_checkpointing_kwargs report_to disable_tqdm
    dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor
    dataloader_multiprocessing_context
    """.split()
)
# Sharding with FSDP2 (fastppo.sharding).
SHARDING_ARGUMENTS = frozenset({"fsdp", "fsdp_config"})
# fastppo's own switches (FastppoOptions), the same in both configs.
FASTPPO_OPTIONS = frozenset(
    """
    use_fused_kernels kernel_chunk_bytes num_frozen_layers padding_free max_consecutive_nonfinite_steps
    skip_invalid_rewards
    """.split()
)


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its one-line help (shown by HfArgumentParser)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def unsupported(default: Any, what: str) -> Any:
    """A field kept for TRL compatibility that fastppo does not implement: only its default is accepted."""
    return option(default, f"Not supported by fastppo ({what}); only the default {default!r} is accepted.")


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def strict_config(cls: type[T]) -> type[T]:
    """``@dataclass`` whose ``__init__`` turns an unknown keyword into a ValueError with suggestions.

    (A plain dataclass raises ``TypeError: unexpected keyword``, which names one key and suggests nothing.)
    """
    cls = dataclasses.dataclass(cls)
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_known_keys(cls.__name__, kwargs, [f.name for f in dataclasses.fields(cls) if f.init])
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def check_known_keys(owner: str, given: Iterable[str], known: Iterable[str]) -> None:
    """ValueError naming every key of ``given`` that is not in ``known``, each with its close matches."""
    known = list(known)
    unknown = [key for key in given if key not in known]
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    raise ValueError(f"{owner} got unknown option(s): {'; '.join(parts)}")


def check_unsupported(config: Any, supported: frozenset[str]) -> None:
    """ValueError listing every field outside ``supported`` (and not inert) that differs from its default.

    Must run before ``TrainingArguments.__post_init__``, which rewrites some values (enums, lists).
    """
    offenders = []
    for f in dataclasses.fields(config):
        if f.name in supported or f.name in INERT_FIELDS or f.name.startswith(INERT_PREFIXES):
            continue
        default = field_default(f)
        value = getattr(config, f.name)
        if default is dataclasses.MISSING or _same(value, default):
            continue
        offenders.append(f"{f.name}={value!r} (default {default!r})")
    if offenders:
        raise ValueError(
            f"{type(config).__name__}: option(s) not supported by fastppo: {', '.join(offenders)}. "
            "Leave them at their defaults (fastppo never ignores a setting silently)."
        )


# Spellings of "off" that argument parsers and YAML produce for the same default (e.g. HfArgumentParser
# turns debug="" into None and include_num_input_tokens_seen="no" into False).
_OFF = (None, False, "", "no", "none", (), [], {})


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, float) and isinstance(default, float) and math.isnan(value) and math.isnan(default):
        return True
    if any(value is off or (type(value) is type(off) and value == off) for off in _OFF) and any(
        default is off or (type(default) is type(off) and default == off) for off in _OFF
    ):
        return True
    try:
        return bool(value == default)
    except Exception:  # e.g. tensors or objects without a boolean equality
        return value is default


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_int(name: str, value: Any, minimum: int) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an integer >= {minimum}, got {value!r}",
    )


def check_number(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """``value`` must be a finite number in the interval; the message spells the interval out."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(ok, f"{name} must be a finite number in {interval}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any], note: str = "") -> None:
    choices = tuple(choices)
    require(value in choices, f"{name} must be one of {choices}, got {value!r}{note}")


def check_report_to(value: Any) -> None:
    """``report_to`` names transformers' logging integrations (tensorboard, wandb, mlflow, trackio,
    ...), which the trainers drive through the same callback events as ``Trainer``; "all" takes every
    installed one, "none" none (metrics.jsonl is always written). A name transformers does not know,
    or an integration whose package is missing, is an error now rather than at the first log."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    values = [value] if isinstance(value, str) or value is None else list(value)
    names = [v for v in values if v not in (None, "none", "all")]
    check_known_keys("report_to", names, [*sorted(INTEGRATION_TO_CALLBACK), "all", "none"])
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    require(not missing, f"report_to={value!r}: {missing} not installed; install its package or drop it")


def resolve_device_defaults(config: Any) -> None:
    """Pick defaults that depend on the machine, before ``TrainingArguments`` validates them.

    ``bf16``/``fp16``: mixed precision needs a CUDA GPU here; ``None`` means bf16 on a bf16-capable
    GPU (TRL's default) and fp32 elsewhere. An explicit ``True`` without such a GPU falls back to fp32
    with a warning (transformers would otherwise refuse to build the config on CPU).
    ``gradient_checkpointing``: ``None`` means on with CUDA (TRL's default), off on CPU where memory
    is not the limit and recomputation only costs time.
    """
    if not torch.cuda.is_available():
        # No GPU: say so to transformers, which otherwise sets up a single-process state even under
        # a multi-process launch (accelerate then sees one process, not MULTI_CPU).
        config.use_cpu = True
    cuda = torch.cuda.is_available() and not config.use_cpu
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    if config.bf16 is None:
        config.bf16 = cuda_bf16 and not config.fp16
    elif config.bf16 and not cuda_bf16:
        warnings.warn(
            "bf16=True needs a CUDA GPU with bf16 support; training in float32 on this device", stacklevel=3
        )
        config.bf16 = False
    if config.fp16 and not cuda:
        warnings.warn("fp16=True needs a CUDA GPU; training in float32 on this device", stacklevel=3)
        config.fp16 = False
    if config.gradient_checkpointing is None:
        config.gradient_checkpointing = cuda
    # optim: None (fastppo's default) -> 8-bit AdamW where bitsandbytes runs (CUDA), else adamw_torch;
    # an 8-bit name that cannot run here falls back now, so the saved config says what trained; a name
    # transformers does not know, or cannot build here, fails now.
    optim = getattr(config.optim, "value", config.optim)
    if optim is None and config.fsdp:  # bitsandbytes' 8-bit state is not sharded (fastppo.sharding)
        optim = "adamw_torch"
    config.optim = resolve_config_optim(optim, "cuda" if cuda else "cpu", config.optim_args)
    if hasattr(config, "activation_checkpointing"):
        # transformers >= 5.2x renamed gradient_checkpointing* (TRL's names) to activation_checkpointing*
        # and warns on the old names; move TRL's spelling over so a TRL user's config stays quiet.
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if getattr(config, new) is None:
                setattr(config, new, getattr(config, old))
            setattr(config, old, None)


def check_fused_precision(config: Any) -> None:
    """fp16 cannot train the fused path: its kernels form the logits' gradient during the forward, in
    the logits' dtype and before fp16 loss scaling multiplies it, so its small entries underflow to
    zero (bf16 has fp32's range)."""
    require(
        not (config.fp16 and config.use_fused_kernels),
        "fp16 with use_fused_kernels=True is not supported: the fused kernels form the logits' gradient "
        "in the forward, unscaled, where fp16 underflows; use bf16, or use_fused_kernels=False",
    )


def check_training_arguments(config: Any) -> None:
    """The TrainingArguments values trainer/base.py can honour (after TrainingArguments' own checks)."""
    check_fused_precision(config)
    for name in ("logging_strategy", "save_strategy", "eval_strategy"):
        value = getattr(config, name)
        check_choice(name, getattr(value, "value", value), ("no", "steps"))
    scheduler = getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
    require(
        scheduler not in ("reduce_lr_on_plateau", "greedy"),
        f"lr_scheduler_type={scheduler!r} needs an eval metric loop fastppo does not run; use e.g. 'linear'",
    )
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_int(name, getattr(config, name), 1)
    check_number("learning_rate", config.learning_rate, 0.0, float("inf"), high_open=True)
    require(
        config.max_steps > 0 or config.num_train_epochs > 0,
        f"set max_steps > 0 or num_train_epochs > 0 (got {config.max_steps}, {config.num_train_epochs})",
    )


# generate() arguments that set the distribution the completions are sampled from: the log-probs
# (old, reference, the ratio) are taken under the config's own fields, so only those may set them.
SAMPLING_KNOBS = frozenset({"temperature", "do_sample", "top_k", "top_p", "min_p"})


def check_generation_kwargs(generation_kwargs: dict | None) -> None:
    overridden = sorted(SAMPLING_KNOBS & set(generation_kwargs or {}))
    require(
        not overridden,
        f"generation_kwargs must not set {overridden}: log-probs are taken under the config's own sampling "
        "fields (temperature ...), so sampling must use them too: set those instead",
    )


def check_memory_options(config: Any) -> None:
    """The memory switches (``num_frozen_layers``, ``padding_free``) shared by GRPOConfig and
    PPOConfig. A frozen trunk's size is checked against the model when the trainer loads it."""
    if config.num_frozen_layers is not None:
        check_int("num_frozen_layers", config.num_frozen_layers, 0)
    require(
        isinstance(config.padding_free, bool),
        f"padding_free must be True or False, got {config.padding_free!r}",
    )
    init_kwargs = getattr(config, "model_init_kwargs", None) or {}
    attn = init_kwargs.get("attn_implementation") if isinstance(init_kwargs, dict) else None
    require(
        attn is None or isinstance(attn, str),
        f"model_init_kwargs['attn_implementation'] must be a string, got {attn!r}",
    )


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """How every forward over sampled sequences runs (``fastppo.policy_forward``); a config's
    ``forward_plan()`` builds it once, so the switches do not travel through the call sites."""

    fused: bool = True  # hidden states -> chunked kernels; False: full logits -> log_softmax (plain)
    chunk_bytes: int | None = None  # memory budget of one chunk of logits (fused); None: by device
    padding_free: bool = False  # packed rows of attended tokens instead of padded ones
    num_frozen_layers: int | None = None  # K: the shared frozen trunk; None: every layer trains
    lm_head_fp32: bool = False  # the lm_head projection in fp32 outside autocast (cast_lm_head_to_fp32)


@dataclasses.dataclass
class FastppoOptions:
    """What GRPOConfig and PPOConfig share beyond ``TrainingArguments``: fastppo's own switches, two
    defaults both change, the checks every config runs, and the plan the forwards follow.

    A config is ``class XConfig(FastppoOptions, TrainingArguments)`` with its own fields, the set of
    fields it implements (``SUPPORTED``) and a ``__post_init__`` that calls this one first.
    """

    SUPPORTED: ClassVar[frozenset[str]] = frozenset()  # the config's own fields its trainer implements

    # TrainingArguments defaults both trainers differ on (TRL's GRPO, legacy TRL's PPO)
    logging_steps: float = option(10, "Log every X optimizer steps (a float < 1 is a fraction of max_steps).")
    optim: str | None = option(
        None,
        "Any transformers OptimizerNames (with optim_args); None: 'adamw_8bit' on CUDA when bitsandbytes "
        "runs, else 'adamw_torch'.",
    )
    # fastppo's own switches
    use_fused_kernels: bool = option(
        True,
        "fastppo: hidden states -> chunked fused loss (no [tokens, vocab] logits); "
        "False runs the plain PyTorch path (for A/B checks).",
    )
    kernel_chunk_bytes: int | None = option(
        None,
        "fastppo: memory budget of one chunk of logits (fused path); None: 1 GiB on a GPU, 128 MiB on CPU.",
    )
    num_frozen_layers: int | None = option(
        None,
        "fastppo: freeze the input embedding (and a tied lm_head) and the first K decoder layers; the "
        "reference (and PPO's 'own_layers' critic) shares them and owns only the layers above. "
        "None: train every parameter.",
    )
    padding_free: bool = option(
        False,
        "fastppo: score and train on packed rows (no padding tokens computed), as TRL's SFTConfig; "
        "best with flash_attention_2 or fastppo_varlen attention.",
    )
    max_consecutive_nonfinite_steps: int = option(
        3, "fastppo: optimizer steps skipped for a non-finite loss/gradient in a row before training stops."
    )
    skip_invalid_rewards: bool = option(
        False, "fastppo: drop samples whose reward is NaN/inf (logged) instead of raising."
    )

    def __post_init__(self) -> None:
        """Unknown-default, report_to and device checks, then ``TrainingArguments``' own, then the
        values the trainers honour and fastppo's switches."""
        supported = SUPPORTED_TRAINING_ARGUMENTS | SHARDING_ARGUMENTS | FASTPPO_OPTIONS | self.SUPPORTED
        check_unsupported(self, supported)
        check_report_to(self.report_to)
        resolve_device_defaults(self)
        super().__post_init__()  # TrainingArguments
        check_training_arguments(self)
        check_generation_kwargs(self.generation_kwargs)
        if self.kernel_chunk_bytes is not None:
            check_int("kernel_chunk_bytes", self.kernel_chunk_bytes, 1)
        check_int("max_consecutive_nonfinite_steps", self.max_consecutive_nonfinite_steps, 1)
        check_memory_options(self)

    @property
    def data_order_seed(self) -> int:
        """The seed of the prompt order: ``data_seed`` when set (0 included), else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def forward_plan(self) -> ForwardPlan:
        """How every forward over sampled sequences runs (``fastppo.policy_forward``)."""
        return ForwardPlan(
            fused=self.use_fused_kernels,
            chunk_bytes=self.kernel_chunk_bytes,
            padding_free=self.padding_free,
            num_frozen_layers=self.num_frozen_layers,
            lm_head_fp32=getattr(self, "cast_lm_head_to_fp32", False),
        )
