"""Where metrics go, alone: the weighted buffer behind every logged mean, and the reward curve."""

from __future__ import annotations

from fastppo.metrics import MetricsBuffer, plot_reward_curve


def test_metrics_buffer_weights_by_count_and_skips_nan():
    buffer = MetricsBuffer()
    buffer.add("entropy", 1.0, weight=30)  # a minibatch of 30 tokens
    buffer.add("entropy", 4.0, weight=10)  # a minibatch of 10 tokens
    buffer.add("reward", float("nan"))
    assert buffer.flush() == {"entropy": (30 * 1.0 + 10 * 4.0) / 40}
    assert buffer.flush() == {}


def test_reward_plot_needs_rewards(tmp_path):
    assert plot_reward_curve([{"step": 1, "loss": 0.1}], str(tmp_path / "a.png")) is None
    path = plot_reward_curve(
        [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.3, "kl": 0.01}], str(tmp_path / "b.png")
    )
    assert path and (tmp_path / "b.png").stat().st_size > 0
