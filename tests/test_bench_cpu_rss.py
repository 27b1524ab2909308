"""benchmarks/bench_cpu_rss.py: each trainer's peak RSS from its own interpreter, against TRL's."""

from __future__ import annotations

import pytest
from fastppo.benchmarks import bench_cpu_rss


@pytest.mark.slow  # two fresh interpreters, each training one step
def test_each_trainer_is_measured_in_its_own_process_against_trl():
    args = bench_cpu_rss.parse_args(
        ["--vocab", "512", "--batch", "4", "--num-generations", "2", "--prompt-len", "4"]
        + ["--completion-len", "4", "--steps", "1", "--trainers", "fastppo@1048576,trl"]
    )
    fastppo, trl = bench_cpu_rss.run(args)
    assert (fastppo["trainer"], trl["trainer"]) == ("fastppo@1048576", "trl")
    for row in (fastppo, trl):
        assert row["vocab"] == 512 and row["steps"] == 1
        assert row["peak_rss_bytes"] >= row["imports_rss_bytes"] > 0  # the run may add nothing at this size
    assert trl["peak_vs_trl"] == 1.0
    assert fastppo["peak_vs_trl"] == fastppo["peak_rss_bytes"] / trl["peak_rss_bytes"]
    trl_added = trl["peak_rss_bytes"] - trl["imports_rss_bytes"]
    assert trl["added_vs_trl"] == (1.0 if trl_added else None)
