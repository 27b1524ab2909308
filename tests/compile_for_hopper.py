"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) with Triton's own GPU compiler
and ptxas, on a machine without a GPU. Run by tests/test_kernels_compile.py in a subprocess with
TRITON_INTERPRET=0 (under the interpreter, @triton.jit yields interpreted functions).

The interpreter accepts code the GPU compiler rejects (non-constexpr globals, dtype mismatches in
loop-carried values, ...); this catches those without a lent GPU. It does not run the kernels.
"""

from __future__ import annotations

import itertools
import sys

import triton
from fastppo.kernels.ppo_loss import triton as loss_kernels
from fastppo.kernels.token_logprobs import triton as token_kernels
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
# Row addressing of [B, T, V] logits with arbitrary leading strides (token_logprobs/triton.py).
ROWS = {"T": "i32", "stride_b": "i64", "stride_t": "i64"}


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, num_warps: int) -> None:
    source = ASTSource(
        fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs
    )
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps})
    assert compiled.asm["cubin"], fn


def main() -> int:
    count = 0
    # 1024: one tile; 8192: streamed tiles; 32768: the fused loss's widest on-chip row.
    for dtype, vocab in itertools.product(("bf16", "fp16", "fp32"), (1000, 32000, 151936)):
        stream = token_kernels.block_config(vocab)
        fused = token_kernels.block_config(vocab, single_tile_ok=True)
        logits = {"p_logits": f"*{dtype}", **ROWS}
        compile_kernel(
            token_kernels._token_logprobs_fwd_kernel,
            {
                **logits,
                "p_labels": "*i64",
                "p_logp": "*fp32",
                "p_lse": "*fp32",
                "p_entropy": "*fp32",
                "V": "i32",
                "inv_temp": "fp32",
                "ignore_index": "i32",
            },
            {"WITH_ENTROPY": vocab != 1000, "BLOCK_V": stream.block_v},
            stream.num_warps,
        )
        for with_entropy in (False, True):
            compile_kernel(
                token_kernels._token_logprobs_bwd_kernel,
                {
                    **logits,
                    "p_out": f"*{dtype}",
                    "stride_ob": "i64",
                    "stride_ot": "i64",
                    "p_labels": "*i64",
                    "p_lse": "*fp32",
                    "p_glogp": "*fp32",
                    "p_entropy": "*fp32",
                    "p_gent": "*fp32",
                    "V": "i32",
                    "inv_temp": "fp32",
                    "ignore_index": "i32",
                },
                {"WITH_ENTROPY_GRAD": with_entropy, "BLOCK_V": stream.block_v},
                stream.num_warps,
            )
        for kl in (0, 1, 2, 3):
            compile_kernel(
                loss_kernels._policy_loss_fwd_kernel,
                {
                    **logits,
                    "p_dlogits": f"*{dtype}",
                    "stride_db": "i64",
                    "stride_dt": "i64",
                    "p_labels": "*i64",
                    "p_old": "*fp32",
                    "p_adv": "*fp32",
                    "p_ref": "*fp32",
                    "p_weight": "*fp32",
                    "p_logp": "*fp32",
                    "p_entropy": "*fp32",
                    "V": "i32",
                    "inv_temp": "fp32",
                    "clip_lo": "fp32",
                    "clip_hi": "fp32",
                    "delta": "fp32",
                    "beta": "fp32",
                },
                {
                    "HAS_DELTA": kl % 2 == 0,
                    "KL": kl,
                    "KL_CLAMP": 20.0,
                    "ON_POLICY": kl == 1,
                    "WITH_ENTROPY": kl == 3,
                    "SINGLE_TILE": fused.single_tile,
                    "BLOCK_V": fused.block_v,
                },
                fused.num_warps,
            )
        count += 7
    print(f"compiled {count} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
