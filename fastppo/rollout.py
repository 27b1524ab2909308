"""The rollout engine shared by GRPO and PPO: prompts in, sampled completions (ids, masks, text) out.

Generation sits behind the small ``Sampler`` protocol, so an engine replaces ``model.generate``
without touching the trainers: ``GenerateSampler`` (here, the default), and in ``fastppo.samplers``
transformers' continuous batching and a static-cache sampler with compiled decode. Prompts are plain
text or chat messages (rendered with the tokenizer's chat template), left-padded for generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .adapters import unwrap_peft
from .sharding import gathered, is_sharded

# Columns that hold the prompt itself (or what the rollout produces), not extra reward-function inputs.
PROMPT_COLUMNS = ("prompt", "input_ids", "attention_mask", "completion", "completion_ids")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. ``temperature`` must also be the one the log-probs are taken at."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True  # False: greedy (evaluation)
    cache_implementation: str | None = None  # e.g. "static" (with torch.compile on GPU); None: dynamic cache
    extra: tuple[tuple[str, Any], ...] = ()  # user generation_kwargs, applied last (they override the above)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How dataset rows become the prompts a rollout samples from."""

    max_prompt_length: int | None = None  # longer prompts keep their last tokens; None: keep all
    chat_template_kwargs: dict[str, Any] | None = None  # extra apply_chat_template arguments
    keep_columns: bool = True  # the dataset's other columns reach the reward functions


@dataclasses.dataclass
class Completions:
    """What a sampler may return instead of bare ids: the ids and, where the engine has them, the
    log-probs it drew each token with. A trainer uses those log-probs as the old policy's only when
    ``untruncated`` says they are of the distribution training takes log-probs of."""

    ids: torch.Tensor  # [P * n, Lc] right-padded with the pad id after the first end token
    logprobs: torch.Tensor | None = None  # [P * n, Lc] fp32, of each sampled token; 0 at padding
    # True: the log-probs are of softmax(logits / T) over the whole vocabulary with the sampling
    # temperature (no top-k / top-p / min-p truncation, no other logits processor), i.e. the
    # distribution training's log-probs are of; False: of a truncated or otherwise processed one.
    untruncated: bool = False


class Sampler(Protocol):
    """Draws ``n`` completions for each prompt row; completions of one prompt come out consecutively.

    ``generate`` returns the completion ids ``[P * n, Lc]`` (right-padded with the pad id after the
    first end token, which the completion keeps), or ``Completions`` when the engine also has the
    log-probs it sampled with. It runs under no grad, in eval mode, and leaves the model's mode as
    it found it. A sampler that keeps weights of its own (a copy in another dtype, an inference
    engine in another process, graphs captured over them) also defines ``sync_weights()``: the
    trainers call it before any sampling once the policy's weights have changed (after an
    optimizer step, or a resume), so it never samples from stale weights.

    Plugging in vLLM (fastppo does not ship it: vLLM cannot be installed on the machines this is
    tested on, so ``use_vllm`` stays refused): build a ``vllm.LLM`` next to the policy; in
    ``generate`` turn each unpadded prompt row into ``TokensPrompt(prompt_token_ids=...)``, sample
    with ``SamplingParams(n=n, temperature=settings.temperature, top_p=..., top_k=settings.top_k or
    -1, min_p=..., max_tokens=settings.max_new_tokens, stop_token_ids=<end tokens>, logprobs=0)``
    (vLLM's logprobs mode must be ``processed_logprobs`` for them to be of the sampled
    distribution), pad the token ids as above and return ``Completions(ids, logprobs, untruncated)``
    with ``untruncated`` only when no top-k/top-p/min-p applies; in ``sync_weights`` push the
    policy's ``state_dict`` into the engine (``llm.llm_engine.model_executor...load_weights``, or
    TRL's ``VLLMClient.update_named_param`` for a server). Pass it as ``GRPOTrainer(sampler=...)``.
    """

    def generate(
        self,
        prompt_ids: torch.Tensor,  # [P, Lp] left-padded
        prompt_mask: torch.Tensor,  # [P, Lp]
        n: int,
        settings: SamplingSettings,
    ) -> torch.Tensor | Completions: ...


def generation_kwargs(
    settings: SamplingSettings, pad_token_id: int, eos_token_ids: Sequence[int], **fields: Any
) -> dict[str, Any]:
    """The ``GenerationConfig`` fields of a sampler built on transformers: length, end tokens and the
    distribution exactly as ``settings`` says, then the sampler's own ``fields``, then the user's
    ``settings.extra`` (``generation_kwargs``: applied last, they override the above)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "pad_token_id": pad_token_id,
        "eos_token_id": list(eos_token_ids),
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.do_sample:
        # top_k=0 must be passed as 0: None would fall back to transformers' default of 50
        kwargs.update(
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p
        )
    else:  # greedy: unset the sampling knobs so transformers does not warn about them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return {**kwargs, **fields, **dict(settings.extra)}


class GenerateSampler:
    """``model.generate`` with the KV cache, in eval mode (no dropout, no checkpointing) and no grad."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_ids: Sequence[int]):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)

    def generation_config(self, n: int, settings: SamplingSettings, **fields: Any) -> Any:
        """The ``GenerationConfig`` of one call (``fields``: a subclass's own, before ``settings.extra``)."""
        from transformers import GenerationConfig

        fields = {
            "use_cache": True,
            "num_return_sequences": n,
            "cache_implementation": settings.cache_implementation,
            **fields,
        }
        return GenerationConfig(
            **generation_kwargs(settings, self.pad_token_id, self.eos_token_ids, **fields)
        )

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, n, settings):
        return self.run(prompt_ids, prompt_mask, self.generation_config(n, settings))

    def run(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: Any) -> torch.Tensor:
        """``model.generate`` under ``config``; the completion ids ``[P * n, Lc]``."""
        was_training = self.model.training
        self.model.eval()
        try:
            # sharded (FSDP): gathered once for the whole call, so no collective runs while decoding and
            # processes may stop at different lengths (synced_gpus would make them wait for each other)
            sync = {"synced_gpus": False} if is_sharded(self.model) else {}
            with gathered(self.model), library_generation_defaults(self.model):
                sequences = self.model.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **sync
                )
        finally:
            self.model.train(was_training)
        return sequences[:, prompt_ids.shape[1] :]


@contextlib.contextmanager
def library_generation_defaults(model: nn.Module) -> Iterator[None]:
    """transformers fills every field our GenerationConfig leaves unset from the checkpoint's own
    ``generation_config`` (an instruct model's top_k=20, min_p, typical_p, num_beams ...), which would
    change the sampling distribution without the log-probs knowing. For the call, the model's
    defaults are the library's, so sampling is exactly what the trainer's config says."""
    from transformers import GenerationConfig

    target = unwrap_peft(model)
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


def is_conversational(prompt: Any) -> bool:
    """A chat prompt is a list of {"role": ..., "content": ...} messages."""
    return (
        isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]
    )


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])`` with each sequence right-aligned (left padding for generation)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[Any],
    max_prompt_length: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokenise prompts (rendering chat messages with the chat template) and left-pad them.

    Prompts longer than ``max_prompt_length`` keep their last tokens (the end of a prompt is what the
    completion continues). Returns ``(ids [P, Lp], mask [P, Lp], number of prompts truncated)``.
    """
    if is_conversational(prompts[0]):
        texts = [
            tokenizer.apply_chat_template(
                p, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
            )
            for p in prompts
        ]
        add_special = False  # the template already holds BOS and friends
    else:
        texts = list(prompts)
        add_special = True
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"prompt {i} is {type(text).__name__}; expected text or a list of chat messages")
    encoded = tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    return truncate_and_pad(
        encoded,
        max_prompt_length,
        tokenizer.pad_token_id,
        lambda i: f"prompt {i} ({prompts[i]!r}) encodes to",
    )


def truncate_and_pad(
    encoded: list[list[int]], max_prompt_length: int | None, pad_id: int, describe: Callable[[int], str]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep each prompt's last ``max_prompt_length`` tokens (the end is what the completion continues),
    refuse empty ones (``describe(i)`` names prompt i), left-pad. Returns ``(ids, mask, truncated)``."""
    truncated = 0
    if max_prompt_length is not None:
        truncated = sum(len(ids) > max_prompt_length for ids in encoded)
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"{describe(i)} no tokens; the policy needs a prompt to continue")
    ids, mask = left_pad(encoded, pad_id)
    return ids, mask, truncated


def encode_rows(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    max_prompt_length: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list, torch.Tensor, torch.Tensor, int]:
    """Prompts of dataset rows: a "prompt" column (text or chat messages), or already tokenised
    "input_ids" (legacy TRL PPO datasets), whose decoded text then stands for the prompt that reward
    functions see. Returns ``(prompts [P], ids [P, Lp], mask [P, Lp], number truncated)``."""
    if "prompt" in rows[0]:
        prompts = [row["prompt"] for row in rows]
        return (prompts, *encode_prompts(tokenizer, prompts, max_prompt_length, chat_template_kwargs))
    encoded = [list(row["input_ids"]) for row in rows]
    ids, mask, truncated = truncate_and_pad(
        encoded, max_prompt_length, tokenizer.pad_token_id, lambda i: f"row {i}'s input_ids hold"
    )
    kept = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    return tokenizer.batch_decode(kept, skip_special_tokens=True), ids, mask, truncated


def completion_mask(
    completion_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [B, T], is_truncated [B])``: 1 up to and including the first EOS; truncated = no EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    length = completion_ids.shape[1]
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long)
    )
    positions = torch.arange(length, device=completion_ids.device)[None, :]
    mask = (positions <= first_eos[:, None]).long()
    return mask, ~has_eos


@dataclasses.dataclass
class Rollout:
    """Sampled completions of one generation batch. B = prompts * n; a prompt's n completions are
    consecutive (one group)."""

    prompt_ids: torch.Tensor  # [B, Lp] left-padded
    prompt_mask: torch.Tensor  # [B, Lp]
    completion_ids: torch.Tensor  # [B, Lc] right-padded with the pad id
    completion_mask: torch.Tensor  # [B, Lc] 1 up to and including the first EOS
    is_truncated: torch.Tensor  # [B] bool: hit max_new_tokens without an EOS
    prompts: list  # [B] the prompts as given (text or messages)
    completions: list  # [B] decoded text, or [{"role": "assistant", "content": text}] for chat prompts
    completion_id_lists: list[list[int]]  # [B] completion ids without padding
    columns: dict[str, list]  # other dataset columns, [B] each
    num_truncated_prompts: int  # prompts cut to max_prompt_length
    sampling_logprobs: torch.Tensor | None = None  # [B, Lc] the sampler's own, 0 at padding; None: none
    sampling_logprobs_untruncated: bool = False  # they are of softmax(logits / T) over the whole vocabulary

    @property
    def lengths(self) -> torch.Tensor:  # [B] completion lengths in tokens
        return self.completion_mask.sum(dim=1)


def sample_rollout(
    sampler: Sampler,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    n: int,
    settings: SamplingSettings,
    eos_token_ids: Sequence[int],
    device: torch.device,
    prompt_settings: PromptSettings = PromptSettings(),
) -> Rollout:
    """Sample ``n`` completions for each dataset row (which holds a "prompt" or "input_ids")."""
    prompts, prompt_ids, prompt_mask, truncated = encode_rows(
        tokenizer, rows, prompt_settings.max_prompt_length, prompt_settings.chat_template_kwargs
    )
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    sampled = sampler.generate(prompt_ids, prompt_mask, n, settings)
    if not isinstance(sampled, Completions):
        sampled = Completions(sampled)
    completion_ids = sampled.ids
    mask, is_truncated = completion_mask(completion_ids, eos_token_ids)
    logprobs = sampled.logprobs
    if logprobs is not None:
        if logprobs.shape != completion_ids.shape:
            raise ValueError(
                f"{type(sampler).__name__} returned log-probs of shape {tuple(logprobs.shape)} for "
                f"completions of shape {tuple(completion_ids.shape)}; they must match token for token"
            )
        logprobs = logprobs.float().masked_fill(~mask.bool(), 0.0)
    id_lists = [ids[: int(m.sum())].tolist() for ids, m in zip(completion_ids, mask, strict=True)]  # CPU sync
    texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
    repeated = [row for row in rows for _ in range(n)]
    repeated_prompts = [p for p in prompts for _ in range(n)]
    chat = is_conversational(prompts[0])
    columns = {}
    if prompt_settings.keep_columns:
        keys = [k for k in rows[0] if k not in PROMPT_COLUMNS]
        columns = {k: [row[k] for row in repeated] for k in keys}
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
        completion_ids=completion_ids,
        completion_mask=mask,
        is_truncated=is_truncated,
        prompts=repeated_prompts,
        completions=[[{"role": "assistant", "content": t}] for t in texts] if chat else texts,
        completion_id_lists=id_lists,
        columns=columns,
        num_truncated_prompts=truncated,
        sampling_logprobs=logprobs,
        sampling_logprobs_untruncated=logprobs is not None and sampled.untruncated,
    )


def sampler_old_logprobs(rollout: Rollout, sampler_name: str) -> torch.Tensor:
    """``[B, Lc]`` the rollout's sampling log-probs, to stand for the old policy's: only when they are
    of the distribution training takes log-probs of (never a truncated one mixed in silently)."""
    if rollout.sampling_logprobs is None or not rollout.sampling_logprobs_untruncated:
        what = (
            "no log-probs" if rollout.sampling_logprobs is None else "log-probs of a truncated distribution"
        )
        raise ValueError(
            f"old_logprobs_from_sampler=True, but {sampler_name} returned {what}: they cannot stand for "
            "the old policy's softmax(logits / temperature); set old_logprobs_from_sampler=False"
        )
    return rollout.sampling_logprobs


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of several generation batches' rows, in order: prompts left-padded and
    completions right-padded (pad id, mask 0, sampling log-prob 0) to the widest batch's."""
    if len(rollouts) == 1:
        return rollouts[0]

    def cat(name: str, value: float, left: bool = False) -> torch.Tensor:
        tensors = [getattr(r, name) for r in rollouts]
        width = max(t.shape[1] for t in tensors)
        pad = [((width - t.shape[1], 0) if left else (0, width - t.shape[1])) for t in tensors]
        return torch.cat([nn.functional.pad(t, p, value=value) for t, p in zip(tensors, pad, strict=True)])

    first = rollouts[0]
    return dataclasses.replace(
        first,
        prompt_ids=cat("prompt_ids", pad_token_id, left=True),
        prompt_mask=cat("prompt_mask", 0, left=True),
        completion_ids=cat("completion_ids", pad_token_id),
        completion_mask=cat("completion_mask", 0),
        is_truncated=torch.cat([r.is_truncated for r in rollouts]),
        prompts=[p for r in rollouts for p in r.prompts],
        completions=[c for r in rollouts for c in r.completions],
        completion_id_lists=[ids for r in rollouts for ids in r.completion_id_lists],
        columns={k: [v for r in rollouts for v in r.columns[k]] for k in first.columns},
        num_truncated_prompts=sum(r.num_truncated_prompts for r in rollouts),
        sampling_logprobs=None if first.sampling_logprobs is None else cat("sampling_logprobs", 0.0),
    )
