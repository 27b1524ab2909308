"""linear_ppo_loss (hidden states in, no logits tensor) vs eager hidden @ W^T -> log_softmax ->
gather -> TRL's loss, Liger-Kernel's fused linear GRPO loss (GPU) and the bare matmuls:
forward+backward, bf16, N=16384 tokens, V=151936, H in {896, 1536, 3584}.

Floor: the three GEMMs (logits, grad_hidden, grad_weight) = 6*N*H*V FLOPs at the measured matmul
rate. Targets (H100/H200): within 1.15x of the bare matmuls, >= 5x Liger's speed at <= its memory,
peak memory independent of N beyond inputs and gradients. On GPU, ``fastppo[chunk=...]`` rows time
other chunk budgets than the default (the tuning sweep: 0.5, 2 and 4 GiB).
On CPU the script runs tiny sizes and checks the memory bound instead: peak RSS growth of one
forward+backward in a fresh subprocess, for two N, ours vs eager.

    python -P -m fastppo.benchmarks.bench_linear_loss [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from fastppo.kernels import linear_ppo_loss
from fastppo.kernels.linear_ppo_loss.chunked import DEFAULT_CHUNK_BYTES
from fastppo.kernels.ppo_loss import PolicyLossSettings

from .common import on_gpu
from .kernel_bench import Impl, Results, ceilings, measure, parse_args, policy_inputs
from .peers import eager_linear_policy_loss, liger_linear_grpo_loss

SETTINGS = PolicyLossSettings(beta=0.04, loss_type="dapo", temperature=0.7, clip_high=0.28)
SEQ_LEN = 512


def setup_case(n_tokens: int, hidden_size: int, vocab: int, device: str, dtype: torch.dtype) -> dict:
    tensors = policy_inputs(n_tokens, SEQ_LEN, device, old_logprob=-11.0)
    batch, length = tensors["mask"].shape
    hidden = torch.randn(batch, length, hidden_size, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) * hidden_size**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), device=device)
    return {"hidden": hidden, "weight": weight, "labels": labels, **tensors}


# The CPU memory check's chunk budget: below both of its token counts' logits, so the bound shows
# (the library default, sized for GPU throughput, would hold all of the smaller case in one chunk).
CPU_CHECK_CHUNK_BYTES = 256 * 2**20
# Chunk budgets a GPU run times beside the default: the candidates for DEFAULT_CHUNK_BYTES. Half a
# GiB is the memory side of the trade (Liger's fused linear GRPO loss peaks near 1 GB at H = 896).
SWEPT_CHUNK_GIB = (0.5, 2, 4)


def run_ours(t: dict, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    loss, _ = linear_ppo_loss(
        t["hidden"],
        t["weight"],
        t["labels"],
        t["old"],
        t["advantages"],
        t["mask"],
        ref_logprobs=t["ref"],
        beta=SETTINGS.beta,
        loss_type=SETTINGS.loss_type,
        temperature=SETTINGS.temperature,
        clip_high=SETTINGS.clip_high,
        chunk_bytes=chunk_bytes,
    )
    loss.backward()


def run_eager(t: dict) -> None:
    eager_linear_policy_loss(
        t["hidden"], t["weight"], t["labels"], t["old"], t["advantages"], t["mask"], SETTINGS, t["ref"]
    ).backward()


def implementations(t: dict) -> list[Impl]:
    def fresh(fn):
        def run():
            t["hidden"].grad = t["weight"].grad = None
            fn(t)

        return run

    h2 = t["hidden"].detach().reshape(-1, t["hidden"].shape[-1])
    w = t["weight"].detach()
    grad_logits = torch.empty(h2.shape[0], w.shape[0], device=h2.device, dtype=h2.dtype)

    def bare_matmuls():  # the three GEMMs any implementation must do: logits, grad_hidden, grad_weight
        torch.matmul(h2, w.T, out=grad_logits)
        torch.matmul(grad_logits, w)
        torch.matmul(grad_logits.T, h2)

    liger = liger_linear_grpo_loss(SETTINGS)
    impls = [
        Impl("fastppo", fresh(run_ours)),
        Impl("eager", fresh(run_eager)),
        Impl("bare_matmuls", bare_matmuls),
    ]
    if on_gpu():  # the tuning sweep: larger chunks, fewer rewrites of the weight gradient
        for gib in SWEPT_CHUNK_GIB:
            impls.append(
                Impl(
                    f"fastppo[chunk={gib:g}GiB]",
                    fresh(lambda t, size=int(gib * 2**30): run_ours(t, size)),
                    note=f"chunk_bytes {gib} GiB (default {DEFAULT_CHUNK_BYTES / 2**30:g} GiB)",
                )
            )
    if liger is not None:
        impls.append(
            Impl(
                "liger",
                fresh(
                    lambda t: liger(
                        t["hidden"], t["weight"], t["labels"], t["old"], t["advantages"], t["mask"], t["ref"]
                    ).backward()
                ),
            )
        )
    else:
        impls.append(Impl("liger", None, False, "needs CUDA and liger-kernel"))
    return impls


def rss_growth(impl: str, n_tokens: int, hidden_size: int, vocab: int) -> int:
    """Peak RSS growth (bytes) of one forward+backward in a fresh interpreter (CPU memory bound check).

    glibc raises its mmap threshold after each large free and then keeps freed chunk buffers in the
    heap, so RSS would grow with the number of chunks although the program holds one at a time;
    a fixed threshold (MALLOC_MMAP_THRESHOLD_) makes RSS show what is actually held.
    """
    code = (
        "import resource, torch; from fastppo.benchmarks import bench_linear_loss as b; "
        f"t = b.setup_case({n_tokens}, {hidden_size}, {vocab}, 'cpu', torch.float32); "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        + (f"b.run_ours(t, {CPU_CHECK_CHUNK_BYTES}); " if impl == "ours" else "b.run_eager(t); ")
        + "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout.split()[-1]) * 1024  # ru_maxrss is KiB on Linux


def cpu_memory_bound(vocab: int = 32000, hidden_size: int = 64) -> list[dict]:
    rows = []
    for impl in ("ours", "eager"):
        for n_tokens in (1024, 4096):  # both above one chunk of rows, so the bound shows
            rows.append(
                {
                    "check": "peak RSS growth, fwd+bwd",
                    "impl": "fastppo" if impl == "ours" else "eager",
                    "n_tokens": n_tokens,
                    "vocab": vocab,
                    "hidden": hidden_size,
                    "rss_growth_bytes": rss_growth(impl, n_tokens, hidden_size, vocab),
                    "logits_fp32_bytes": n_tokens * vocab * 4,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    gpu = on_gpu() and not args.quick
    device, dtype = ("cuda", torch.bfloat16) if on_gpu() else ("cpu", torch.float32)
    n_tokens, vocab = (16384, 151936) if gpu else (256, 4000)
    limits = ceilings()
    extra = {
        "ceilings": limits,
        "floor": "6*N*H*V FLOPs at the measured matmul rate",
        "settings": str(SETTINGS),
    }
    if not on_gpu():
        extra["memory_bound"] = cpu_memory_bound()
        print(json.dumps(extra["memory_bound"], indent=1))
    results = Results("linear_loss", args, extra)
    for hidden_size in (896, 1536, 3584) if gpu else (64,):
        tensors = setup_case(n_tokens, hidden_size, vocab, device, dtype)
        flops = 6 * n_tokens * hidden_size * vocab
        floor_ms = flops / limits["matmul_flops_per_s"] * 1e3
        case = {"n_tokens": n_tokens, "hidden": hidden_size, "vocab": vocab, "flop_floor": flops}
        results.add(measure(case, implementations(tensors), floor_ms, "bare_matmuls"))
        del tensors
    columns = [
        "n_tokens",
        "hidden",
        "vocab",
        "impl",
        "median_ms",
        "floor_fraction",
        "speedup_vs_bare_matmuls",
        "peak_extra_bytes",
        "note",
    ]
    results.finish(columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
