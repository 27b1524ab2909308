"""Numeric guard for optimizer steps: a non-finite loss or gradient norm never reaches the weights.

Policy (``TrainerBase.optimizer_step`` applies it at the end of every accumulation window):
- a window whose summed loss or gradient norm is NaN/inf is *skipped*: gradients are zeroed, the
  optimizer does not step and neither does the learning-rate scheduler (the schedule counts real
  updates, as transformers' Trainer does when fp16's GradScaler skips a step); ``global_step`` still
  advances (the rollout was consumed and the step is logged), and ``skipped_steps`` counts it;
- fp16: a finite loss with an inf gradient is loss-scale overflow; the GradScaler skips that step and
  lowers its scale itself, so it is counted in ``skipped_steps`` but not towards the limit below;
- ``max_consecutive_nonfinite_steps`` skipped windows in a row stop training with a
  ``NonFiniteTrainingError`` naming the step and the likely causes.
"""

from __future__ import annotations

import dataclasses
import math


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass
class StepVerdict:
    """What to do with one accumulation window."""

    apply: bool  # step the optimizer and the scheduler
    reason: str  # "" when applied, else what was non-finite


@dataclasses.dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises after ``max_consecutive`` in a row (see the module docstring)."""

    max_consecutive: int = 3
    consecutive: int = 0  # skipped windows in a row, ending at the last one
    skipped: int = 0  # skipped windows over the whole run (the ``skipped_steps`` metric)

    def check(
        self, loss: float, grad_norm: float, step: int, *, scaler_overflow_ok: bool = False
    ) -> StepVerdict:
        """Judge the window ending at optimizer step ``step`` (1-based, the step being taken).

        ``scaler_overflow_ok``: a GradScaler is active (fp16), so an inf gradient with a finite loss
        is the scaler's overflow handling, not a failure.
        """
        loss_ok, grad_ok = math.isfinite(loss), math.isfinite(grad_norm)
        if loss_ok and grad_ok:
            self.consecutive = 0
            return StepVerdict(True, "")
        self.skipped += 1
        reason = ", ".join(
            part
            for part, ok in ((f"loss {loss}", loss_ok), (f"gradient norm {grad_norm}", grad_ok))
            if not ok
        )
        if scaler_overflow_ok and loss_ok:
            return StepVerdict(False, reason + " (fp16 loss-scale overflow)")
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(self.message(step, reason))
        return StepVerdict(False, reason)

    def message(self, step: int, reason: str) -> str:
        return (
            f"training stopped at optimizer step {step}: {self.consecutive} steps in a row had a non-finite "
            f"{reason} (max_consecutive_nonfinite_steps={self.max_consecutive}); these steps were skipped, "
            "the weights hold no NaN. Likely causes: a learning rate too high (try 10x lower, or warmup); "
            "rewards that are NaN/inf or huge (check the reward functions; skip_invalid_rewards=True drops "
            "NaN/inf samples); fp16 overflow (use bf16, or fp32); a KL/ratio blow-up when the policy drifted "
            "far from the reference or the old policy (lower learning_rate or beta, fewer num_iterations); "
            "NaN already in the model or its inputs (token ids beyond the vocabulary). Raise "
            "max_consecutive_nonfinite_steps to tolerate longer streaks."
        )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.skipped = int(state["consecutive"]), int(state["skipped"])
