"""One decoder pass split in two: the shared frozen trunk (embedding + first K layers), then any
number of tops (the policy's own layers, the reference's frozen copy, a critic's copy) run on the
trunk's output.

The model's own ``forward`` cannot stop after layer K, so ``run_trunk`` repeats what a Llama-style
decoder's forward does, from its public parts (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``
and ``transformers.masking_utils``): embed, build the attention mask per layer type, rotary
position embeddings once, then layers ``[0, K)``. Every later layer receives exactly the inputs the
model's own forward would give it (``LayerInputs``), so ``policy_top(run_trunk(...))`` equals
``model.model(...).last_hidden_state`` bit for bit (tests/memory/test_trunk.py).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import unwrap_peft

# Decoder attributes the split needs: Qwen2, Llama, Mistral, Qwen3 ... all have them.
DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def find_decoder(model: nn.Module) -> nn.Module | None:
    """The decoder of a transformers model (``model.model`` of a ``*ForCausalLM``), PEFT unwrapped;
    None when it has none. Callers check the parts they need."""
    base = unwrap_peft(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder (``model.model`` of a ``*ForCausalLM``), checked to have the parts the split uses."""
    base = unwrap_peft(model)
    decoder = find_decoder(base)
    missing = [name for name in DECODER_PARTS if not hasattr(decoder, name)]
    if decoder is None or missing:
        raise ValueError(
            f"a shared trunk needs a decoder with {', '.join(DECODER_PARTS)} (Qwen2, Llama, ...); "
            f"{type(base).__name__} lacks {missing or 'a decoder'}"
        )
    return decoder


def lm_head_of(model: nn.Module) -> nn.Linear:
    head = unwrap_peft(model).get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"a shared trunk needs a plain nn.Linear lm_head, got {type(head).__name__}")
    return head


def head_is_tied(model: nn.Module) -> bool:
    """lm_head and the input embedding are one tensor (Qwen2.5-0.5B/1.5B, Llama-3.2-1B)."""
    return lm_head_of(model).weight is decoder_of(model).embed_tokens.weight


def check_num_layers(model: nn.Module, num_layers: int, name: str = "num_frozen_layers") -> int:
    total = len(decoder_of(model).layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 0 <= num_layers <= total:
        raise ValueError(f"{name} must be an int in [0, {total}] (layers in the model), got {num_layers!r}")
    return total


def freeze_trunk(model: nn.Module, num_frozen_layers: int) -> list[nn.Parameter]:
    """Freeze the input embedding and decoder layers ``[0, K)``; returns the parameters frozen.

    Call before the optimizer is built so they get no optimizer state. With tied embeddings the
    lm_head is the embedding tensor, so it is frozen too (and the reference needs no copy of it).
    """
    check_num_layers(model, num_frozen_layers)
    decoder = decoder_of(model)
    frozen = [*decoder.embed_tokens.parameters()]
    for layer in decoder.layers[:num_frozen_layers]:
        frozen.extend(layer.parameters())
    for param in frozen:
        param.requires_grad_(False)
    return frozen


def check_trunk_frozen(model: nn.Module, num_layers: int, user: str) -> None:
    """ValueError unless the embedding and layers ``[0, num_layers)`` are frozen: ``user`` reads the
    trunk's output without owning it, so the trunk must not change under it."""
    check_num_layers(model, num_layers)
    decoder = decoder_of(model)
    trunk = [decoder.embed_tokens, *decoder.layers[:num_layers]]
    trainable = [i for i, module in enumerate(trunk) if any(p.requires_grad for p in module.parameters())]
    if trainable:
        where = "the embedding" if trainable[0] == 0 else f"decoder layer {trainable[0] - 1}"
        raise ValueError(
            f"{user} shares the policy's first {num_layers} layers, but {where} is trainable; "
            f"call freeze_trunk(policy, {num_layers}) first (and before building the optimizer)"
        )


@dataclasses.dataclass
class LayerInputs:
    """What each decoder layer receives besides the hidden states, built once per batch."""

    masks: dict[str, Any]  # layer type ("full_attention", "sliding_attention") -> mask or None
    layer_types: list[str]  # [num_layers] the type of each layer
    position_ids: torch.Tensor  # [B, L] (or [1, L] for a packed row)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin), [B, L, head_dim] each
    attention_kwargs: dict[str, Any]  # e.g. cu_seq_lens_q / max_length_q of a packed batch

    def layer_kwargs(self, index: int) -> dict[str, Any]:
        return {
            "attention_mask": self.masks[self.layer_types[index]],
            "position_ids": self.position_ids,
            "position_embeddings": self.position_embeddings,
            **self.attention_kwargs,
        }


@dataclasses.dataclass
class Trunk:
    """The hidden states after the shared layers, and the inputs every later layer needs."""

    hidden: torch.Tensor  # [B, L, H] output of layer K-1 (the embeddings when K == 0)
    num_layers: int  # K: the first top layer is layer K
    inputs: LayerInputs


def _mask_builders() -> dict[str, Any]:
    from transformers import masking_utils

    return {
        "full_attention": masking_utils.create_causal_mask,
        "sliding_attention": masking_utils.create_sliding_window_causal_mask,
    }


def _mask_call(builder, config, embeds, attention_mask, position_ids) -> Any:
    """Call a ``masking_utils`` builder by parameter name: transformers 5.17 calls the cache
    ``past_key_values``, 5.24 ``cache``; 4.5x also wants ``cache_position`` and ``input_embeds``."""
    params = inspect.signature(builder).parameters
    kwargs: dict[str, Any] = {"config": config, "attention_mask": attention_mask}
    kwargs["position_ids"] = position_ids
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    return builder(**kwargs)


def layer_inputs(
    decoder: nn.Module,
    embeds: torch.Tensor,  # [B, L, H]
    attention_mask: torch.Tensor | None,  # [B, L] 1 = attend; None: a packed row or no padding
    position_ids: torch.Tensor | None,  # [B, L]; None: 0..L-1
    attention_kwargs: dict[str, Any],
) -> LayerInputs:
    """Masks and rotary embeddings exactly as the decoder's own forward builds them."""
    config = decoder.config
    if position_ids is None:
        position_ids = torch.arange(embeds.shape[1], device=embeds.device)[None]
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(decoder.layers))
    builders = _mask_builders()
    unknown = sorted(set(layer_types) - set(builders))
    if unknown:
        raise ValueError(f"a shared trunk supports full and sliding attention layers, not {unknown}")
    masks = {
        kind: _mask_call(builders[kind], config, embeds, attention_mask, position_ids)
        for kind in sorted(set(layer_types))
    }
    position_embeddings = decoder.rotary_emb(embeds, position_ids=position_ids)
    return LayerInputs(masks, layer_types, position_ids, position_embeddings, dict(attention_kwargs))


def _call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 4.54 layers return tuples


def run_trunk(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, L]
    *,
    num_layers: int,
    attention_mask: torch.Tensor | None = None,  # [B, L]
    position_ids: torch.Tensor | None = None,  # [B, L]
    use_cache: bool = False,
    **attention_kwargs: Any,
) -> Trunk:
    """Embedding + decoder layers ``[0, num_layers)`` of ``model``: the pass the policy, the
    reference and a critic share. ``attention_kwargs`` (a packed batch's ``cu_seq_lens_q`` ...)
    reach every layer's attention, as they would through ``model(...)``.

    Example:
        >>> trunk = run_trunk(policy, ids, num_layers=ref.num_shared_layers, attention_mask=mask)
        >>> h_policy, h_ref = policy_top(policy, trunk), ref.top(trunk)  # [B, L, H] each
    """
    check_num_layers(model, num_layers, "num_layers")
    if use_cache:
        raise ValueError("run_trunk scores or trains whole sequences: use_cache must be False")
    decoder = decoder_of(model)
    hidden = decoder.embed_tokens(input_ids)
    inputs = layer_inputs(decoder, hidden, attention_mask, position_ids, attention_kwargs)
    for index, layer in enumerate(decoder.layers[:num_layers]):
        hidden = _call_layer(layer, hidden, inputs.layer_kwargs(index))
    return Trunk(hidden, num_layers, inputs)


def run_top(trunk: Trunk, layers: Sequence[nn.Module], norm: nn.Module) -> torch.Tensor:
    """``[B, L, H]`` final hidden states: ``layers`` (standing for decoder layers K, K+1, ...) on the
    trunk's output, then the final ``norm``."""
    expected = len(trunk.inputs.layer_types) - trunk.num_layers
    if len(layers) != expected:
        raise ValueError(
            f"the trunk ends after layer {trunk.num_layers} of {len(trunk.inputs.layer_types)}, so a top "
            f"needs {expected} layers, got {len(layers)}"
        )
    hidden = trunk.hidden
    for offset, layer in enumerate(layers):
        hidden = _call_layer(layer, hidden, trunk.inputs.layer_kwargs(trunk.num_layers + offset))
    return norm(hidden)


def policy_top(model: nn.Module, trunk: Trunk) -> torch.Tensor:
    """``[B, L, H]`` the policy's final hidden states from a trunk pass (its own layers K.. + norm)."""
    decoder = decoder_of(model)
    return run_top(trunk, decoder.layers[trunk.num_layers :], decoder.norm)


def own_top_copy(model: nn.Module, num_layers: int) -> tuple[nn.ModuleList, nn.Module]:
    """Deep copies of decoder layers ``[num_layers, L)`` and the final norm (nothing else is copied:
    the policy's embedding and trunk stay shared)."""
    check_num_layers(model, num_layers, "num_layers")
    decoder = decoder_of(model)
    return nn.ModuleList(copy.deepcopy(list(decoder.layers[num_layers:]))), copy.deepcopy(decoder.norm)
