"""Every Triton kernel compiles for sm_90 (Hopper) through Triton's GPU compiler and ptxas, here,
without a GPU: the interpreter alone would accept code the GPU compiler rejects."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("compile_for_hopper.py")


def nvidia_backend_present() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return False
    bin_dir = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists()


@pytest.mark.skipif(not nvidia_backend_present(), reason="triton without its NVIDIA backend / ptxas")
def test_all_kernels_compile_for_hopper(tmp_path):
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path),
        "TRITON_DEFAULT_FP_FUSION": "1",
    }
    done = subprocess.run(
        [sys.executable, "-P", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 63 kernel variants for sm_90" in done.stdout
