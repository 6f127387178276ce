"""PGPO's information-modulated step size: one multiplier per optimizer step, applied to the learning rate.

    m_k = clip( I_k / mean_{j<k} I_j , m_min, m_max )          (the running mean is an EMA with rate `1 - beta`)
    lr_k = m_k * lr_k(schedule)                                  for step k only

The form, the bounds and the EMA are our reading of the paper (research/papers.md §3.3, [I]): bounded so the
rescaled step stays a smooth bounded rescaling of SGD's (the paper's order-1 weak-approximation claim), relative to
a running mean so the learning rate keeps its meaning. It scales the learning rate, not the loss, because Adam's
update is nearly invariant to the scale of the loss.
"""

from __future__ import annotations

import math
from typing import Any


def step_size_multiplier(information: float, running_mean: float | None, low: float, high: float) -> float:
    """m_k for this step's I_k; 1.0 on the first step (no history) or when the history is 0."""
    if running_mean is None or running_mean <= 0.0 or not math.isfinite(information):
        return 1.0
    return min(max(information / running_mean, low), high)


def update_running_mean(running_mean: float | None, information: float, beta: float) -> float:
    """EMA of I: the first value starts it."""
    if running_mean is None:
        return information
    return beta * running_mean + (1.0 - beta) * information


class StepSizeController:
    """The multiplier's state across steps (saved in checkpoints): the running mean of I and the latest values."""

    def __init__(self, low: float, high: float, beta: float, enabled: bool = True):
        self.low, self.high, self.beta, self.enabled = low, high, beta, enabled
        self.running_mean: float | None = None
        self.steps = 0

    def multiplier(self, information: float | None) -> float:
        """m_k for a step with information `information` (None: the step had no distillation tokens), then update.

        When disabled (plain SDPO), I_k is still tracked for logging and the multiplier is 1.
        """
        if information is None:
            return 1.0
        m = step_size_multiplier(information, self.running_mean, self.low, self.high)
        self.running_mean = update_running_mean(self.running_mean, information, self.beta)
        self.steps += 1
        return m if self.enabled else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_mean = state["running_mean"]
        self.steps = state["steps"]
