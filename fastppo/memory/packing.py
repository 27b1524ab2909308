"""Padding-free batches: the attended tokens of every row packed into one row, positions restarting
per sequence, so no compute or memory goes to padding (TRL #7179) and right padding never meets a
flash kernel (TRL #3034).

The model's own forward runs the packed row: ``model(**packed.model_inputs())``. Attention keeps
sequences apart through
- ``flash_attention_2`` (flash-attn installed): transformers' own varlen path;
- ``fastppo_varlen`` (registered here): ``torch.nn.attention.varlen.varlen_attn`` on CUDA in fp16/bf16
  (torch >= 2.10), and on CPU or in fp32 ``packed_attention_reference``, one causal SDPA per
  sequence. Calls that are not packed (padded batches, generation with a KV cache) go to transformers'
  SDPA unchanged, so one model serves sampling and packed training;
- ``sdpa``: transformers builds a block-diagonal mask from the position ids (correct, O(tokens^2)).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from typing import Any

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "fastppo_varlen"


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """A ``[B, L]`` padded batch as one ``[1, N]`` row of its N attended tokens."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N] 0, 1, ... restarting at every sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32, sequence b is tokens cu_seqlens[b]:cu_seqlens[b + 1]
    max_seqlen: int  # longest sequence
    index: torch.Tensor  # [N] int64 flat position (row * L + column) of each token in the padded batch
    padded_shape: tuple[int, int]  # (B, L)

    def attention_kwargs(self) -> dict[str, Any]:
        """Sequence boundaries for the attention (transformers' flash-attention kwarg names), so no
        layer has to find them in the position ids (a device sync per layer)."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for ``model(...)`` / ``run_trunk(...)``: no attention_mask (no padding),
        and no KV cache, without which transformers' SDPA mask would not look for packed sequences."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "use_cache": False,
            **self.attention_kwargs(),
        }


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
    """Pack the tokens where ``attention_mask`` is 1 (e.g. a left-padded prompt + right-padded
    completion) row by row. Positions count attended tokens, as ``generate`` and
    ``fastppo.batch.sequence_inputs`` do, so packed and padded forwards see the same positions.
    Two device syncs (the packed length and the longest sequence)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)  # [B]
    if not bool(lengths.all()):
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"row {row} of attention_mask has no attended token; drop it before packing")
    index = mask.flatten().nonzero().squeeze(1)  # [N]
    positions = (mask.long().cumsum(dim=1) - 1).flatten()[index]
    cu_seqlens = F.pad(lengths.cumsum(dim=0), (1, 0)).to(torch.int32)
    return PackedBatch(
        input_ids=input_ids.flatten()[index][None],
        position_ids=positions[None],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        index=index,
        padded_shape=(input_ids.shape[0], input_ids.shape[1]),
    )


def unpack(values: torch.Tensor, packed: PackedBatch, fill: float = 0.0) -> torch.Tensor:
    """``[1, N, ...]`` (or ``[N, ...]``) per-token values back to ``[B, L, ...]``, ``fill`` at padding.
    Differentiable: gradients reach the packed values."""
    tokens = packed.index.numel()
    flat = values[0] if values.dim() >= 2 and values.shape[:2] == (1, tokens) else values  # [N, ...]
    if flat.shape[0] != tokens:
        raise ValueError(f"values hold {flat.shape[0]} tokens, the packed batch {tokens}")
    batch, length = packed.padded_shape
    out = flat.new_full((batch * length, *flat.shape[1:]), fill)
    return out.index_copy(0, packed.index, flat).view(batch, length, *flat.shape[1:])


# --- attention ------------------------------------------------------------------------------------


def sequence_boundaries(
    position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens [S + 1] int32, longest)`` of the flattened ``[batch * length]`` tokens: a sequence
    starts at every row start and wherever the position does not grow by exactly 1 (transformers'
    ``find_packed_sequence_indices`` rule, so this path and SDPA's packed mask agree). One sync."""
    if position_ids is None:
        starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    else:
        pos = position_ids.to(device).expand(batch, length)
        starts = torch.diff(pos, dim=1, prepend=pos[:, :1] - 1) != 1
    starts[:, 0] = True
    first = starts.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def packed_attention_reference(
    query: torch.Tensor,  # [N, Hq, D]
    key: torch.Tensor,  # [N, Hk, D]
    value: torch.Tensor,  # [N, Hk, D]
    cu_seqlens: torch.Tensor,  # [S + 1]
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """``[N, Hq, D]`` causal attention within each sequence: one SDPA call per sequence, so no token
    can see another sequence's. ``window``: each token sees itself and the ``window - 1`` tokens
    before it (transformers' ``sliding_window``). The CPU / fp32 path and the oracle for ``varlen_attn``."""
    groups = query.shape[1] // key.shape[1]
    lengths = cu_seqlens.diff().tolist()  # device sync: this is the reference path
    outs = []
    for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths), strict=True):
        k, v = (t.repeat_interleave(groups, dim=1).transpose(0, 1) for t in (k, v))  # [Hq, l, D]
        if window is not None and len(q) > window:
            i = torch.arange(len(q), device=q.device)
            visible = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # [l, l]
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=visible, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=scale)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def varlen_available() -> bool:
    """torch >= 2.10 ships ``torch.nn.attention.varlen.varlen_attn`` (it runs on CUDA only)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_takes_window() -> bool:
    """This torch's ``varlen_attn`` has ``window_size`` (sliding windows), not only ``is_causal``."""
    from torch.nn.attention.varlen import varlen_attn

    return "window_size" in inspect.signature(varlen_attn).parameters


def _torch_varlen(query, key, value, cu_seqlens, max_seqlen, scale, window=None) -> torch.Tensor:
    """``varlen_attn`` causal (within ``window`` when given), across torch versions: 2.10 takes
    ``is_causal`` or ``window_size`` depending on the build; GQA needs ``enable_gqa`` (2.12+) or
    repeated k/v heads."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)  # causal, left window
    elif window is not None:
        raise ValueError("this torch's varlen_attn has no window_size; sliding windows need the reference")
    else:
        kwargs["is_causal"] = True
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hk, S, D]
    value: torch.Tensor,  # [B, Hk, S, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function ``fastppo_varlen``; returns ``([B, T, Hq, D], None)``.

    No mask and as many queries as keys (a packed row, or rows without padding): each sequence
    attends causally to itself only. Anything else (a padded batch, decoding with a cache) was given
    an SDPA mask by ``varlen_mask`` and goes to transformers' SDPA.
    """
    batch, heads, length, dim = query.shape
    if attention_mask is not None or key.shape[2] != length:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout or kwargs.get("softcap") is not None:
        raise ValueError(
            f"{VARLEN_ATTENTION} supports causal attention (with or without a sliding window); got "
            f"dropout={dropout}, softcap={kwargs.get('softcap')}"
        )
    if cu_seq_lens_q is None or max_length_q is None:
        cu_seq_lens_q, max_length_q = sequence_boundaries(position_ids, batch, length, query.device)
    window = kwargs.get("sliding_window")  # a sliding layer (Mistral, Phi-3, Qwen2 with use_sliding_window)
    if window is not None and max_length_q <= window:
        window = None  # no sequence is longer than the window: plain causal is the same attention
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    if q.is_cuda and torch.is_autocast_enabled("cuda") and q.dtype == torch.float32:
        # fp32 weights under autocast: RoPE leaves q and k fp32 while v is bf16. Autocast would run
        # SDPA in its dtype; the flash kernel needs that dtype given (transformers' flash path does so).
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    fast = (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == v.dtype == q.dtype
        and dim % 8 == 0
        and dim <= 256  # the flash kernel's head sizes
        and varlen_available()
    )
    if fast and (window is None or varlen_takes_window()):
        cu = cu_seq_lens_q.to(q.device, torch.int32)
        out = _torch_varlen(q, k, v, cu, max_length_q, scaling, window)
    else:
        out = packed_attention_reference(q, k, v, cu_seq_lens_q, scaling, window)
    return out.view(batch, length, heads, dim), None


def varlen_mask(**kwargs: Any) -> torch.Tensor | None:
    """Mask builder paired with ``fastppo_varlen``: none when the attention finds the sequences from
    the positions (no padding, no cache offset), else exactly SDPA's mask."""
    offsets = [kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)]
    no_offset = all(isinstance(o, int) and o == 0 for o in offsets)
    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"] and no_offset:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(**kwargs)


def register_varlen_attention() -> str:
    """Register ``fastppo_varlen`` with transformers (idempotent); returns its name for
    ``attn_implementation=`` / ``model.set_attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)
    return VARLEN_ATTENTION


def flash_attn_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return importlib.util.find_spec("flash_attn") is not None
    return is_flash_attn_2_available()


def pick_attn_implementation(padding_free: bool = False, device: torch.device | str | None = None) -> str:
    """``flash_attention_2`` on CUDA when flash-attn is installed; else, for padding-free batches on
    CUDA, ``fastppo_varlen`` (registered on the way) when torch has ``varlen_attn``; else ``sdpa``
    (whose flash backend serves unpadded batches on H100)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and flash_attn_available():
        return "flash_attention_2"
    if padding_free and on_cuda and varlen_available():
        return register_varlen_attention()
    return "sdpa"
