"""Which implementation serves a call: the Triton kernels or the PyTorch reference."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: Backend, tensor: torch.Tensor) -> Literal["triton", "torch"]:
    """Pick the implementation for ``tensor``'s device.

    ``auto`` uses Triton for CUDA tensors only, and not for float64 ones (the kernels compute in
    float32); the others take the reference, which is exact and chunked. ``triton`` on a CPU tensor
    is allowed only under the interpreter (that is how the kernels are tested without a GPU).
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        fits = tensor.is_cuda and tensor.dtype != torch.float64
        return "triton" if fits and triton_available() else "torch"
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not triton_available():
        raise ValueError("backend='triton' was asked for but triton is not installed")
    if not tensor.is_cuda and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {tensor.device}) "
            "unless TRITON_INTERPRET=1 is set"
        )
    return "triton"
