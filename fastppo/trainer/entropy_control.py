"""The entropy bonus's coefficient over a GRPO run: TRL 1.16's static ``entropy_coef``, or
Skywork-OR1's adaptive control (``use_adaptive_entropy``, arXiv 2505.22312), with TRL's rule and timing:

- every micro-batch of an accumulation window applies the coefficient as it stood after the previous
  optimizer step, and under adaptive control only while the entropy measured at that step was at or
  below ``entropy_target`` (before the first measurement it is taken as infinite: the first window
  trains without the bonus);
- at the end of each window the mean entropy of the tokens trained on, over every micro-batch of the
  window and every process (token-weighted: sums and counts are added, then divided), moves the
  coefficient one ``entropy_coef_delta`` up (at or below the target) or down, within
  ``[entropy_coef_min, entropy_coef_max]``.

The trainer owns the collectives and the loss scale; this holds the rule and its state, which a
checkpoint carries (``state_dict``): checkpoints fall on optimizer-step boundaries, where the window
is empty, so the coefficient and the last measurement are all an exact resume needs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class EntropyControl:
    """The coefficient of the entropy bonus (``loss -= coef * mean entropy``) and its adaptive rule."""

    coef: float  # the coefficient now (static control: entropy_coef throughout)
    adaptive: bool  # use_adaptive_entropy
    coef_min: float = 0.0
    coef_max: float = 1.0
    delta: float = 0.005
    target: float = 0.2  # nats
    last_world_entropy: float = math.inf  # measured at the last optimizer step; inf before the first
    window_entropy_sum: float = 0.0  # this process's micro-batches since the last optimizer step
    window_tokens: float = 0.0

    @classmethod
    def from_config(cls, args: Any) -> EntropyControl:
        return cls(
            coef=args.entropy_coef,
            adaptive=args.use_adaptive_entropy,
            coef_min=args.entropy_coef_min,
            coef_max=args.entropy_coef_max,
            delta=args.entropy_coef_delta,
            target=args.entropy_target,
        )

    @property
    def enabled(self) -> bool:
        """The bonus is part of the loss (TRL's ``_entropy_bonus_enabled``): a non-zero coefficient, or
        adaptive control, which stays on at a coefficient of 0 so that it can recover."""
        return self.adaptive or self.coef != 0.0

    def applied(self) -> float:
        """The coefficient every micro-batch of the current window applies."""
        if self.adaptive and not self.last_world_entropy <= self.target:
            return 0.0
        return self.coef

    def record(self, entropy_sum: float, tokens: float) -> None:
        """One micro-batch's summed entropy over the tokens trained on, and their count."""
        if self.adaptive:
            self.window_entropy_sum += entropy_sum
            self.window_tokens += tokens

    def end_window(self, world_entropy_sum: float, world_tokens: float) -> None:
        """At an optimizer step: the window's totals over every process move the coefficient."""
        world = world_entropy_sum / max(world_tokens, 1.0)
        if world <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_world_entropy = world
        self.window_entropy_sum = self.window_tokens = 0.0

    def state_dict(self) -> dict[str, float]:
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_world_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["entropy_coef"])
        self.last_world_entropy = float(state["last_world_entropy"])
