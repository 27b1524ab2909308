"""Every Triton kernel compiles for sm_90 (Hopper) through Triton's GPU compiler and ptxas, here,
without a GPU: the interpreter alone would accept code the GPU compiler rejects. Compiled as a real
launch is specialised; the variants the benchmark shapes use must not spill and must read the
logits 16 bytes at a time (compile_for_hopper.py prints every variant's registers, stack, shared
memory and SASS size: the record to compare a change against)."""

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


@pytest.mark.slow  # Triton's GPU compiler and ptxas for every kernel variant: about a minute
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
    tools = pathlib.Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"
    if (tools / "cuobjdump").exists() and (tools / "nvdisasm").exists():  # else only the compile is checked
        assert "(no cuobjdump/nvdisasm)" not in done.stdout
    regressions = [line for line in done.stdout.splitlines() if line.startswith("REGRESSION")]
    assert not regressions, "\n".join(regressions)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 84 kernel variants for sm_90" in done.stdout
