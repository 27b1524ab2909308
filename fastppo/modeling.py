"""Loading and preparing the policy and its tokenizer (shared by the GRPO and PPO trainers).

A missing model path is reported before anything is loaded or generated.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.utils import logging as hf_logging

from .adapters import has_adapters, unwrap_peft
from .memory.activation_checkpointing import enable_gradient_checkpointing
from .memory.packing import VARLEN_ATTENTION, pick_attn_implementation, register_varlen_attention
from .memory.trunk import freeze_trunk
from .reward_model import fp32_linear
from .rewards import check_vocab

logger = hf_logging.get_logger(__name__)  # a stdlib logger with transformers' warning_once

# The class flag transformers checks before dispatching to each attention implementation fastppo picks.
ATTENTION_SUPPORT_FLAGS = {
    "flash_attention_2": "_supports_flash_attn",
    VARLEN_ATTENTION: "_supports_attention_backend",
    "sdpa": "_supports_sdpa",
}


def check_model_source(name: str, trust_remote_code: bool = False) -> None:
    """ValueError unless ``name`` is a local model folder or a Hub id whose config can be fetched."""
    if os.path.isdir(name):
        config = os.path.join(name, "config.json")
        if not os.path.isfile(config):
            raise ValueError(
                f"model folder {name!r} has no config.json (save the model with save_pretrained)"
            )
        try:
            with open(config, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as exc:  # unreadable, or not JSON
            raise ValueError(f"model folder {name!r}: config.json cannot be read as JSON ({exc})") from exc
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not a Hub id ("org/name")
        raise ValueError(f"model path {name!r} does not exist")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline, typo, private repo: all end here with the cause attached
        raise ValueError(
            f"model {name!r} is neither a local folder nor a reachable Hugging Face Hub model id ({exc})"
        ) from exc


def load_causal_lm(
    model: str | nn.Module,
    init_kwargs: dict[str, Any] | None,
    trust_remote_code: bool,
    *,
    padding_free: bool = False,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The policy: a given module as is, or ``AutoModelForCausalLM.from_pretrained`` (fp32 by default,
    as TRL: mixed precision comes from autocast, master weights stay fp32).

    ``attn_implementation`` (``model_init_kwargs``, TRL's spelling) defaults to the fastest one that
    runs on ``device``: ``pick_attn_implementation(padding_free, device)``. A given module keeps the
    attention it was built with (packed rows still work: SDPA and eager find the sequences from the
    position ids, at the cost of a ``[tokens, tokens]`` mask)."""
    if not isinstance(model, str):
        if init_kwargs:
            raise ValueError("model_init_kwargs were given but the model is already instantiated; drop one")
        return model
    check_model_source(model, trust_remote_code)
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code, **(init_kwargs or {})}
    dtype = kwargs.get("dtype", "float32")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"model_init_kwargs dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}"
            )
        dtype = getattr(torch, dtype)
    kwargs["dtype"] = dtype
    if kwargs.get("attn_implementation") is None:
        kwargs["attn_implementation"] = default_attention(model, trust_remote_code, padding_free, device)
    if kwargs["attn_implementation"] == VARLEN_ATTENTION:
        register_varlen_attention()  # a name transformers learns only at registration
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, SafetensorError) as exc:  # weight files missing, unreadable or corrupt
        raise ValueError(f"model {model!r} could not be loaded: {exc}") from exc


def default_attention(
    model: str, trust_remote_code: bool, padding_free: bool, device: torch.device | str | None
) -> str:
    """``pick_attn_implementation``'s choice if the model class supports it, else SDPA, else eager
    with a warning: transformers refuses at load an implementation the class lacks (GPT-OSS and
    others declare ``_supports_sdpa = False``). A class known only from remote code keeps the pick."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    picked = pick_attn_implementation(padding_free, device)
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return picked
    for name in dict.fromkeys((picked, "sdpa")):
        if getattr(model_class, ATTENTION_SUPPORT_FLAGS[name], False):
            return name
    warnings.warn(
        f"{model_class.__name__} has no {picked!r} or 'sdpa' attention path in transformers, so it is loaded "
        "with attn_implementation='eager' (slower, and it holds the [tokens, tokens] attention scores); set "
        "model_init_kwargs={'attn_implementation': ...} to choose another",
        stacklevel=4,
    )
    return "eager"


def load_tokenizer(model: nn.Module, processing_class: Any, trust_remote_code: bool) -> Any:
    """The tokenizer (given, or the model's own), with a pad token (EOS when it has none, as TRL)."""
    tokenizer = processing_class
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = getattr(model.config, "_name_or_path", None)
        if not name:
            raise ValueError(
                "processing_class is needed: the model was not loaded from a path, so its tokenizer "
                "cannot be found"
            )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if hasattr(tokenizer, "tokenizer") and not hasattr(tokenizer, "pad_token"):  # a multimodal processor
        raise ValueError("fastppo trains text-only policies; pass a tokenizer as processing_class")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set one of them")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's declared ones (end-of-turn)."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config names an EOS token")
    return ids


def prepare_policy(
    model: nn.Module,
    tokenizer: Any,
    *,
    peft_config: Any,
    gradient_checkpointing: bool,
    gradient_checkpointing_kwargs: dict | None,
    disable_dropout: bool,
    num_frozen_layers: int | None = None,
) -> nn.Module:
    """Pad ids mirrored on the model, optional LoRA (PEFT), a frozen trunk (embedding + first
    ``num_frozen_layers`` decoder layers), activation checkpointing, dropout off.

    Freezing happens here, before any optimizer exists, so frozen parameters never get state.
    Checkpointing goes through ``memory.activation_checkpointing``: with the default non-reentrant
    implementation a frozen trunk (or LoRA's frozen embedding) is not recorded for backward at all.
    """
    check_vocab(model, tokenizer, "policy")
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    if num_frozen_layers is not None:
        if has_adapters(model):
            raise ValueError(
                f"num_frozen_layers={num_frozen_layers} with a PEFT/LoRA policy: LoRA already freezes the "
                "base weights and its reference costs no extra weights; leave num_frozen_layers=None "
                "(restrict the adapters with LoraConfig(layers_to_transform=...) instead)"
            )
        freeze_trunk(model, num_frozen_layers)
    if gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        enable_gradient_checkpointing(model, use_reentrant=bool(kwargs.pop("use_reentrant", False)), **kwargs)
    if disable_dropout:
        switch_off_dropout(model)
    return model


def cast_lm_head_to_fp32(model: nn.Module) -> None:
    """TRL's ``cast_lm_head_to_fp32`` (ScaleRL): the lm_head weight kept in fp32 and its projection
    run in fp32 outside autocast. The plain path calls ``lm_head`` (its forward is replaced); the fused
    kernels read the weight directly and follow ``ForwardPlan.lm_head_fp32``. A tied input embedding
    shares the weight, so its output is cast back to the model's dtype, as TRL does."""
    base = unwrap_peft(model)
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            "`cast_lm_head_to_fp32=True` is not supported when the lm_head carries a PEFT adapter (e.g. "
            f"`target_modules` includes `lm_head`; got {type(head).__name__}). Remove `lm_head` from the "
            "adapter's target modules, or set `cast_lm_head_to_fp32=False`."
        )
    dtype = head.weight.dtype
    head.float()
    head.forward = functools.partial(fp32_linear, head)
    embedding = base.get_input_embeddings()
    if embedding.weight is head.weight and dtype != torch.float32:
        embedding.register_forward_hook(lambda module, inputs, output: output.to(dtype))


def switch_off_dropout(model: nn.Module) -> None:
    """Dropout modules, and the attention dropout transformers applies functionally (Llama, Qwen2:
    ``config.attention_dropout`` read by each attention module), set to 0: with either left on, the
    log-probs a trainer records would not be the ones it later trains against."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0


def build_policy(
    model: str | nn.Module,
    processing_class: Any,
    args: Any,
    *,
    init_kwargs: dict[str, Any],
    trust_remote_code: bool,
    peft_config: Any,
    disable_dropout: bool,
) -> tuple[nn.Module, Any]:
    """The trainers' policy and tokenizer from a config (GRPOConfig or PPOConfig): loaded with the
    attention the config's packing needs, then prepared (LoRA, frozen trunk, checkpointing, dropout)."""
    policy = load_causal_lm(
        model,
        init_kwargs,
        trust_remote_code,
        padding_free=args.padding_free,
        device="cpu" if args.use_cpu else None,
    )
    tokenizer = load_tokenizer(policy, processing_class, trust_remote_code)
    policy = prepare_policy(
        policy,
        tokenizer,
        peft_config=peft_config,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        disable_dropout=disable_dropout,
        num_frozen_layers=args.num_frozen_layers,
    )
    if getattr(args, "cast_lm_head_to_fp32", False):
        cast_lm_head_to_fp32(policy)
    if getattr(args, "use_liger_kernel", False):
        logger.warning_once(
            "use_liger_kernel=True: fastppo's own fused kernels (chunked lm_head log-probs and loss, no "
            "[tokens, vocab] logits) serve it; Liger's kernels are not applied"
        )
    return policy, tokenizer
