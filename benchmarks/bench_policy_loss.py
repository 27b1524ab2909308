"""fused_policy_loss (logits in) vs eager log_softmax -> gather -> TRL's loss, and torch.compile of
it: forward+backward, bf16 logits, GRPO token-level ratios with a k3 KL term.

Floor: two reads of the logits and one write of their gradient (3*N*V*2 bytes). Rows of up to
32768 logits are held on chip by the kernel (one read, 2*N*V*2 bytes: see block_config); the table
states the 3-pass floor for every size, so on-chip sizes can exceed a fraction of 1. torch.compile
runs at V=151936 only, with static shapes, last. On GPU, ``fastppo[...]`` rows time other launch
choices than the defaults (the tuning sweep, kernel_bench.tile_variants): streaming tiles of 4096
or 16384 and no L2 hints for a streamed row; 32 warps, or streaming twice, for a row held on chip.
At the target case, ``fastppo[<loss>]`` rows time TRL's loss family and options beside plain dapo.

    python -P -m fastppo.benchmarks.bench_policy_loss [--quick] [--out DIR]
"""

from __future__ import annotations

import dataclasses

import torch
from fastppo.kernels import fused_policy_loss
from fastppo.kernels.ppo_loss import PolicyLossSettings

from .common import on_gpu
from .kernel_bench import (
    COMPILE_VOCAB,
    TARGET_CASE,
    Impl,
    Results,
    ceilings,
    logits_sizes,
    measure,
    parse_args,
    policy_inputs,
    tile_variants,
)
from .peers import compiled_policy_loss, eager_policy_loss

SETTINGS = PolicyLossSettings(beta=0.04, loss_type="grpo", temperature=0.7, clip_high=0.28)
SEQ_LEN = 512
# TRL's loss family at the target case, each beside plain dapo (the target: within 5% of it).
# Token-local ones run the one fused launch; vespo and the masks take the two-pass path.
PLAIN_DAPO = dataclasses.replace(SETTINGS, loss_type="dapo", beta=0.0)
LOSS_FAMILY = {
    "dapo": PLAIN_DAPO,
    "cispo": dataclasses.replace(PLAIN_DAPO, loss_type="cispo", clip_high=5.0),
    "sapo": dataclasses.replace(PLAIN_DAPO, loss_type="sapo"),
    "luspo": dataclasses.replace(PLAIN_DAPO, loss_type="luspo"),
    "vespo": dataclasses.replace(PLAIN_DAPO, loss_type="vespo"),
    "dapo+kl-ratio": dataclasses.replace(PLAIN_DAPO, beta=0.04, kl_bias_correction=True),
    "dapo+entropy-bonus": dataclasses.replace(PLAIN_DAPO, entropy_coef=0.01),
    "dapo+top-entropy": dataclasses.replace(PLAIN_DAPO, top_entropy_quantile=0.2),
    "dapo+off-policy-mask": dataclasses.replace(PLAIN_DAPO, off_policy_mask_threshold=0.5),
}


def setup_case(n_tokens: int, vocab: int, device: str) -> dict:
    tensors = policy_inputs(n_tokens, SEQ_LEN, device, old_logprob=-10.0)
    batch, length = tensors["mask"].shape
    logits = (torch.randn(batch, length, vocab, device=device) * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), device=device)
    return {"logits": logits, "labels": labels, **tensors}


def implementations(t: dict) -> list[Impl]:
    def fused(settings: PolicyLossSettings = SETTINGS):
        def run():
            t["logits"].grad = None
            loss, _ = fused_policy_loss(
                t["logits"],
                t["labels"],
                t["old"],
                t["advantages"],
                t["mask"],
                settings,
                ref_logprobs=t["ref"],
            )
            loss.backward()

        return run

    def eager(fn=eager_policy_loss):
        def run():
            t["logits"].grad = None
            fn(t["logits"], t["labels"], t["old"], t["advantages"], t["mask"], SETTINGS, t["ref"]).backward()

        return run

    impls = [Impl("fastppo", fused()), Impl("eager", eager())]
    impls += tile_variants(fused(), t["logits"].shape[-1], fused_loss=True)
    if on_gpu() and (t["logits"].shape[0] * t["logits"].shape[1], t["logits"].shape[-1]) == TARGET_CASE:
        impls += [Impl(f"fastppo[{name}]", fused(settings)) for name, settings in LOSS_FAMILY.items()]
    if on_gpu() and t["logits"].shape[-1] == COMPILE_VOCAB:
        impls.append(Impl("torch.compile", eager(compiled_policy_loss())))
    return impls


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = "cuda" if on_gpu() else "cpu"
    limits = ceilings()
    results = Results(
        "policy_loss",
        args,
        {"ceilings": limits, "floor": "2 reads + 1 write of [N, V] bf16", "settings": str(SETTINGS)},
    )
    for n_tokens, vocab in logits_sizes(args.quick):
        tensors = setup_case(n_tokens, vocab, device)
        floor_ms = 3 * n_tokens * vocab * 2 / limits["copy_bytes_per_s"] * 1e3
        case = {
            "n_tokens": n_tokens,
            "vocab": vocab,
            "mode": "fwd+bwd",
            "bytes_floor": 3 * n_tokens * vocab * 2,
        }
        results.add(measure(case, implementations(tensors), floor_ms, "eager"))
        del tensors
    columns = [
        "n_tokens",
        "vocab",
        "impl",
        "median_ms",
        "floor_fraction",
        "speedup_vs_eager",
        "peak_extra_bytes",
        "note",
    ]
    results.finish(columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
