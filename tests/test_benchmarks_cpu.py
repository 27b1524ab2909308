"""The benchmark suite on CPU: every suite and kernel script runs at --quick, marks itself CPU, and
never lands among (or in the tables and plots of) GPU results. Plus the pieces that decide
numbers: the largest-fit search, the phase clock, and the README block's replacement rule.

Timings themselves are never asserted (performance lives in benchmarks/, not in tests).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastppo.benchmarks import bench_memory, bench_rollout, bench_step, report, suite
from fastppo.benchmarks.profiling import PhaseClock

GPU_ENV = {
    "device": "NVIDIA H100 80GB HBM3",
    "cpu": False,
    "date": "2026-01-02T03:04:05+00:00",
    "commit": "abc1234",
    "versions": {"torch": "2.11.0", "trl": "1.16.0", "fastppo": "0.1.0"},
}
GPU_ROW = {
    "algo": "grpo",
    "trainer": "trl",
    "model": "qwen2.5-1.5b",
    "tokens_per_step": 6144,
    "training_ms": 900.0,
    "step_ms": 9000.0,
    "train_tokens_per_s": 6826.7,
    "peak_allocated_bytes": 3e10,
}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # From a folder outside the checkout: its kernels/ must not shadow Hugging Face's `kernels`.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: CPU tensors take the PyTorch reference
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """``fastppo bench all --quick --profile`` into a folder that already holds a GPU result."""
    out = tmp_path_factory.mktemp("results")
    planted = out / "step-grpo-qwen2.5-1.5b-NVIDIA-H100-80GB-HBM3-2026-01-02T030405.json"
    planted.write_text(
        json.dumps({"benchmark": "step-grpo-qwen2.5-1.5b", "environment": GPU_ENV, "rows": [GPU_ROW]})
    )
    before = planted.read_text()
    done = _run(["fastppo.benchmarks.suite", "all", "--quick", "--profile", "--out", str(out)], cwd=out)
    return out, planted, before, done


def _new_results(out: Path, planted: Path) -> list[dict]:
    return [r for r in report.load_results(out) if Path(r["path"]) != planted]


@pytest.mark.slow  # the whole benchmark suite at CPU sizes (shared module fixture)
def test_suite_runs_every_suite_and_exits_zero(suite_run):
    out, planted, _, done = suite_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    families = {report.family(r) for r in _new_results(out, planted)}
    assert {"step", "memory"} <= families
    kernel_results = [r for r in _new_results(out, planted) if report.family(r) not in ("step", "memory")]
    assert len({r["benchmark"] for r in kernel_results}) >= len(suite.KERNEL_SCRIPTS), families


@pytest.mark.slow  # the whole benchmark suite at CPU sizes (shared module fixture)
def test_every_cpu_result_records_device_versions_and_commit(suite_run):
    out, planted, _, _ = suite_run
    results = _new_results(out, planted)
    assert results
    for result in results:
        env = result["environment"]
        assert env["cpu"] is True, result["path"]
        assert env["device"].startswith("cpu"), result["path"]
        assert env["versions"]["torch"] == torch.__version__
        assert "commit" in env and "date" in env
        assert "-cpu-" in Path(result["path"]).name  # the file name says CPU too
        assert result["rows"], result["path"]


@pytest.mark.slow  # the whole benchmark suite at CPU sizes (shared module fixture)
def test_cpu_results_never_mix_with_gpu_results(suite_run):
    out, planted, before, _ = suite_run
    assert planted.read_text() == before  # the GPU result is untouched
    summary = (out / "summary-cpu.md").read_text()
    assert "H100" not in summary and "CPU smoke run" in summary
    assert not list(out.glob("summary-NVIDIA*")) and not list(
        out.glob("plot-*NVIDIA*")
    )  # CPU run: CPU files only
    assert (out / "plot-step-cpu.png").stat().st_size > 0
    block = report.render_readme_block(report.load_results(out))  # GPU rows only, whatever else is there
    assert "NVIDIA H100 80GB HBM3" in block and "(shrunk)" not in block  # every CPU row's model is "(shrunk)"


@pytest.mark.slow  # the whole benchmark suite at CPU sizes (shared module fixture)
def test_step_rows_compare_the_same_work(suite_run):
    out, planted, _, _ = suite_run
    (step,) = [r for r in _new_results(out, planted) if report.family(r) == "step"]
    rows = {row["trainer"]: row for row in step["rows"]}
    assert {"fastppo", "trl"} <= set(rows)
    settings = step["settings"]
    for row in rows.values():
        # fixed-length generation: each trainer's own metric confirms every completion ran to the end
        assert row["completion_len_measured"] == settings["completion_len"]
        assert row["tokens_per_step"] == settings["batch"] * (
            settings["prompt_len"] + settings["completion_len"]
        )
        assert 0 < row["generation_ms"] < row["step_ms"] and 0 < row["training_ms"] < row["step_ms"]
        assert row["scoring_ms"] > 0  # beta > 0: reference log-probs are scored in both trainers
    assert rows["fastppo"]["train_speedup_vs_trl"] == pytest.approx(
        rows["trl"]["training_ms"] / rows["fastppo"]["training_ms"]
    )


@pytest.mark.slow  # the whole benchmark suite at CPU sizes (shared module fixture)
def test_rollout_rows_compare_the_same_work(suite_run):
    """Every sampler's row, fastppo's and TRL's, on the step's prompts: all completions run to the
    configured length (no end token in the table), so there is no padding to waste."""
    out, planted, _, _ = suite_run
    (rollout,) = [r for r in _new_results(out, planted) if report.family(r) == "rollout"]
    rows = {row["sampler"]: row for row in rollout["rows"]}
    assert set(rows) == set(bench_rollout.SAMPLERS) and not rollout["skipped"]
    settings = rollout["settings"]
    for row in rows.values():
        assert row["generated_tokens"] == settings["batch"] * settings["completion_len"]
        assert row["padding_waste"] == 0.0 and row["graphs_compiled"] == 0  # no compile on CPU
    base = rows[bench_rollout.BASELINE]
    assert rows["static"]["rollout_speedup_vs_trl-generate"] == pytest.approx(
        rows["static"]["tokens_per_s"] / base["tokens_per_s"]
    )


@pytest.mark.slow  # the whole benchmark suite at CPU sizes (shared module fixture)
def test_profile_writes_a_trace_and_a_top_kernel_summary(suite_run):
    out, _, _, _ = suite_run
    traces = list(out.glob("*.trace.json.gz"))
    assert {p.name.split("-")[1] for p in traces} >= {"fastppo", "trl"}
    assert all(p.name.endswith("-cpu.trace.json.gz") for p in traces)  # never the name of a GPU trace
    assert json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    summary = next(out.glob("step-fastppo-*.top-kernels.txt")).read_text()
    assert "phase/generation" in summary and "phase/rollout" in summary


@pytest.mark.slow  # the whole benchmark suite at CPU sizes (shared module fixture)
def test_memory_on_cpu_is_accounting_not_measurement(suite_run):
    out, planted, _, _ = suite_run
    (memory,) = [r for r in _new_results(out, planted) if report.family(r) == "memory"]
    assert "not a measurement" in memory["note"]
    assert all(row["kind"] == "accounting" for row in memory["rows"])


@pytest.mark.parametrize("threshold", [3, 8, 24, 56, 100, 1000])
@pytest.mark.parametrize("start", [8, 64])
def test_largest_fitting_finds_the_threshold(threshold, start):
    probed = []

    def fits(batch):
        probed.append(batch)
        return batch <= threshold

    found = bench_memory.largest_fitting(fits, step=8, start=start, cap=512, max_probes=20, budget_s=60)
    expected = min(threshold, 512) // 8 * 8 or None
    assert found.max_ok == expected
    assert all(b % 8 == 0 and 8 <= b <= 512 for b in probed)
    assert len(probed) == len(set(probed))  # no batch probed twice
    if threshold < 512:
        assert found.min_failed == (found.max_ok or 0) + 8  # bisected down to one step apart


def test_largest_fitting_leaves_a_bracket_when_out_of_probes():
    found = bench_memory.largest_fitting(
        lambda b: b <= 100, step=8, start=8, cap=4096, max_probes=5, budget_s=60
    )
    assert [b for b, _, _ in found.probes] == [8, 16, 32, 64, 128]
    assert (found.max_ok, found.min_failed) == (64, 128)


def test_largest_fitting_rejects_a_start_off_the_grid():
    with pytest.raises(ValueError, match="step <= start <= cap"):
        bench_memory.largest_fitting(lambda b: True, step=8, start=12, cap=512, max_probes=5, budget_s=60)


def _fake_workload() -> bench_step.Workload:
    settings = bench_step.StepSettings(model="qwen2.5-0.5b", batch=8, prompt_len=16, completion_len=32)
    return bench_step.Workload(settings, Path("unused"), None, None, linear_params=1, head_params=0)


@pytest.mark.parametrize("axis", bench_memory.AXES)
def test_memory_search_catches_out_of_memory_and_reports_the_fit(monkeypatch, axis):
    """The GPU probe loop, with one GRPO step replaced by a fake that runs out of memory above a size."""
    limit = {"batch": 40, "completion_len": 700}[axis]

    def fake_measure(spec, workload, work_dir, profile_dir=None, on_step=None):
        value = getattr(workload.settings, axis)
        if value > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"peak_allocated_bytes": value * 1000}

    monkeypatch.setattr(bench_memory, "measure", fake_measure)
    settings = bench_memory.MemorySettings(
        axis=axis, start=bench_memory.MemorySettings(axis=axis).step, cap=4096, max_probes=20
    )
    row = bench_memory.search_trainer("trl", settings, _fake_workload(), Path("unused"))
    assert row["max_ok"] == limit // settings.step * settings.step
    assert row["min_failed"] == row["max_ok"] + settings.step
    assert row["peak_allocated_bytes_at_max"] == row["max_ok"] * 1000
    batch, completion = (row["max_ok"], 32) if axis == "batch" else (8, row["max_ok"])
    assert row["max_tokens_per_step"] == batch * (16 + completion)


def test_memory_search_does_not_swallow_other_errors(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_memory, "measure", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_memory.search_trainer(
            "trl", bench_memory.MemorySettings(start=8), _fake_workload(), Path("unused")
        )


def test_largest_fitting_keeps_its_probes_when_the_time_limit_interrupts_it():
    def fits(batch):
        if batch == 32:
            raise KeyboardInterrupt  # what the session's `timeout --signal=INT` delivers
        return True

    found = bench_memory.largest_fitting(fits, step=8, start=8, cap=512, max_probes=20, budget_s=60)
    assert found.interrupted and found.max_ok == 16 and [b for b, _, _ in found.probes] == [8, 16]


def test_largest_fitting_does_not_start_a_probe_predicted_to_overrun():
    def slow(batch):
        time.sleep(0.5)
        return True

    # after 0.5 s the next probe is predicted to take 0.75 s: past the 1 s budget, so never started
    found = bench_memory.largest_fitting(slow, step=8, start=8, cap=512, max_probes=20, budget_s=1.0)
    assert [b for b, _, _ in found.probes] == [8]


def _memory_row(trainer, status, max_tokens, min_failed_tokens=None):
    return {
        "trainer": trainer,
        "status": status,
        "max_tokens_per_step": max_tokens,
        "min_failed_tokens_per_step": min_failed_tokens,
    }


def test_memory_ratio_is_a_ratio_only_when_both_ran_out_of_memory():
    both = [_memory_row("fastppo", "bracketed", 3000, 3100), _memory_row("trl", "bracketed", 1000, 1100)]
    bench_memory.add_ratios(both)
    assert both[0]["max_tokens_vs_trl"] == 3.0 and "max_tokens_vs_trl_at_least" not in both[0]
    only_trl = [_memory_row("fastppo", "fits at the cap", 4000), _memory_row("trl", "bracketed", 1000, 2000)]
    bench_memory.add_ratios(only_trl)
    assert only_trl[0]["max_tokens_vs_trl_at_least"] == 2.0 and "max_tokens_vs_trl" not in only_trl[0]
    neither = [
        _memory_row("fastppo", "out of probes or time before running out of memory", 4000),
        _memory_row("trl", "out of probes or time before running out of memory", 4000),
    ]
    bench_memory.add_ratios(neither)
    assert not any(key.startswith("max_tokens_vs") for row in neither for key in row)


def test_memory_search_shares_the_budget_and_survives_a_broken_trainer(monkeypatch):
    budgets, written = [], []

    def fake_search(name, settings, workload, work_dir, on_probe=None):
        budgets.append(settings.budget_s)
        if name == "fastppo":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _memory_row(name, "bracketed", 1000, 1100)

    monkeypatch.setattr(bench_memory, "prepare_workload", lambda settings, directory: _fake_workload())
    monkeypatch.setattr(bench_memory, "search_trainer", fake_search)
    settings = bench_memory.MemorySettings(budget_s=100.0)
    rows, skipped = bench_memory.measure_largest(
        settings, ["fastppo", "trl"], on_row=lambda r, s: written.append(len(r))
    )
    assert budgets[0] == pytest.approx(50.0, abs=1) and budgets[1] == pytest.approx(100.0, abs=1)
    assert [r["trainer"] for r in rows] == ["trl"] and "illegal memory access" in skipped["fastppo"]
    assert written == [0, 1]  # the results file is rewritten after each trainer


def test_step_benchmark_keeps_the_rows_of_trainers_that_ran_when_one_fails(monkeypatch, tmp_path):
    def fake_measure(spec, workload, work_dir, profile_dir=None, on_step=None):
        if spec.name == "trl":
            raise RuntimeError("Liger patch failed\nlong traceback")
        return {**GPU_ROW, "trainer": spec.name, "train_flops": 1.0}

    monkeypatch.setattr(bench_step, "prepare_workload", lambda settings, directory: _fake_workload())
    monkeypatch.setattr(bench_step, "measure", fake_measure)
    path = bench_step.run(_fake_workload().settings, ["fastppo", "trl"], tmp_path)
    result = json.loads(path.read_text())
    assert [r["trainer"] for r in result["rows"]] == ["fastppo"]
    assert result["skipped"] == {"trl": "failed: RuntimeError: Liger patch failed"}


def test_step_benchmark_stopped_at_its_time_limit_records_who_went_unmeasured(monkeypatch, tmp_path):
    def fake_measure(spec, workload, work_dir, profile_dir=None, on_step=None):
        if spec.name == "trl":
            raise KeyboardInterrupt  # what the session's `timeout --signal=INT` delivers
        return {**GPU_ROW, "trainer": spec.name, "train_flops": 1.0}

    monkeypatch.setattr(bench_step, "prepare_workload", lambda settings, directory: _fake_workload())
    monkeypatch.setattr(bench_step, "measure", fake_measure)
    with pytest.raises(KeyboardInterrupt):
        bench_step.run(_fake_workload().settings, ["fastppo", "trl", "fastppo-fused-adamw"], tmp_path)
    (path,) = tmp_path.glob("step-*.json")
    result = json.loads(path.read_text())
    assert [r["trainer"] for r in result["rows"]] == ["fastppo"]
    assert result["skipped"] == {"trl": bench_step.STOPPED, "fastppo-fused-adamw": bench_step.STOPPED}


def test_phase_clock_times_nested_phases_and_restores_wrapped_methods():
    class Work:
        def outer(self):
            time.sleep(0.02)
            self.inner()

        def inner(self):
            time.sleep(0.01)

    work, clock = Work(), PhaseClock()
    clock.wrap(work, "outer", "outer")
    clock.wrap(work, "inner", "inner", inside="outer")
    for _ in range(3):
        clock.begin_step()
        work.outer()
        work.inner()  # outside "outer": not timed as "inner"
        clock.end_step()
    medians = clock.medians()
    assert 0.01 <= medians["inner"] < medians["outer"] < medians["step"]
    assert medians["step"] >= medians["outer"] + 0.01  # the untimed inner() call is in the step
    clock.restore()
    assert "outer" not in vars(work) and "inner" not in vars(work)
    with pytest.raises(ValueError, match="no timed steps"):
        clock.medians(skip=3)


def test_readme_block_says_no_gpu_run_until_one_exists_and_only_newer_replaces_it():
    cpu = {
        "benchmark": "step-grpo-x",
        "environment": {**GPU_ENV, "cpu": True, "device": "cpu"},
        "rows": [GPU_ROW],
    }
    gpu = {"benchmark": "step-grpo-x", "environment": GPU_ENV, "rows": [GPU_ROW]}
    placeholder = report.render_readme_block([cpu])
    assert "No GPU run yet" in placeholder
    readme = f"intro\n{placeholder}\nrest\n"
    with_gpu = report.replace_readme_block(readme, report.render_readme_block([gpu]))
    assert (
        "NVIDIA H100 80GB HBM3" in with_gpu and with_gpu.startswith("intro\n") and with_gpu.endswith("rest\n")
    )
    assert report.replace_readme_block(with_gpu, placeholder) == with_gpu  # a CPU/no-GPU block never replaces
    older = {**gpu, "environment": {**GPU_ENV, "date": "2025-12-31T00:00:00+00:00", "device": "Old GPU"}}
    assert report.replace_readme_block(with_gpu, report.render_readme_block([older])) == with_gpu
    newer = {**gpu, "environment": {**GPU_ENV, "date": "2026-02-01T00:00:00+00:00", "device": "New GPU"}}
    assert "New GPU" in report.replace_readme_block(with_gpu, report.render_readme_block([newer]))


def test_step_settings_reject_a_batch_that_splits_a_group():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        bench_step.StepSettings(batch=12, num_generations=8).check()
    with pytest.raises(ValueError, match="model must be one of"):
        bench_step.StepSettings(model="gpt-5").check()
    with pytest.raises(ValueError, match="axis must be one of"):
        bench_memory.MemorySettings(axis="depth").check()


@pytest.mark.gpu
def test_step_and_memory_on_gpu_measure_memory_and_ratios(tmp_path):
    """GPU path of bench_step / bench_memory at a small size (the full sizes run in gpu_session.sh)."""
    settings = bench_step.StepSettings(
        model="qwen2.5-0.5b", batch=8, prompt_len=32, completion_len=32, timed_steps=1
    )
    result = json.loads(bench_step.run(settings, ["fastppo", "trl"], tmp_path).read_text())
    assert result["environment"]["cpu"] is False
    rows = {row["trainer"]: row for row in result["rows"]}
    for row in rows.values():
        assert row["peak_allocated_bytes"] > row["resident_bytes"] > 0
        assert row["peak_reserved_bytes"] >= row["peak_allocated_bytes"]
        assert row["completion_len_measured"] == 32
    assert rows["fastppo"]["peak_memory_vs_trl"] > 0
    search = bench_memory.MemorySettings(
        model="qwen2.5-0.5b", prompt_len=32, completion_len=32, start=8, max_probes=2
    )
    memory = json.loads(bench_memory.run(search, ["fastppo"], tmp_path).read_text())
    assert memory["rows"][0]["kind"] == "measurement" and memory["rows"][0]["max_ok"] >= 8


def test_tile_variants_launch_under_their_tunables_and_restore_the_defaults(monkeypatch):
    """The GPU sweep's rows run the kernel under other module constants and put the defaults back,
    also when the run fails; an unknown tunable is refused."""
    from fastppo.benchmarks import kernel_bench
    from fastppo.kernels.token_logprobs import triton as token_kernels

    monkeypatch.setattr(kernel_bench, "on_gpu", lambda: True)
    defaults = {name: getattr(token_kernels, name) for name in kernel_bench.TUNABLES}
    seen = []

    def run():
        seen.append({name: getattr(token_kernels, name) for name in kernel_bench.TUNABLES})

    streamed = kernel_bench.tile_variants(run, 151936, fused_loss=True)
    on_chip = kernel_bench.tile_variants(run, 32000, fused_loss=True)
    for impl in streamed + on_chip:
        impl.run()
    assert [i.name for i in streamed] == [
        "fastppo[block=4096]",
        "fastppo[block=16384]",
        "fastppo[no-l2-hints]",
    ]
    assert [i.name for i in on_chip] == ["fastppo[warps=32]", "fastppo[stream]"]
    changed = [{k: v for k, v in s.items() if v != defaults[k]} for s in seen]
    assert changed == [
        {"MAX_BLOCK_V": 4096},
        {"MAX_BLOCK_V": 16384},
        {"L2_HINTS": False},
        {"SINGLE_TILE_WARPS": 32},
        {"SINGLE_TILE_MAX_V": 0},
    ]
    with pytest.raises(RuntimeError), kernel_bench.block_limits(max_block_v=1024):
        raise RuntimeError("a failing peer")
    assert {name: getattr(token_kernels, name) for name in kernel_bench.TUNABLES} == defaults
    with pytest.raises(ValueError, match="unknown kernel tunables"), kernel_bench.block_limits(block=3):
        pass


def test_memory_benchmark_accounting_rows_are_the_formula():
    """bench_memory's CPU rows: a deep-copied reference doubles the parameters; a shared trunk adds
    only the reference's own layers; 8-bit state is smaller than torch AdamW's."""
    from fastppo.memory.accounting import unique_parameter_bytes

    rows = {
        (r["algo"], r["num_frozen_layers"], r["optim"]): r for r in bench_memory.account(["qwen2.5-0.5b"])
    }
    policy, _ = bench_memory.accounting_modules("qwen2.5-0.5b", "grpo", None)
    _, shared = bench_memory.accounting_modules("qwen2.5-0.5b", "grpo", 12)
    assert rows["grpo", None, "adamw_torch"]["parameter_bytes"] == 2 * unique_parameter_bytes(policy)
    own = sum(p.numel() * p.element_size() for p in shared.parameters())  # layers [12, 24) + norm
    assert rows["grpo", 12, "adamw_torch"]["parameter_bytes"] == unique_parameter_bytes(policy) + own
    for algo in ("grpo", "ppo"):
        for k in (None, 12):
            assert rows[algo, k, "adamw_8bit"]["static_bytes"] < rows[algo, k, "adamw_torch"]["static_bytes"]
