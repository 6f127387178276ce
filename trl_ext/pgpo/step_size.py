"""PGPO's information-modulated step size: one multiplier per optimizer step, applied to the learning rate.

    m_k = clip( (I_k / mean_{j<k} I_j) ** gamma , m_min, m_max )   (the running mean is an EMA with rate `1 - beta`)
    lr_k = m_k * lr_k(schedule)                                  for step k only

(or relative to the peak of the running mean, and with the ratchet never above the multiplier of the running mean's
lowest value since that peak: see StepSizeController).

The form, the bounds and the EMA are our reading of the paper's abstract ([I]): bounded so the
rescaled step stays a smooth bounded rescaling of SGD's (the paper's order-1 weak-approximation claim), relative to
a running mean so the learning rate keeps its meaning, with a sensitivity `gamma` because a step's information moves
only by some 10% between informative and misleading batches. It scales the learning rate, not the loss, because Adam's
update is nearly invariant to the scale of the loss.
"""

from __future__ import annotations

import math
from typing import Any


def step_size_multiplier(information: float, running_mean: float | None, low: float, high: float,
                         power: float = 1.0) -> float:
    """m_k for this step's I_k; 1.0 on the first step (no history) or when the history is 0."""
    if running_mean is None or running_mean <= 0.0 or not math.isfinite(information):
        return 1.0
    return min(max((max(information, 0.0) / running_mean) ** power, low), high)


def update_running_mean(running_mean: float | None, information: float, beta: float) -> float:
    """EMA of I: the first value starts it."""
    if running_mean is None:
        return information
    return beta * running_mean + (1.0 - beta) * information


REFERENCES = ("running", "peak")


class StepSizeController:
    """The multiplier's state across steps (saved in checkpoints): the running mean of I, its peak, the step count.

    The reference I_k is compared with is the running mean ("running": steps are large or small relative to recent
    ones) or the highest value the running mean has reached ("peak": steps shrink while the teacher's information
    drains away, e.g. when the self-teacher loses the skill of reading its privileged context). With `ratchet`, m_k
    is also capped by the multiplier of the lowest running mean since the peak, so information that drained away
    does not raise the step again until the running mean sets a new peak: when a student collapses, it fails so
    often that even a teacher that has lost its skill "predicts" the verdicts by lowering everything.
    """

    def __init__(self, low: float, high: float, beta: float, power: float = 1.0, reference: str = "running",
                 enabled: bool = True, ratchet: bool = False):
        if reference not in REFERENCES:
            raise ValueError(f"Unknown reference {reference!r}; choose one of {REFERENCES}.")
        self.low, self.high, self.beta, self.power, self.enabled = low, high, beta, power, enabled
        self.reference, self.ratchet = reference, ratchet
        self.running_mean: float | None = None
        self.peak_mean: float | None = None
        self.trough_mean: float | None = None  # the lowest running mean since the peak (for the ratchet)
        self.steps = 0

    def multiplier(self, information: float | None) -> float:
        """m_k for a step with information `information`, then update the state.

        None (or a non-finite value) means the step has no measurement: no distillation tokens, or an estimator
        undefined on it (`verified` when every completion with a context got the same verdict, typical of a
        collapsing student). Such a step leaves the state alone and moves at the multiplier the state implies now,
        its running mean standing in for I_k (1 with the "running" reference), under the ratchet's cap: the step
        is not allowed back to full size just because nothing was measured.
        When disabled (plain SDPO), I_k is still tracked for logging and the multiplier is 1.
        """
        if information is None or not math.isfinite(information):
            m = 1.0 if self.running_mean is None else self._bounded(self.running_mean)
            return m if self.enabled else 1.0
        m = self._bounded(information)
        self.running_mean = update_running_mean(self.running_mean, information, self.beta)
        if self.peak_mean is None or self.running_mean >= self.peak_mean:
            self.peak_mean = self.trough_mean = self.running_mean
        else:
            self.trough_mean = min(self.trough_mean, self.running_mean)
        self.steps += 1
        return m if self.enabled else 1.0

    def _bounded(self, information: float) -> float:
        """The multiplier for `information` against the reference, capped by the ratchet."""
        reference = self.peak_mean if self.reference == "peak" else self.running_mean
        m = step_size_multiplier(information, reference, self.low, self.high, self.power)
        if self.ratchet and self.trough_mean is not None:
            m = min(m, step_size_multiplier(self.trough_mean, self.peak_mean, self.low, self.high, self.power))
        return m

    def state_dict(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean, "peak_mean": self.peak_mean, "trough_mean": self.trough_mean,
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_mean, self.peak_mean, self.steps = state["running_mean"], state["peak_mean"], state["steps"]
        self.trough_mean = state["trough_mean"]
