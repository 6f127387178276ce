"""`purification="none"`: no purification, every teacher with equal weight (the naive multi-teacher baseline).

The student's per-token log-ratio is taken against the average of the teachers' log-probs, i.e. the average of the
K per-teacher distillation signals: TinyLLM's "one loss per teacher" recipe, which the paper shows degrades as
conflicting teachers are added [S]. Online form [I].
"""

from __future__ import annotations

import torch

from .base import Decision, Purifier, uniform_weights


class Averaging(Purifier):
    name = "none"

    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus) -> Decision:
        q = features.size(0)
        return Decision(uniform_weights(q, self.num_teachers), torch.zeros(q, dtype=torch.bool))
