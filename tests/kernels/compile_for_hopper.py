"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) with Triton's own GPU compiler
and ptxas, on a machine without a GPU, and report what each variant costs. Run by
tests/kernels/test_compile_for_hopper.py in a subprocess with TRITON_INTERPRET=0 (under the interpreter,
@triton.jit yields interpreted functions).

The interpreter accepts code the GPU compiler rejects (non-constexpr globals, dtype mismatches in
loop-carried values, ...); this catches those without a lent GPU. It does not run the kernels.
Each variant is specialised as a real launch would be: every pointer 16-byte aligned (PyTorch's
allocations are) and every integer argument divisible by 16 marked so (Triton's launcher does both),
else the SASS shows 2-byte scalar loads and register counts no launch would get.

Printed per variant: registers, stack (local memory: spills), shared memory, SASS instructions,
and the widest global load of the logits. Exit code 1 when a variant that a launch at the
benchmark shapes uses (bf16, V % 16 == 0) spills or reads the logits narrower than 16 bytes.

    TRITON_INTERPRET=0 python -P tests/kernels/compile_for_hopper.py
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from fastppo.kernels.ppo_loss import triton as loss_kernels
from fastppo.kernels.token_logprobs import triton as token_kernels
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # ptxas, cuobjdump, nvdisasm
SEQ_LEN = 512  # T of [B, T, V] logits: strides are multiples of V


@dataclasses.dataclass
class Variant:
    name: str
    fn: triton.JITFunction
    signature: dict[str, str]
    constexprs: dict
    num_warps: int
    ints: dict[str, int]  # the integer arguments' values, for their divisibility
    checked: bool  # a launch at the benchmark shapes uses it: must not spill, must load 16 bytes


def logits_args(dtype: str, out: str | None) -> dict[str, str]:
    """Row addressing of [B, T, V] logits with arbitrary leading strides (token_logprobs/triton.py),
    and of a gradient destination laid out alike (``out``: its pointer's name)."""
    args = {"p_logits": f"*{dtype}", "T": "i32", "stride_b": "i64", "stride_t": "i64"}
    if out is not None:
        suffix = {"p_out": "o", "p_dlogits": "d"}[out]
        args |= {out: f"*{dtype}", f"stride_{suffix}b": "i64", f"stride_{suffix}t": "i64"}
    return args


def variants() -> list[Variant]:
    out = []
    # 1000: one tile, V not a multiple of 16; 32000: streamed (or one fused tile); 151936: the target.
    for dtype, vocab in itertools.product(("bf16", "fp16", "fp32"), (1000, 32000, 151936)):
        ints = {
            "T": SEQ_LEN,
            "V": vocab,
            "ignore_index": -100,
            **dict.fromkeys(("stride_t", "stride_ot", "stride_dt"), vocab),
            **dict.fromkeys(("stride_b", "stride_ob", "stride_db"), SEQ_LEN * vocab),
        }
        checked = dtype == "bf16" and vocab % 16 == 0
        stream = token_kernels.block_config(vocab)
        tag = f"{dtype}-V{vocab}"
        for with_entropy in (False, True):
            out.append(
                Variant(
                    f"logprobs_fwd-{tag}-B{stream.block_v}{'-entropy' * with_entropy}",
                    token_kernels._token_logprobs_fwd_kernel,
                    {
                        **logits_args(dtype, None),
                        "p_labels": "*i64",
                        "p_logp": "*fp32",
                        "p_lse": "*fp32",
                        "p_entropy": "*fp32",
                        "V": "i32",
                        "inv_temp": "fp32",
                        "ignore_index": "i32",
                    },
                    {"WITH_ENTROPY": with_entropy, "BLOCK_V": stream.block_v},
                    stream.num_warps,
                    ints,
                    checked,
                )
            )
            out.append(
                Variant(
                    f"logprobs_bwd-{tag}-B{stream.block_v}{'-entropy' * with_entropy}",
                    token_kernels._token_logprobs_bwd_kernel,
                    {
                        **logits_args(dtype, "p_out"),
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
                    ints,
                    checked,
                )
            )
        # k0: the clipped family, no KL; k1: cispo, on-policy; k2: sapo, ratio-weighted KL;
        # k3: the clipped family with the entropy and the entropy bonus's gradient
        for kl in (0, 1, 2, 3):
            fused = token_kernels.block_config(vocab, single_tile_ok=True, entropy_grad=kl == 3)
            out.append(
                Variant(
                    f"policy_loss-{tag}-B{fused.block_v}{'-single' * fused.single_tile}-k{kl}",
                    loss_kernels._policy_loss_fwd_kernel,
                    {
                        **logits_args(dtype, "p_dlogits"),
                        "p_labels": "*i64",
                        "p_old": "*fp32",
                        "p_adv": "*fp32",
                        "p_ref": "*fp32",
                        "p_weight": "*fp32",
                        "p_ent_weight": "*fp32",
                        "p_logp": "*fp32",
                        "p_entropy": "*fp32",
                        "V": "i32",
                        "inv_temp": "fp32",
                        "clip_lo": "fp32",
                        "clip_hi": "fp32",
                        "delta": "fp32",
                        "beta": "fp32",
                        "tau_pos": "fp32",
                        "tau_neg": "fp32",
                    },
                    {
                        "LOSS": {0: 0, 1: 1, 2: 2, 3: 0}[kl],
                        "HAS_DELTA": kl % 2 == 0,
                        "KL": kl,
                        "KL_CLAMP": 20.0,
                        "KL_BIAS": kl == 2,
                        "ON_POLICY": kl == 1,
                        "WITH_ENTROPY": kl == 3,
                        "WITH_ENTROPY_GRAD": kl == 3,
                        "SINGLE_TILE": fused.single_tile,
                        "BLOCK_V": fused.block_v,
                        "L2_HINTS": token_kernels.L2_HINTS,
                    },
                    fused.num_warps,
                    ints,
                    checked,
                )
            )
    return out + sweep_candidates(out)


def sweep_candidates(defaults: list[Variant]) -> list[Variant]:
    """The other tile and warp choices benchmarks/ times on a GPU, compiled here so that none of
    them fails there and their register counts are on record (not checked: candidates only)."""
    extra = []
    for variant in defaults:
        if not variant.checked or variant.name.endswith(("-entropy", "-k1", "-k2", "-k3")):
            continue
        candidate = functools.partial(dataclasses.replace, variant, checked=False)
        block = variant.constexprs["BLOCK_V"]
        if variant.constexprs.get("SINGLE_TILE"):  # a row held on chip: over 32 warps instead of 16
            extra.append(candidate(name=f"{variant.name}-w32", num_warps=32))
            continue
        for other in (4096, 16384):
            extra.append(
                candidate(
                    name=variant.name.replace(f"-B{block}", f"-B{other}"),
                    constexprs={**variant.constexprs, "BLOCK_V": other},
                    num_warps=token_kernels.block_config(other).num_warps,
                )
            )
        if "L2_HINTS" in variant.constexprs:
            extra.append(
                candidate(
                    name=f"{variant.name}-nohints", constexprs={**variant.constexprs, "L2_HINTS": False}
                )
            )
    return extra


def compile_variant(variant: Variant) -> bytes:
    """The cubin of ``variant``, specialised as Triton's launcher would specialise a real launch."""
    names = list(variant.fn.arg_names)
    attrs = {}
    for name, kind in variant.signature.items():
        aligned = kind.startswith("*") or (kind in ("i32", "i64") and variant.ints.get(name, 1) % 16 == 0)
        if aligned:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=variant.fn,
        signature={**variant.signature, **dict.fromkeys(variant.constexprs, "constexpr")},
        constexprs=variant.constexprs,
        attrs=attrs,
    )
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": variant.num_warps})
    assert compiled.asm["cubin"], variant.name
    return compiled.asm["cubin"]


@dataclasses.dataclass
class Report:
    registers: int
    stack: int
    shared: int
    instructions: int
    load_bits: int  # widest global load in the kernel (the logits' tiles)


def report(cubin: bytes) -> Report | None:
    """Resources and SASS of a cubin; None when Triton's package lacks cuobjdump / nvdisasm."""
    if not (TOOLS / "cuobjdump").exists() or not (TOOLS / "nvdisasm").exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [TOOLS / "cuobjdump", "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [TOOLS / "nvdisasm", "-c", file.name], capture_output=True, text=True, check=True
        ).stdout

    def field(key: str) -> int:
        return int(re.search(rf"{key}:(\d+)", usage).group(1))

    opcodes = collections.Counter(
        match.group(1)
        for line in sass.splitlines()
        if (match := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line))
    )
    widths = [int(m.group(1)) for op in opcodes if (m := re.match(r"LDG\.E(?:\.\w+)*?\.(64|128)$", op))]
    return Report(
        field("REG"), field("STACK"), field("SHARED"), sum(opcodes.values()), max(widths, default=32)
    )


def main() -> int:
    rows, failures = [], []
    for variant in variants():
        found = report(compile_variant(variant))
        rows.append((variant, found))
        if found and variant.checked and (found.stack or found.load_bits < 128):
            failures.append(f"{variant.name}: stack {found.stack} B, widest load {found.load_bits} bits")
    print(f"{'variant':<48} warps  regs  stack  smem  SASS  load")
    for variant, found in rows:
        cells = (
            "(no cuobjdump/nvdisasm)"
            if found is None
            else (
                f"{found.registers:5d} {found.stack:6d} {found.shared:5d} "
                f"{found.instructions:5d} {found.load_bits:5d}"
            )
        )
        print(f"{variant.name:<48} {variant.num_warps:5d} {cells}")
    print(f"compiled {len(rows)} kernel variants for sm_90")
    for failure in failures:
        print(f"REGRESSION {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
