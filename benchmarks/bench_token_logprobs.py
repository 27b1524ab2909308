"""token_logprobs vs torch eager (log_softmax + gather), torch.compile of eager and TRL's
selective_log_softmax: forward and forward+backward, bf16 logits.

Floor: forward reads the logits once (N*V*2 bytes); forward+backward reads them twice and writes
the gradient once (3*N*V*2 bytes). Fraction = floor time at the measured copy bandwidth / median.
Targets (H100/H200, V=151936): forward+backward >= 90% of copy bandwidth and >= 10x eager.
Forward rows run without autograd, as scoring does; torch.compile runs at V=151936 only, last.
On GPU, ``fastppo[block=B]`` rows time other streaming tiles than the default (the tuning sweep).

    python -P -m fastppo.benchmarks.bench_token_logprobs [--quick] [--out DIR]
"""

from __future__ import annotations

import torch
from fastppo.kernels import token_logprobs

from .common import on_gpu
from .kernel_bench import (
    COMPILE_VOCAB,
    Impl,
    Results,
    ceilings,
    logits_sizes,
    measure,
    parse_args,
    tile_variants,
)
from .peers import compiled_token_logprobs, eager_token_logprobs, trl_selective_log_softmax

TEMPERATURE = 0.7


def setup_case(n_tokens: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = (torch.randn(n_tokens, vocab, device=device) * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (n_tokens,), device=device)
    return logits, labels, torch.randn(n_tokens, device=device)


def implementations(logits, labels, upstream, backward: bool) -> list[Impl]:
    def timed(fn):
        def forward_and_backward():
            logits.grad = None
            fn(logits, labels, TEMPERATURE).backward(upstream)

        @torch.no_grad()
        def forward():
            fn(logits, labels, TEMPERATURE)

        return forward_and_backward if backward else forward

    trl = trl_selective_log_softmax()
    ours = timed(lambda x, y, t: token_logprobs(x, y, temperature=t))
    impls = [
        Impl("fastppo", ours),
        Impl("eager", timed(eager_token_logprobs)),
        Impl(
            "trl",
            timed(lambda x, y, t: trl(x, y, temperature=t)) if trl else None,
            trl is not None,
            "" if trl else "trl not installed",
        ),
    ]
    impls += tile_variants(ours, logits.shape[-1], fused_loss=False)
    # inductor on CPU compiles for minutes and measures nothing we ship
    if on_gpu() and logits.shape[-1] == COMPILE_VOCAB:
        impls.append(Impl("torch.compile", timed(lambda x, y, t: compiled_token_logprobs()(x, y, t))))
    return impls


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = "cuda" if on_gpu() else "cpu"
    limits = ceilings()
    results = Results(
        "token_logprobs",
        args,
        {
            "ceilings": limits,
            "floor": "fwd: N*V*2 bytes; fwd+bwd: 3*N*V*2 bytes (bf16)",
            "targets": {"fwd+bwd floor_fraction": 0.9, "speedup_vs_eager at V=151936": 10.0},
        },
    )
    for n_tokens, vocab in logits_sizes(args.quick):
        logits, labels, upstream = setup_case(n_tokens, vocab, device)
        for backward in (False, True):
            passes = 3 if backward else 1
            floor_ms = passes * n_tokens * vocab * 2 / limits["copy_bytes_per_s"] * 1e3
            case = {
                "n_tokens": n_tokens,
                "vocab": vocab,
                "mode": "fwd+bwd" if backward else "fwd",
                "bytes_floor": passes * n_tokens * vocab * 2,
            }
            results.add(measure(case, implementations(logits, labels, upstream, backward), floor_ms, "eager"))
        del logits, labels, upstream
    columns = [
        "n_tokens",
        "vocab",
        "mode",
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
