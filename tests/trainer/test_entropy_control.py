"""EntropyControl alone: the entropy bonus's coefficient under static and adaptive control (TRL 1.16's
rule, Skywork-OR1), hand-worked and against TRL's own ``_compute_loss`` driven window by window."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from fastppo.trainer.entropy_control import EntropyControl


def adaptive(**fields) -> EntropyControl:
    return EntropyControl(
        **{
            "coef": 0.05,
            "adaptive": True,
            "delta": 0.03,
            "coef_min": 0.0,
            "coef_max": 0.1,
            "target": 1.0,
            **fields,
        }
    )


def test_static_control_applies_its_coefficient_throughout():
    control = EntropyControl(coef=0.02, adaptive=False)
    assert control.enabled and control.applied() == 0.02
    control.record(5.0, 2.0)  # nothing to measure for static control
    assert (control.window_entropy_sum, control.window_tokens) == (0.0, 0.0)
    assert not EntropyControl(coef=0.0, adaptive=False).enabled
    assert EntropyControl(coef=0.0, adaptive=True).enabled  # stays on at 0 so that it can recover


def test_adaptive_rule_hand_worked():
    control = adaptive()
    assert control.applied() == 0.0  # no measurement yet: the first window trains without the bonus
    control.record(0.5 * 4, 4)  # window entropy 0.5 <= target 1.0: one delta up
    control.end_window(control.window_entropy_sum, control.window_tokens)
    assert (control.coef, control.last_world_entropy, control.applied()) == (pytest.approx(0.08), 0.5, 0.08)
    control.record(0.9, 1)
    control.end_window(0.9, 1)  # up again, capped at coef_max
    assert control.coef == 0.1 and control.applied() == 0.1
    control.end_window(2.0 * 3, 3)  # above the target: one delta down, and off for the next window
    assert control.coef == pytest.approx(0.07) and control.applied() == 0.0
    for _ in range(5):
        control.end_window(6.0, 3)
    assert control.coef == 0.0  # floored at coef_min
    control.end_window(1.0, 1)  # exactly at the target counts as at or below
    assert control.coef == pytest.approx(0.03) and control.applied() == pytest.approx(0.03)


def test_window_is_token_weighted_and_starts_empty_after_each_step():
    control = adaptive()
    control.record(1.0 * 2, 2)
    control.record(4.0 * 6, 6)
    assert (control.window_entropy_sum, control.window_tokens) == (26.0, 8.0)
    control.end_window(control.window_entropy_sum, control.window_tokens)
    assert control.last_world_entropy == 26.0 / 8.0  # not the mean of the two means (2.5)
    assert (control.window_entropy_sum, control.window_tokens) == (0.0, 0.0)
    control.end_window(0.0, 0.0)  # a window without tokens: entropy 0 (TRL clamps the count to 1)
    assert control.last_world_entropy == 0.0


def test_state_round_trips_under_trls_names():
    control = adaptive()
    assert control.state_dict() == {"entropy_coef": 0.05, "last_world_entropy": math.inf}
    control.end_window(0.5, 1)
    fresh = adaptive()
    fresh.load_state_dict(control.state_dict())
    assert (fresh.coef, fresh.last_world_entropy) == (control.coef, control.last_world_entropy)


class _Accelerator:
    """One process; ``sync_gradients`` set by the test at each window's last micro-batch."""

    num_processes = 1
    sync_gradients = False

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trls_controller(control: EntropyControl, accumulation: int):
    """TRL's GRPOTrainer as far as ``_compute_loss`` reads it for a grpo loss without KL, with
    adaptive entropy control set up as ``control``; ``step(entropy, mask)`` runs one micro-batch
    and returns the coefficient it applied."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type="grpo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        entropy_coef=control.coef,
        use_adaptive_entropy=True,
        _entropy_bonus_enabled=True,
        _last_world_entropy=math.inf,
        _entropy_window_stats=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        args=types.SimpleNamespace(
            use_bias_correction_kl=True,
            delta=None,
            entropy_target=control.target,
            entropy_coef_delta=control.delta,
            entropy_coef_min=control.coef_min,
            entropy_coef_max=control.coef_max,
        ),
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation,
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list)},
        aux_loss_enabled=False,
    )

    def step(entropy: torch.Tensor, mask: torch.Tensor, last: bool) -> float:
        batch, length = entropy.shape
        logp = -torch.rand(batch, length, dtype=torch.float64)
        trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
        trainer.accelerator.sync_gradients = last
        inputs = {
            "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
            "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
            "completion_ids": torch.zeros(batch, length, dtype=torch.long),
            "completion_mask": mask,
            "advantages": torch.randn(batch, dtype=torch.float64),
        }
        loss = float(GRPOTrainer._compute_loss(trainer, None, inputs))
        policy = trainer._metrics["train"]["policy_loss"][-1]
        mean_entropy = float((entropy * mask).sum() / mask.sum())
        return (policy / accumulation - loss) * accumulation / mean_entropy  # loss = (P - c H) / GA

    return trainer, step


def test_adaptive_control_matches_trls_compute_loss_window_by_window():
    """The same micro-batches through TRL's own controller and ours: the coefficient each applies,
    the coefficient after each optimizer step and the measured entropy agree. Entropies drift
    across the target so the coefficient rises, caps, falls and is gated off and on."""
    pytest.importorskip("trl")
    accumulation = 2
    ours = adaptive(target=1.0)
    trainer, trl_step = trls_controller(ours, accumulation)
    g = torch.Generator().manual_seed(0)
    for level in (0.4, 0.6, 0.8, 0.9, 1.3, 1.6, 0.7, 0.5, 2.0):
        for micro in range(accumulation):
            entropy = level * (0.5 + torch.rand(3, 5, generator=g, dtype=torch.float64))
            mask = (torch.rand(3, 5, generator=g) < 0.7).long()
            mask[:, 0] = 1
            applied = trl_step(entropy, mask, last=micro == accumulation - 1)
            assert applied == pytest.approx(ours.applied(), abs=1e-12)
            ours.record(float((entropy * mask).sum()), float(mask.sum()))
        ours.end_window(ours.window_entropy_sum, ours.window_tokens)
        assert ours.coef == pytest.approx(trainer.entropy_coef, abs=1e-15)
        assert ours.last_world_entropy == pytest.approx(trainer._last_world_entropy, rel=1e-12)
    assert trainer._metrics["train"]["entropy_coef"] == pytest.approx(
        [0.08, 0.1, 0.1, 0.1, 0.07, 0.04, 0.07, 0.1, 0.07]
    )
