"""Test set-up: Triton runs through its interpreter on CPU, and GPU-only tests skip without CUDA.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, first (importing
torch does not import triton). On a CUDA machine the kernels compile for real.
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
