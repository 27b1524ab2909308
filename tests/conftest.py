"""Test set-up: Triton runs through its interpreter on CPU, GPU-only tests skip without CUDA, and the
factories the trainer-side tests share (tiny models, short-run configs, a GRPO trainer, a reward
function, ragged batches).

TRITON_INTERPRET must be set before anything imports triton, so it is set here, first (importing
torch does not import triton). On a CUDA machine the kernels compile for real.

Marks: ``gpu`` (skipped on CPU) and ``slow`` (learning runs, multi-process launches, compiling,
subprocess runs): ``pytest -m "not slow"`` is the fast lane, ``pytest -q`` runs everything.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download a model or dataset in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    """Refuse, with the fix, a Triton interpreter that cannot run on this numpy: before Triton 3.7
    the interpreter turns one-element arrays into ints, which numpy 2.4 made a TypeError
    (triton-lang/triton#9171), so every kernel test would fail deep inside Triton instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton
    from packaging.version import Version

    if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        pytest.exit(
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
            "(triton-lang/triton#9171): install numpy<2.4 or triton>=3.7 to run the kernel tests on CPU",
            returncode=4,
        )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """``save(layers=2, hidden_size=32) -> path``: the demo's tokenizer and a tiny random Llama saved
    with save_pretrained, as a user's local checkpoint (one folder per shape for the session)."""
    from fastppo.demo import build_policy, build_tokenizer

    saved: dict[tuple[int, int], str] = {}

    def save(layers: int = 2, hidden_size: int = 32) -> str:
        if (layers, hidden_size) not in saved:
            path = tmp_path_factory.mktemp(f"tiny-llama-{layers}x{hidden_size}")
            tokenizer = build_tokenizer()
            build_policy(tokenizer, seed=0, hidden_size=hidden_size, layers=layers).save_pretrained(path)
            tokenizer.save_pretrained(path)
            saved[layers, hidden_size] = str(path)
        return saved[layers, hidden_size]

    return save


@pytest.fixture(scope="session")
def model_dir(saved_tiny_model) -> str:
    """The tiny model folder most trainer tests load (2 layers, hidden size 32)."""
    return saved_tiny_model()


# A short, quiet run: a log record every step, no reporting integration, progress bar or checkpoint.
QUIET_RUN = dict(logging_steps=1, report_to="none", disable_tqdm=True, save_strategy="no")


@pytest.fixture
def grpo_config(tmp_path):
    """``grpo_config(shape=None, **fields) -> GRPOConfig``: a quiet short run writing to
    ``tmp_path/out``, then a test file's ``shape`` (its batch and lengths), then ``fields``."""
    from fastppo import GRPOConfig

    def make(shape: dict | None = None, **fields) -> GRPOConfig:
        return GRPOConfig(**{"output_dir": str(tmp_path / "out"), **QUIET_RUN, **(shape or {}), **fields})

    return make


@pytest.fixture
def ppo_config(tmp_path):
    """``ppo_config(shape=None, **fields) -> PPOConfig``: as ``grpo_config``, writing to ``tmp_path``."""
    from fastppo import PPOConfig

    def make(shape: dict | None = None, **fields) -> PPOConfig:
        return PPOConfig(**{"output_dir": str(tmp_path), **QUIET_RUN, **(shape or {}), **fields})

    return make


def id_reward(completion_ids, **kwargs):
    """Varied, deterministic rewards so advantages are non-zero in every group."""
    return [float(len(ids) + ids[0] % 3) if ids else 0.0 for ids in completion_ids]


@pytest.fixture(name="id_reward", scope="session")
def id_reward_fixture():
    """``id_reward``: a reward function of the completion ids (TRL's convention)."""
    return id_reward


DEMO_PROMPTS = ("say : cat", "say : dog", "say : sun", "say : red")
# grpo_trainer's run unless a test file gives its own shape: 2 prompts x 4 completions a rollout.
TRAINER_RUN = dict(
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=4,
    max_steps=2,
    learning_rate=1e-2,
    lr_scheduler_type="linear",
)


@pytest.fixture
def grpo_trainer(grpo_config, id_reward):
    """``grpo_trainer(shape=TRAINER_RUN, *, model=None, prompts=DEMO_PROMPTS, train_dataset=None,
    reward=None, cls=GRPOTrainer, model_seed=0, hidden_size=32, **fields)``: a GRPO trainer on the
    demo's tokenizer and a fresh tiny Llama (or ``model``: a module, or a path loaded with its own
    tokenizer), rewarded by ``id_reward`` unless told, over ``prompts`` unless ``train_dataset``."""
    import datasets

    from fastppo import GRPOTrainer
    from fastppo.demo import build_policy, build_tokenizer

    def make(
        shape: dict | None = None,
        *,
        model=None,
        prompts=DEMO_PROMPTS,
        train_dataset=None,
        reward=None,
        cls=GRPOTrainer,
        model_seed: int = 0,
        hidden_size: int = 32,
        **fields,
    ):
        tokenizer = build_tokenizer()
        if model is None:
            model = build_policy(tokenizer, seed=model_seed, hidden_size=hidden_size)
        return cls(
            model=model,
            processing_class=None if isinstance(model, str) else tokenizer,
            reward_funcs=reward or id_reward,
            args=grpo_config(TRAINER_RUN if shape is None else shape, **fields),
            train_dataset=train_dataset
            if train_dataset is not None
            else datasets.Dataset.from_dict({"prompt": list(prompts)}),
        )

    return make


# The shape of every tiny model built from a config in the tests (attention heads 4, KV heads 2).
TINY_SHAPE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
)


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(arch="llama", head="causal_lm", **config)``: a randomly initialised transformers
    Llama or Qwen2 of ``TINY_SHAPE`` with ``config`` on top; ``head="sequence_classification"``: a
    one-output sequence-classification model (a reward or value model)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        ("llama", "causal_lm"): (LlamaConfig, LlamaForCausalLM),
        ("qwen2", "causal_lm"): (Qwen2Config, Qwen2ForCausalLM),
        ("llama", "sequence_classification"): (LlamaConfig, LlamaForSequenceClassification),
    }

    def build(arch: str = "llama", head: str = "causal_lm", **config):
        config_cls, model_cls = classes[arch, head]
        extra = {"num_labels": 1} if head == "sequence_classification" else {}
        return model_cls(config_cls(**{**TINY_SHAPE, **extra, **config}))

    return build


@pytest.fixture(scope="session")
def ragged_batch():
    """``ragged_batch(vocab, seed=0) -> PolicyBatch``: left-padded prompts and right-padded
    completions of different lengths (one row without padding), advantages and reference log-probs."""
    from fastppo.batch import PolicyBatch

    def make(vocab: int, seed: int = 0) -> PolicyBatch:
        g = torch.Generator().manual_seed(seed)
        rows, lp, lc = 4, 5, 7
        prompt_mask = torch.ones(rows, lp, dtype=torch.long)
        prompt_mask[0, :3] = 0
        prompt_mask[2, :1] = 0
        completion_mask = torch.ones(rows, lc, dtype=torch.long)
        completion_mask[0, 4:] = 0
        completion_mask[1, 2:] = 0
        completion_mask[3, 6:] = 0
        return PolicyBatch(
            prompt_ids=torch.randint(1, vocab, (rows, lp), generator=g),
            prompt_mask=prompt_mask,
            completion_ids=torch.randint(1, vocab, (rows, lc), generator=g),
            completion_mask=completion_mask,
            loss_mask=completion_mask.clone(),
            rows=torch.arange(rows),
            advantages=torch.randn(rows, generator=g),
            old_logprobs=None,
            ref_logprobs=-torch.rand(rows, lc, generator=g),
        )

    return make


@pytest.fixture
def pack_calls(monkeypatch) -> list[int]:
    """Rows of every batch the policy forwards pack (so a padded path cannot pass for packed)."""
    import fastppo.policy_forward as policy_forward

    calls, original = [], policy_forward.pack

    def spy(input_ids, attention_mask):
        calls.append(input_ids.shape[0])
        return original(input_ids, attention_mask)

    monkeypatch.setattr(policy_forward, "pack", spy)
    return calls
