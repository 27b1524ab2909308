"""The rollout table of ``fastppo bench step``: each sampler alone on the step job's prompts and
lengths, fastppo's beside TRL's own generation paths.

Rows (in the order they run, so a run stopped at its time limit keeps the ones that matter most):
  generate                    fastppo's default: ``model.generate``, dynamic cache (fastppo.rollout)
  static                      static cache in prompt buckets, decode compiled on CUDA (samplers.static)
  continuous-batching         transformers' continuous batching, TRL's config (samplers.continuous)
  trl-generate                TRL 1.16 GRPOTrainer's own ``_generate_single_turn``, generate path
  trl-continuous-batching     the same with ``use_transformers_continuous_batching=True``
Each gets a freshly loaded copy of the workload's random-weight model, the same prompts
(``batch / num_generations`` of them, ``num_generations`` completions each), temperature 1, no
top-k/top-p, and ``completion_len`` new tokens: no end token at all (every completion runs to its
length, as in the step table) unless ``rollout_stop_share`` makes that share of the vocabulary end
a completion (lengths then vary, and padding shows).

Columns: ``warmup_ms`` the first call (compiles and graph captures land here), ``first_token_ms``
a call for one new token (every completion's first token: prefill and one sample),
``last_token_ms`` the median full call (every completion finished), ``tokens_per_s`` generated
tokens (end token included) over that call, ``padding_waste`` the share of decoded row-steps spent on
completions already finished (lockstep decoding runs every row to the batch's longest; continuous
batching lets finished rows leave, 0 by construction), ``peak_allocated_bytes`` over the timed
calls (CUDA), ``graphs_compiled`` by torch.compile during the timed calls (0: no recompiles once
warm). CPU rows are smoke tests, never figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .bench_step import TRAINERS, Workload, _build_trl, _missing, _release, grpo_arguments, load_policy
from .common import on_gpu

# prompt id lists, completions per prompt, new tokens -> completion id lists (prompt by prompt)
Generate = Callable[[list[list[int]], int, int], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One row of the rollout table: how to build its generation call over a loaded policy."""

    name: str
    build: Callable[[Any, Workload, Path], Generate]
    lockstep: bool  # every row of a batch decodes until the longest is done (padding waste)
    unavailable: Callable[[], str | None]


def end_tokens(workload: Workload) -> list[int]:
    """The ids that end a completion in the rollout table: none (fixed lengths), or the top
    ``rollout_stop_share`` of the vocabulary below the tokenizer's own end token."""
    vocab = len(workload.tokenizer)
    count = round(workload.settings.rollout_stop_share * vocab)
    return list(range(vocab - 1 - count, vocab - 1))


def _fastppo(kind: str) -> Callable[[Any, Workload, Path], Generate]:
    def build(policy, workload: Workload, work_dir: Path) -> Generate:
        from fastppo.rollout import Completions, GenerateSampler, SamplingSettings, left_pad
        from fastppo.samplers import ContinuousBatchingSampler, StaticCacheSampler

        pad, ends = workload.tokenizer.pad_token_id, end_tokens(workload)
        sampler = {
            "generate": lambda: GenerateSampler(policy, pad, ends),
            "static": lambda: StaticCacheSampler(policy, pad, ends, workload.settings.prompt_len),
            "continuous-batching": lambda: ContinuousBatchingSampler(policy, pad, ends),
        }[kind]()

        def generate(prompts: list[list[int]], n: int, new_tokens: int) -> list[list[int]]:
            ids, mask = left_pad(prompts, pad)
            settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0)
            sampled = sampler.generate(ids.to(policy.device), mask.to(policy.device), n, settings)
            return (sampled.ids if isinstance(sampled, Completions) else sampled).tolist()

        return generate

    return build


def _trl(continuous: bool) -> Callable[[Any, Workload, Path], Generate]:
    def build(policy, workload: Workload, work_dir: Path) -> Generate:
        settings = workload.settings
        args = grpo_arguments(settings, work_dir / f"trl-rollout-{continuous}", steps=1)
        # no reference (beta 0: generation only) and the table's end tokens instead of min_new_tokens
        args.update(beta=0.0, generation_kwargs={"eos_token_id": end_tokens(workload)})
        if continuous:
            args["use_transformers_continuous_batching"] = True
            if not on_gpu():  # as fastppo's sampler does on CPU: the engine's RAM-based sizing is slow
                from fastppo.samplers.continuous import cpu_cache_sizes

                requests = settings.batch
                args["transformers_continuous_batching_config"] = cpu_cache_sizes(
                    requests, settings.prompt_len, settings.completion_len
                )
        trainer = _build_trl(policy, workload, args)
        trainer.eos_token_ids = end_tokens(workload)  # where TRL cuts its completions: the table's ends

        def generate(prompts: list[list[int]], n: int, new_tokens: int) -> list[list[int]]:
            repeated = [prompt for prompt in prompts for _ in range(n)]  # as TRL's RepeatSampler feeds it
            with _trl_new_tokens(trainer, new_tokens):
                completions, _ = trainer._generate_single_turn(repeated, None, {}, n)
            return [list(c) for c in completions]

        return generate

    return build


@contextlib.contextmanager
def _trl_new_tokens(trainer, new_tokens: int) -> Iterator[None]:
    """TRL's generation length for one call (its config and the kwargs it forces onto the model)."""
    config, kwargs = trainer.generation_config, trainer.generation_kwargs
    saved = config.max_new_tokens
    config.max_new_tokens = kwargs["max_new_tokens"] = new_tokens
    try:
        yield
    finally:
        config.max_new_tokens = kwargs["max_new_tokens"] = saved


_available = TRAINERS["fastppo"].unavailable
SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("generate", _fastppo("generate"), True, _available),
        SamplerSpec("static", _fastppo("static"), True, _available),
        SamplerSpec("continuous-batching", _fastppo("continuous-batching"), False, _available),
        SamplerSpec("trl-generate", _trl(False), True, _missing("trl")),
        SamplerSpec("trl-continuous-batching", _trl(True), False, _missing("trl")),
    )
}
BASELINE = "trl-generate"  # TRL's default rollout: the ratios are taken against it


def _sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    start = time.perf_counter()
    result = call()
    _sync()
    return time.perf_counter() - start, result


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _ended(completion: list[int], ends: set[int]) -> list[int]:
    """A completion up to and including its first end token (the trainers' completion mask)."""
    for i, token in enumerate(completion):
        if token in ends:
            return completion[: i + 1]
    return completion


def measure_sampler(spec: SamplerSpec, workload: Workload, work_dir: Path) -> dict[str, Any]:
    """Warm-up call, a one-token call, then ``timed_steps`` full calls; the row of ``spec``
    (medians over the timed calls)."""
    settings = workload.settings
    _release()
    torch.manual_seed(settings.seed)
    policy = load_policy(workload).to("cuda" if on_gpu() else "cpu")
    generate = spec.build(policy, workload, work_dir)
    texts = workload.dataset[: settings.batch // settings.num_generations]["prompt"]
    prompts = workload.tokenizer(texts, add_special_tokens=False)["input_ids"]
    n, length, ends = settings.num_generations, settings.completion_len, set(end_tokens(workload))
    warmup, _ = _timed(lambda: generate(prompts, n, length))
    first, _ = _timed(lambda: generate(prompts, n, 1))
    if on_gpu():
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if on_gpu() else None
    graphs = _graphs_compiled()
    calls = []  # (seconds, completion lengths) of each timed call
    for _ in range(settings.timed_steps):
        seconds, completions = _timed(lambda: generate(prompts, n, length))
        calls.append((seconds, [len(_ended(c, ends)) for c in completions]))
    peak = torch.cuda.max_memory_allocated() if on_gpu() else None
    graphs = _graphs_compiled() - graphs
    seconds, lengths = calls[sorted(range(len(calls)), key=lambda i: calls[i][0])[len(calls) // 2]]
    generated = sum(lengths)
    note = f"{len(lengths)} completions, not {settings.batch}" if len(lengths) != settings.batch else ""
    return {
        "sampler": spec.name,
        "model": settings.model + (" (shrunk)" if settings.quick else ""),
        "batch": settings.batch,
        "num_generations": n,
        "prompt_len": settings.prompt_len,
        "completion_len": length,
        "completion_len_measured": generated / len(lengths),
        "dtype": str(settings.dtype).removeprefix("torch."),
        "warmup_ms": warmup * 1e3,
        "first_token_ms": first * 1e3,
        "last_token_ms": seconds * 1e3,
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds,
        "padding_waste": 1 - generated / (len(lengths) * max(lengths)) if spec.lockstep else 0.0,
        "resident_bytes": resident,
        "peak_allocated_bytes": peak,
        "graphs_compiled": graphs,
        "calls_timed": len(calls),
        "note": note,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's tokens/s over TRL's default rollout's (same process, same prompts and lengths)."""
    base = next((r for r in rows if r["sampler"] == BASELINE), None)
    if base is None:
        return
    for row in rows:
        if row is not base:
            row[f"rollout_speedup_vs_{BASELINE}"] = row["tokens_per_s"] / base["tokens_per_s"]
