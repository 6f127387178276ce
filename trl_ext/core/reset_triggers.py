"""When to reset the reference policy (pi_ref <- pi_theta): pure decision rules, no tensors and no trainer.

ProRL resets the reference policy and the optimizer state "when validation stalls or degrades, or when the KL
term dominates the loss" (arXiv 2505.24864, runs separated by hard resets). The paper fixes no schedule, so three
triggers are offered; any of them requests a reset:

* schedule:   every `every_steps` optimizer steps;
* validation: the tracked validation metric has not improved by more than `min_delta` on `patience` consecutive
              evaluations;
* KL share:   the KL term's share of the per-token loss magnitude, `kl_share` below, stays above
              `kl_share_threshold` for `kl_patience` consecutive optimizer steps.

The callback feeds these rules numbers that are identical on every process (global metrics), so every process
decides identically, with no extra communication.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SCHEDULE, VALIDATION, KL_SHARE = "schedule", "validation", "kl_share"


def kl_share(beta: float, kl: float, advantage_scale: float) -> float:
    """Share of the per-token loss magnitude that is the KL penalty: beta*KL / (beta*KL + E|A|).  [our definition]

    With ratios near 1 the policy term of a token weighs about |A| (its advantage), and the penalty beta times the
    token's KL estimate; "the KL term dominates the loss" is read as this share exceeding a threshold (0.5: the KL
    term is larger than the policy term). NaN when both are zero (nothing to compare: no informative token).
    """
    if math.isnan(kl) or math.isnan(advantage_scale):
        return math.nan
    kl_term = beta * max(kl, 0.0)
    total = kl_term + max(advantage_scale, 0.0)
    return kl_term / total if total > 0 else math.nan


@dataclass(frozen=True)
class ResetSchedule:
    """Which triggers request a reference reset. All off by default (the paper resets by hand between runs)."""

    every_steps: int | None = None
    metric: str | None = None  # a key of the evaluation metrics, e.g. "eval_reward" ("reward" finds "eval_reward")
    patience: int = 3
    greater_is_better: bool = True
    min_delta: float = 0.0
    kl_share_threshold: float | None = None
    kl_patience: int = 1

    def __post_init__(self):
        if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise ValueError(
                f"The reset schedule `every_steps` must be a positive integer or None, got {self.every_steps!r}."
            )
        if self.patience < 1:
            raise ValueError(f"The validation `patience` must be >= 1 evaluation, got {self.patience}.")
        if self.metric is not None and not (isinstance(self.metric, str) and self.metric.strip()):
            raise ValueError(
                f"The validation `metric` must name an evaluation metric (e.g. 'eval_reward'), got {self.metric!r}; "
                "use None for no validation trigger."
            )
        if not self.min_delta >= 0:  # NaN fails this too: no evaluation would ever count as an improvement
            raise ValueError(f"`min_delta` must be >= 0, got {self.min_delta}.")
        if self.kl_share_threshold is not None and not 0 < self.kl_share_threshold < 1:
            raise ValueError(
                f"`kl_share_threshold` must be in (0, 1), got {self.kl_share_threshold}: it is the KL term's share "
                "of the per-token loss magnitude (0.5 = the KL term is as large as the policy term)."
            )
        if self.kl_patience < 1:
            raise ValueError(f"`kl_patience` must be >= 1 optimizer step, got {self.kl_patience}.")

    @property
    def enabled(self) -> bool:
        return self.every_steps is not None or self.metric is not None or self.kl_share_threshold is not None


class ResetTriggers:
    """The triggers' running state: best validation value, evaluations without improvement, KL-dominance streak."""

    def __init__(self, schedule: ResetSchedule):
        self.schedule = schedule
        self.best: float | None = None
        self.stalled = 0
        self.kl_streak = 0

    def after_step(self, step: int, share: float | None = None) -> str | None:
        """Feed one finished optimizer step (and its KL share, when measured); returns the reason to reset, if any."""
        s = self.schedule
        reason = None
        if s.kl_share_threshold is not None and share is not None and not math.isnan(share):
            self.kl_streak = self.kl_streak + 1 if share > s.kl_share_threshold else 0
            if self.kl_streak >= s.kl_patience:
                reason = KL_SHARE
        if s.every_steps is not None and step > 0 and step % s.every_steps == 0:
            reason = reason or SCHEDULE
        return reason

    def metric_value(self, metrics: dict[str, float]) -> float:
        name = self.schedule.metric
        for key in (name, f"eval_{name}"):
            if key in metrics:
                return float(metrics[key])
        raise KeyError(
            f"The reference-reset metric {name!r} is not among the evaluation metrics {sorted(metrics)}. Set "
            "`ref_reset_metric` to one of them."
        )

    def after_validation(self, metrics: dict[str, float]) -> str | None:
        """Feed one evaluation's metrics; returns VALIDATION once the metric has stalled for `patience` evaluations."""
        s = self.schedule
        if s.metric is None:
            return None
        value = self.metric_value(metrics)
        if math.isnan(value):
            return None
        if self.best is None:
            improved = True
        elif s.greater_is_better:
            improved = value > self.best + s.min_delta
        else:
            improved = value < self.best - s.min_delta
        if improved:
            self.best, self.stalled = value, 0
            return None
        self.stalled += 1
        return VALIDATION if self.stalled >= s.patience else None

    def reset_done(self) -> None:
        """Start counting afresh after a reset (the best validation value is kept: later runs must beat it)."""
        self.stalled = 0
        self.kl_streak = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "stalled": self.stalled, "kl_streak": self.kl_streak,
                "schedule": asdict(self.schedule)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.stalled, self.kl_streak = state["best"], state["stalled"], state["kl_streak"]
