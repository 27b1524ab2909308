"""One full GRPO iteration, fastppo against TRL's GRPOTrainer, each phase timed apart (and one PPO
update of the same size, which has no peer: TRL 1.16 ships no PPOTrainer).

Both trainers get the same random-weight model (a real architecture config from ``models/``), the
same tokenizer, prompts, reward, batch, lengths and seed, and run one after the other in this
process, so the ratios come from one run on one machine. Generation has a fixed length: the
end token is suppressed until the last position (``min_new_tokens``), so no completion stops early and
every step trains exactly ``batch * (prompt_len + completion_len)`` tokens (checked afterwards
against each trainer's own ``completions/mean_length`` metric).

Phases (synchronised wall clock, median over the timed steps after warm-up):
  generation  sampling the completions (``model.generate`` in both trainers)
  scoring     old / reference log-probs of the rollout (no grad)
  rollout     generation + scoring + rewards + advantages (everything before the loss)
  training    the rest of the optimizer step: forward, loss, backward, optimizer, logging
  step        the whole iteration
Tokens/s counts prompt + completion tokens of the batch, per second of the training phase
(``train_tokens_per_s``) and of the whole step (``step_tokens_per_s``). On GPU,
``train_flop_fraction`` is 6 * nn.Linear weights * tokens (lm_head: completion tokens only, the
only ones either trainer computes logits for) over the training time and the GEMM rate measured in
the same run (attention scores and checkpoint recompute are not counted as useful work). Memory:
peak allocated / reserved CUDA bytes over the whole ``train()`` (weights, reference, optimizer state
included); ``resident_bytes`` is what was allocated before the first step. Each trainer runs its
own defaults (``optim`` says which optimizer); ``fastppo-fused-adamw`` is fastppo with TRL's, and
``fastppo-static`` fastppo sampling with its static-cache sampler (``cache_implementation="static"``).

With ``samplers`` (``--samplers``, all by default on the command line) the run also writes the
rollout table (``bench_rollout``): each sampler alone on the same workload, its own results file.

PPO rows (``algo="ppo"``) share the workload, the clock, the memory probes and the row format; one
PPO step is one rollout of ``batch`` completions and one epoch over it as a single mini-batch.

Run: ``python -m fastppo.benchmarks.bench_step [--quick] [--model qwen2.5-1.5b] [--out DIR]
[--trainers fastppo,trl|none] [--samplers all|none|generate,static,...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import report
from .common import (
    device_tag,
    environment,
    failure_note,
    matmul_flops_per_s,
    on_gpu,
    results_dir,
    write_results_in,
)
from .profiling import PhaseClock, StepProfiler

MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAMES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.2-1b")

# A model of the same architecture, shrunk so a CPU run takes seconds (shapes only; never a figure).
QUICK_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What one step benchmark trains; identical for every trainer in the run."""

    model: str = "qwen2.5-1.5b"  # a name in MODEL_NAMES (config JSON in models/)
    quick: bool = False  # shrink the model and the batch (CPU tests; the results say so)
    batch: int = 16  # completions per optimizer step (per_device_train_batch_size)
    num_generations: int = 8  # completions per prompt (the group)
    prompt_len: int = 128  # tokens per prompt (all prompts equal: no padding)
    completion_len: int = 256  # tokens per completion (fixed: the end token is held back until then)
    beta: float = 0.04  # > 0, so a reference model is built and scored in both trainers
    loss_type: str = "dapo"  # TRL 1.16's default
    gradient_checkpointing: bool = True  # TRL's default on GPU
    warmup_steps: int = 1  # steps run but not timed (compilation, allocator warm-up)
    timed_steps: int = 3  # median over these (the rollout table: full generation calls)
    seed: int = 0
    rollout_stop_share: float = 0.0  # rollout table: share of the vocabulary ending a completion (0: none)

    @classmethod
    def quick_settings(cls, model: str = "qwen2.5-0.5b", **overrides: Any) -> StepSettings:
        base = dict(
            model=model,
            quick=True,
            batch=8,
            num_generations=4,
            prompt_len=8,
            completion_len=16,
            gradient_checkpointing=False,
            timed_steps=2,
        )
        return cls(**{**base, **overrides})

    @property
    def tokens_per_step(self) -> int:
        return self.batch * (self.prompt_len + self.completion_len)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if on_gpu() and torch.cuda.is_bf16_supported() else torch.float32

    def check(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {self.model!r}")
        if self.batch % self.num_generations:
            raise ValueError(
                f"batch ({self.batch}) must be a multiple of num_generations ({self.num_generations})"
            )
        for name in ("prompt_len", "completion_len", "timed_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.rollout_stop_share < 1.0:
            raise ValueError(f"rollout_stop_share must be in [0, 1), got {self.rollout_stop_share}")


# --- the workload: model, tokenizer, prompts, reward --------------------------------------------------------


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())  # "Qwen2.5-0.5B", "qwen2_5_0_5b" -> "qwen2505b"


def model_config(name: str, quick: bool = False):
    """The architecture config of ``name`` from ``models/<name>.json`` (matched ignoring case and
    punctuation), with fresh random weights in mind: ids and shapes only."""
    from transformers import AutoConfig

    matches = [p for p in MODELS_DIR.glob("*.json") if _plain(p.stem) == _plain(name)]
    if not matches:
        found = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
        raise ValueError(f"no model config {name!r} in {MODELS_DIR} (found {found})")
    raw = json.loads(matches[0].read_text())
    if "model_type" not in raw:
        raise ValueError(f"{matches[0]} is not a transformers config (no 'model_type')")
    model_type = raw.pop("model_type")
    if quick:
        raw.update(QUICK_SHAPE)
        raw.pop("layer_types", None)  # per-layer lists sized for the real depth
    # The benchmark tokenizer has no BOS, and its end (and pad) token is the last id, V - 1. The
    # checkpoint's own special ids would point into a real tokenizer's vocabulary (and outside a
    # shrunk one).
    raw.update(bos_token_id=None, pad_token_id=None, eos_token_id=raw["vocab_size"] - 1)
    return AutoConfig.for_model(model_type, **raw)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over the names ``t0 .. t{V-1}``; the last, ``t{V-1}``, is the end token.

    Built in code (nothing is downloaded). The end token (also the pad token) is held back by
    ``min_new_tokens`` in both trainers' generation_kwargs: every completion runs to its full length.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    end = f"t{vocab_size - 1}"
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=end, pad_token=end, unk_token="t0")


def prompts_dataset(settings: StepSettings, vocab_size: int, rows: int = 512):
    """``rows`` distinct prompts of exactly ``prompt_len`` tokens (no padding anywhere)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, vocab_size - 1, (rows, settings.prompt_len), generator=gen)  # no end token
    return Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in row) for row in ids.tolist()]})


def token_sum_reward(completions: list, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """A cheap deterministic reward with spread inside each group (what it rewards is irrelevant here)."""
    return [float(sum(ids) % 13) for ids in completion_ids]


@dataclasses.dataclass
class Workload:
    """Everything both trainers share; the random weights live in ``model_dir`` (loaded fresh per trainer)."""

    settings: StepSettings
    model_dir: Path
    tokenizer: Any
    dataset: Any
    linear_params: int  # weights of all nn.Linear layers, lm_head included: 2 FLOPs each per token forward
    head_params: int  # lm_head's share of them (applied to completion tokens only, in both trainers)


def prepare_workload(settings: StepSettings, directory: Path) -> Workload:
    """Random-init the model (seeded, on the GPU when there is one), save it with its tokenizer."""
    from transformers import AutoModelForCausalLM

    settings.check()
    config = model_config(settings.model, settings.quick)
    tokenizer = build_tokenizer(config.vocab_size)
    torch.manual_seed(settings.seed)
    with torch.device("cuda" if on_gpu() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=settings.dtype)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    _release()
    dataset = prompts_dataset(settings, config.vocab_size)
    return Workload(settings, directory, tokenizer, dataset, linear, head)


def load_policy(workload: Workload):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=workload.settings.dtype)


# --- the trainers compared ----------------------------------------------------------------------------------


def grpo_arguments(settings: StepSettings, output_dir: Path, steps: int) -> dict[str, Any]:
    """GRPOConfig keywords both trainers receive (TRL names; fastppo's config takes the same)."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch,
        num_generations=settings.num_generations,
        max_completion_length=settings.completion_len,
        beta=settings.beta,
        loss_type=settings.loss_type,
        max_steps=steps,
        logging_steps=1,
        gradient_checkpointing=settings.gradient_checkpointing,
        bf16=settings.dtype == torch.bfloat16,
        seed=settings.seed,
        disable_tqdm=True,
        report_to="none",
        save_strategy="no",
        log_level="error",
        generation_kwargs={"min_new_tokens": settings.completion_len},  # no early end token
    )


def ppo_arguments(settings: StepSettings, output_dir: Path, steps: int) -> dict[str, Any]:
    """PPOConfig keywords for the same work as one GRPO step: ``batch`` completions of
    ``completion_len`` tokens, one rollout per optimizer step (one epoch, one mini-batch)."""
    args = grpo_arguments(settings, output_dir, steps)
    for name in ("num_generations", "max_completion_length", "beta", "loss_type"):
        del args[name]
    return dict(
        args,
        response_length=settings.completion_len,
        kl_coef=settings.beta,
        num_ppo_epochs=1,
        num_mini_batches=1,
        local_rollout_forward_batch_size=settings.batch,
    )


TRL_OPTIM = "adamw_torch_fused"  # TRL 1.16's default with torch >= 2.8 (each row records its optim)


def _build_fastppo(model, workload: Workload, args: dict[str, Any]):
    from fastppo.grpo_config import GRPOConfig
    from fastppo.trainer.grpo import GRPOTrainer

    return GRPOTrainer(
        model=model,
        reward_funcs=token_sum_reward,
        args=GRPOConfig(**args),
        train_dataset=workload.dataset,
        processing_class=workload.tokenizer,
    )


def _build_fastppo_ppo(model, workload: Workload, args: dict[str, Any]):
    from fastppo.ppo_config import PPOConfig
    from fastppo.trainer.ppo import PPOTrainer

    return PPOTrainer(
        args=PPOConfig(**args),
        processing_class=workload.tokenizer,
        model=model,
        reward_model=token_sum_reward,
        train_dataset=workload.dataset,
    )


def _build_trl(model, workload: Workload, args: dict[str, Any], liger: bool = False):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(**args, use_liger_kernel=liger)  # the same loss as fastppo's at both defaults
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=token_sum_reward,
        args=config,
        train_dataset=workload.dataset,
        processing_class=workload.tokenizer,
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


# The phases of each trainer, by its own methods. rollout = everything before the loss (TRL's
# _generate_and_score_completions; fastppo's steps 1-3); generation = the sampling call on token
# ids (tokenising and decoding stay in rollout, for both); scoring = log-prob forwards in rollout.


def _instrument_trl(trainer, clock: PhaseClock) -> None:
    clock.wrap(trainer, "_generate_and_score_completions", "rollout")
    clock.wrap(trainer, "_generate_single_turn", "generation")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", "scoring", inside="rollout")


def _instrument_fastppo(trainer, clock: PhaseClock) -> None:
    for step in ("_rollout", "_score", "_advantages"):
        clock.wrap(trainer, step, "rollout")
    clock.wrap(trainer.sampler, "generate", "generation")
    clock.wrap(trainer, "_score_minibatch", "scoring", inside="rollout")  # old and reference log-probs


def _instrument_fastppo_ppo(trainer, clock: PhaseClock) -> None:
    for step in ("_rollout", "_record", "_rewards_and_advantages"):
        clock.wrap(trainer, step, "rollout")
    clock.wrap(trainer.sampler, "generate", "generation")
    clock.wrap(trainer, "_old_scores", "scoring", inside="rollout")  # old, reference log-probs and values


def _missing(*modules: str, gpu: bool = False) -> Callable[[], str | None]:
    def reason() -> str | None:
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        if absent:
            return f"not installed: {', '.join(absent)}"
        if gpu and not on_gpu():
            return "needs a CUDA GPU"
        return None

    return reason


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """One trainer in the comparison: how to build it, how to split its step into phases."""

    name: str
    algo: str  # "grpo" or "ppo"
    build: Callable[[Any, Workload, dict[str, Any]], Any]
    instrument: Callable[[Any, PhaseClock], None]
    unavailable: Callable[[], str | None]  # None when it can run here, else why not
    baseline: bool = False  # the peer the ratios of this algo are taken against
    arguments: Callable[[StepSettings, Path, int], dict[str, Any]] = grpo_arguments  # its config keywords


TRAINERS: dict[str, TrainerSpec] = {
    spec.name: spec
    for spec in (
        TrainerSpec("fastppo", "grpo", _build_fastppo, _instrument_fastppo, _missing("fastppo.trainer.grpo")),
        TrainerSpec("trl", "grpo", _build_trl, _instrument_trl, _missing("trl"), baseline=True),
        # fastppo with TRL's optimizer instead of its 8-bit default: the like-for-like memory ratio.
        TrainerSpec(
            "fastppo-fused-adamw",
            "grpo",
            _build_fastppo,
            _instrument_fastppo,
            _missing("fastppo.trainer.grpo"),
            arguments=lambda settings, output_dir, steps: dict(
                grpo_arguments(settings, output_dir, steps), optim=TRL_OPTIM
            ),
        ),
        # fastppo sampling with its static-cache sampler (compiled decode on CUDA, samplers.static).
        TrainerSpec(
            "fastppo-static",
            "grpo",
            _build_fastppo,
            _instrument_fastppo,
            _missing("fastppo.trainer.grpo"),
            arguments=lambda settings, output_dir, steps: dict(
                grpo_arguments(settings, output_dir, steps), cache_implementation="static"
            ),
        ),
        # TRL 1.16 has no PPOTrainer to race: the PPO row stands alone (no ratios).
        TrainerSpec(
            "fastppo-ppo",
            "ppo",
            _build_fastppo_ppo,
            _instrument_fastppo_ppo,
            _missing("fastppo.trainer.ppo"),
            arguments=ppo_arguments,
        ),
        # Liger's kernels are Triton-on-CUDA only; TRL 1.16 applies its layer kernels (not its loss).
        # run() measures it last: Liger may patch transformers' modules for the rest of the process.
        TrainerSpec(
            "trl+liger",
            "grpo",
            lambda m, w, a: _build_trl(m, w, a, liger=True),
            _instrument_trl,
            _missing("trl", "liger_kernel", gpu=True),
        ),
    )
}


# --- measuring one trainer ----------------------------------------------------------------------------------


def _release() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()


def _step_callback(
    clock: PhaseClock, profiler: StepProfiler | None, profile_step: int, on_step: Callable[[], None] | None
):
    """Step boundaries at ``on_train_begin`` and each ``on_step_end``.

    Not ``on_step_begin``: trainers fire it at different points (TRL before its rollout, fastppo at
    the first backward, after it), while from one step's end to the next is the whole iteration in
    both. Logging that follows ``on_step_end`` lands in the next step, in both trainers alike.
    """
    from transformers import TrainerCallback

    def boundary() -> None:
        if profiler is not None and len(clock.steps) == profile_step:
            profiler.start()
        clock.begin_step()

    class StepBoundaries(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            boundary()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end_step()
            if profiler is not None and len(clock.steps) == profile_step + 1:
                profiler.stop()
            if on_step is not None:
                on_step()
            boundary()

    return StepBoundaries()


def measure(
    spec: TrainerSpec,
    workload: Workload,
    work_dir: Path,
    profile_dir: Path | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train ``warmup + timed`` steps (+ 1 profiled) with ``spec``'s trainer; return its row."""
    settings = workload.settings
    _release()
    torch.manual_seed(settings.seed)
    timed_end = settings.warmup_steps + settings.timed_steps
    steps = timed_end + (profile_dir is not None)  # the profiled step comes after the timed ones
    trainer = spec.build(
        load_policy(workload), workload, spec.arguments(settings, work_dir / spec.name, steps)
    )
    clock = PhaseClock()
    spec.instrument(trainer, clock)
    name = f"step-{spec.name}-{settings.model}-{device_tag()}"  # a CPU trace never replaces a GPU one
    profiler = StepProfiler(profile_dir, name) if profile_dir else None
    trainer.add_callback(_step_callback(clock, profiler, timed_end, on_step))
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if on_gpu() else None
    try:
        trainer.train()
    finally:
        clock.restore()
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if on_gpu() else (None, None)
    lengths = [
        log["completions/mean_length"]
        for log in trainer.state.log_history
        if "completions/mean_length" in log
    ]
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    attention = getattr(getattr(trainer.model, "config", None), "_attn_implementation", None)
    del trainer
    _release()

    clock.steps = clock.steps[:timed_end]  # a profiled step is never timed
    t = clock.medians(skip=settings.warmup_steps)
    rollout = t.get("rollout", 0.0)
    training = t["step"] - rollout
    tokens = settings.tokens_per_step
    measured_len = sum(lengths) / len(lengths) if lengths else None
    note = ""
    if measured_len is not None and abs(measured_len - settings.completion_len) > 0.5:
        note = f"completions averaged {measured_len:.1f} tokens, not {settings.completion_len}"
        warnings.warn(f"{spec.name}: {note}; its rates count the configured length", stacklevel=2)
    # fwd + bwd of the linear layers over every token; lm_head over completion tokens only
    trunk_flops = 6 * (workload.linear_params - workload.head_params) * tokens
    head_flops = 6 * workload.head_params * settings.batch * settings.completion_len
    return {
        "algo": spec.algo,
        "trainer": spec.name,
        "model": settings.model + (" (shrunk)" if settings.quick else ""),
        "batch": settings.batch,
        "num_generations": settings.num_generations,
        "prompt_len": settings.prompt_len,
        "completion_len": settings.completion_len,
        "completion_len_measured": measured_len,
        "tokens_per_step": tokens,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "optim": optim,
        "attention": attention,
        "step_ms": t["step"] * 1e3,
        "generation_ms": t.get("generation", 0.0) * 1e3,
        "scoring_ms": t.get("scoring", 0.0) * 1e3,
        "rollout_other_ms": (rollout - t.get("generation", 0.0) - t.get("scoring", 0.0)) * 1e3,
        "training_ms": training * 1e3,
        "train_tokens_per_s": tokens / training,
        "step_tokens_per_s": tokens / t["step"],
        "samples_per_s": settings.batch / t["step"],
        "train_flops": trunk_flops + head_flops,
        "resident_bytes": resident,
        "peak_allocated_bytes": peak[0],
        "peak_reserved_bytes": peak[1],
        "steps_timed": len(clock.steps) - settings.warmup_steps,
        "note": note,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of each row to its algo's baseline row (same process, same settings)."""
    for row in rows:
        base = next((r for r in rows if r["algo"] == row["algo"] and TRAINERS[r["trainer"]].baseline), None)
        if base is None or base is row:
            continue
        peer = base["trainer"]
        row[f"train_speedup_vs_{peer}"] = base["training_ms"] / row["training_ms"]
        row[f"step_speedup_vs_{peer}"] = base["step_ms"] / row["step_ms"]
        if row["peak_allocated_bytes"] and base["peak_allocated_bytes"]:
            row[f"peak_memory_vs_{peer}"] = row["peak_allocated_bytes"] / base["peak_allocated_bytes"]


# Why a trainer has no row when the run was stopped (SIGINT at the stage's limit) before or during it.
STOPPED = "not measured: the run was stopped at its time limit"


def run(
    settings: StepSettings,
    trainers: list[str] | None = None,
    out: Path | None = None,
    profile: bool = False,
    on_step: Callable[[], None] | None = None,
    samplers: list[str] = (),
) -> Path:
    """Measure each available trainer on one workload, and each sampler of ``samplers`` on the same
    workload (``bench_rollout``: its own results file, named in this one's ``rollout_results``);
    write and return the step results JSON."""
    from .bench_rollout import SAMPLERS, measure_sampler  # it builds on this module's workload
    from .bench_rollout import add_ratios as add_rollout_ratios

    env = environment()
    out_dir = results_dir(out)
    names = list(TRAINERS) if trainers is None else list(trainers)
    for unknown, known in (
        ([n for n in names if n not in TRAINERS], TRAINERS),
        ([n for n in samplers if n not in SAMPLERS], SAMPLERS),
    ):
        if unknown:
            raise ValueError(f"unknown trainer(s) or sampler(s) {unknown}; known: {list(known)}")
    if not settings.quick and not on_gpu():
        warnings.warn("full-size step benchmark on CPU: this takes very long; use --quick", stacklevel=2)
    # Fraction of the matmul floor: train_flops over the measured bf16 GEMM rate. GPU only: a tiny
    # CPU model against a CPU GEMM rate is no floor (it can exceed 100%).
    rate = matmul_flops_per_s(dtype=settings.dtype) if on_gpu() else None
    rows, skipped, rollout_rows, rollout_skipped = [], {}, [], {}
    rollout_name = f"rollout-{settings.model}"

    def write(workload: Workload) -> Path:
        """The results so far (rewritten after each trainer and sampler: a run stopped at its time
        limit, or one that fails, keeps the rows already measured)."""
        for row in rows:
            row["train_flop_fraction"] = (
                row["train_flops"] / (row["training_ms"] * 1e-3) / rate if rate else None
            )
        add_ratios(rows)
        extra = {
            "settings": dataclasses.asdict(settings),
            "skipped": skipped,
            "matmul_flops_per_s": rate,
            "linear_params": workload.linear_params,
        }
        if samplers:
            add_rollout_ratios(rollout_rows)
            rollout = {"settings": extra["settings"], "skipped": rollout_skipped}
            extra["rollout_results"] = write_results_in(
                out_dir, rollout_name, env, rollout_rows, rollout
            ).name
        return write_results_in(out_dir, f"step-{settings.model}", env, rows, extra)

    with tempfile.TemporaryDirectory(prefix="fastppo-bench-") as tmp:
        workload = prepare_workload(settings, Path(tmp) / "model")
        tables = {  # kind -> (its rows, its skipped, its specs, how one is measured)
            "trainer": (
                rows,
                skipped,
                TRAINERS,
                lambda spec: measure(spec, workload, Path(tmp), out_dir if profile else None, on_step),
            ),
            "sampler": (
                rollout_rows,
                rollout_skipped,
                SAMPLERS,
                lambda spec: measure_sampler(spec, workload, Path(tmp)),
            ),
        }
        # Liger patches transformers' modules for the rest of the process: its trainer always runs last.
        plan = [("trainer", n) for n in names if "liger" not in n] + [("sampler", n) for n in samplers]
        plan += [("trainer", n) for n in names if "liger" in n]
        path = write(workload)
        for position, (kind, name) in enumerate(plan):
            table_rows, table_skipped, specs, measure_one = tables[kind]
            reason = specs[name].unavailable()
            if reason:
                table_skipped[name] = reason
                continue
            try:
                table_rows.append(measure_one(specs[name]))
            except KeyboardInterrupt:  # the stage's time limit (SIGINT): say who went unmeasured
                for unmeasured_kind, unmeasured in plan[position:]:
                    tables[unmeasured_kind][1].setdefault(unmeasured, STOPPED)
                write(workload)
                raise
            except Exception as error:  # the others' rows still count
                if isinstance(error, torch.OutOfMemoryError):
                    table_skipped[name] = "out of memory"
                else:
                    table_skipped[name] = failure_note(error)
                warnings.warn(f"{name}: {table_skipped[name]}", stacklevel=2)
            _release()  # outside the except block: its traceback would keep the failed one alive
            path = write(workload)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shrunk model and batch (CPU smoke run)")
    parser.add_argument(
        "--model", default=None, choices=MODEL_NAMES, help="architecture (default qwen2.5-1.5b)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    parser.add_argument("--profile", action="store_true", help="Chrome trace + top kernels of one extra step")
    parser.add_argument("--trainers", default=None, help=f"comma list of {list(TRAINERS)}, or 'none'")
    parser.add_argument(
        "--samplers",
        default="all",
        help="rollout table: comma list of bench_rollout.SAMPLERS, 'all' (default) or 'none'",
    )
    for name in ("batch", "num_generations", "prompt_len", "completion_len", "timed_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument(
        "--rollout-stop-share",
        type=float,
        default=None,
        help="rollout table: share of the vocabulary that ends a completion (default 0: fixed lengths)",
    )
    return parser.parse_args(argv)


def sampler_names(value: str) -> list[str]:
    """``--samplers``: 'all', 'none' or a comma list."""
    from .bench_rollout import SAMPLERS

    if value == "all":
        return list(SAMPLERS)
    return [] if value == "none" else value.split(",")


def settings_from(args: argparse.Namespace) -> StepSettings:
    sizes = {
        k: getattr(args, k)
        for k in ("batch", "num_generations", "prompt_len", "completion_len", "timed_steps")
        if getattr(args, k, None) is not None
    }
    if getattr(args, "rollout_stop_share", None) is not None:
        sizes["rollout_stop_share"] = args.rollout_stop_share
    if args.quick:
        return StepSettings.quick_settings(args.model or "qwen2.5-0.5b", **sizes)
    return StepSettings(model=args.model or "qwen2.5-1.5b", **sizes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trainers = None if args.trainers is None else [] if args.trainers == "none" else args.trainers.split(",")
    path = run(settings_from(args), trainers, args.out, args.profile, samplers=sampler_names(args.samplers))
    result = json.loads(path.read_text())
    if trainers != []:
        print(report.result_table(result))
        print(f"wrote {path}")
    if result.get("rollout_results"):
        rollout = path.parent / result["rollout_results"]
        print(report.result_table(json.loads(rollout.read_text())))
        print(f"wrote {rollout}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
