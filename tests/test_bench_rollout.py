"""The rollout table's numbers from known completions (a fake sampler): lengths cut at the table's
end tokens, tokens/s, padding waste of lockstep decoding against continuous batching, medians over
the timed calls; its rows and stops recorded apart from the step table's. Timings are never
asserted (the CPU's are smoke tests)."""

from __future__ import annotations

import json

import pytest
import torch
from fastppo.benchmarks import bench_rollout, bench_step


def workload(**settings) -> bench_step.Workload:
    settings = bench_step.StepSettings(
        model="qwen2.5-0.5b",
        quick=True,
        batch=4,
        num_generations=2,
        prompt_len=3,
        completion_len=8,
        timed_steps=3,
        **settings,
    )
    vocab = 64
    return bench_step.Workload(
        settings,
        None,
        bench_step.build_tokenizer(vocab),
        bench_step.prompts_dataset(settings, vocab, rows=8),
        linear_params=1,
        head_params=0,
    )


def test_end_tokens_are_none_or_the_configured_share():
    assert bench_rollout.end_tokens(workload()) == []  # fixed lengths, as the step table
    assert bench_rollout.end_tokens(workload(rollout_stop_share=0.25)) == list(range(47, 63))


@pytest.mark.parametrize("lockstep", [True, False])
def test_row_numbers_from_known_completions(lockstep, monkeypatch):
    """4 completions of up to 8 tokens; the second ends at an end token (id 50) after 3 and goes on
    with tokens that do not count; the third runs 5 tokens (its sampler stopped it)."""
    seen = []

    def fake_generate(prompts, n, new_tokens):
        seen.append((len(prompts), n, new_tokens))
        return [[5] * new_tokens, [5, 5, 50, 7, 7], [6] * min(new_tokens, 5), [7] * new_tokens][
            : len(prompts) * n
        ]

    spec = bench_rollout.SamplerSpec("fake", lambda policy, w, d: fake_generate, lockstep, lambda: None)
    monkeypatch.setattr(bench_rollout, "load_policy", lambda w: torch.nn.Linear(1, 1))
    row = bench_rollout.measure_sampler(spec, workload(rollout_stop_share=0.25), None)
    assert seen == [(2, 2, 8), (2, 2, 1), (2, 2, 8), (2, 2, 8), (2, 2, 8)]  # warm-up, first token, 3 timed
    assert row["generated_tokens"] == 8 + 3 + 5 + 8 and row["completion_len_measured"] == 24 / 4
    assert row["tokens_per_s"] == pytest.approx(24 / (row["last_token_ms"] * 1e-3))
    assert row["padding_waste"] == (pytest.approx(1 - 24 / (4 * 8)) if lockstep else 0.0)
    assert row["calls_timed"] == 3 and row["graphs_compiled"] == 0 and row["note"] == ""


def test_rollout_rows_and_stops_land_in_their_own_file(monkeypatch, tmp_path):
    """Trainers first, then samplers, each table with its own skipped entries; a stop at the time
    limit marks everyone after it, in both tables."""

    def fake_measure(spec, workload, work_dir, profile_dir=None, on_step=None):
        return {
            "trainer": spec.name,
            "algo": spec.algo,
            "training_ms": 1.0,
            "step_ms": 2.0,
            "train_flops": 1.0,
        }

    def fake_sampler(spec, workload, work_dir):
        if spec.name == "continuous-batching":
            raise KeyboardInterrupt
        return {"sampler": spec.name, "tokens_per_s": 10.0}

    monkeypatch.setattr(bench_step, "prepare_workload", lambda settings, directory: workload())
    monkeypatch.setattr(bench_step, "measure", fake_measure)
    monkeypatch.setattr(bench_rollout, "measure_sampler", fake_sampler)
    with pytest.raises(KeyboardInterrupt):
        bench_step.run(
            workload().settings, ["fastppo", "trl+liger"], tmp_path, samplers=list(bench_rollout.SAMPLERS)
        )
    (step,) = tmp_path.glob("step-*.json")
    step = json.loads(step.read_text())
    rollout = json.loads((tmp_path / step["rollout_results"]).read_text())
    assert [r["trainer"] for r in step["rows"]] == ["fastppo"]
    assert step["skipped"] == {"trl+liger": bench_step.STOPPED}  # Liger runs after the samplers
    assert [r["sampler"] for r in rollout["rows"]] == ["generate", "static"]
    assert rollout["skipped"] == {
        name: bench_step.STOPPED
        for name in ("continuous-batching", "trl-generate", "trl-continuous-batching")
    }
    with pytest.raises(ValueError, match=r"unknown trainer\(s\) or sampler\(s\) \['vllm'\]"):
        bench_step.run(workload().settings, [], tmp_path, samplers=["vllm"])
    assert bench_step.sampler_names("all") == list(bench_rollout.SAMPLERS)
    assert bench_step.sampler_names("none") == [] and bench_step.sampler_names("static,generate") == [
        "static",
        "generate",
    ]
