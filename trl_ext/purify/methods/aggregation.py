"""Knowledge aggregation: all teachers merged into one consolidated teacher, weighted by how right each is.

Paper [S]: a large LLM (GPT-4) reads all teachers' rationales and writes one consolidated rationale; no training;
the least reliable of the five at resolving conflicts. In TinyLLM's pipeline the teachers see the gold answer when
they write their rationales. Online [I]: the consolidated teacher is the weighted geometric mean of ALL teachers,
log pi*(y) = sum_k w_k log pi_k(y), with w = softmax(signal / aggregation_temperature) over the prompt's own signal
(the aggregator, like the paper's, sees every teacher's output on this prompt and the answer's verdict), and equal
weights on prompts without a signal (then it is the naive average). Nothing is learned or remembered, so nothing
transfers to prompts without rewards; every teacher keeps some weight, so a confidently wrong teacher still pulls.

An earlier variant, the reward-free mixture of the teachers' distributions log (1/K) sum_k pi_k(y), let the student
follow any teacher's mode (the reversal expert's letters on additions) and collapsed the demo student's reward.
"""

from __future__ import annotations

import torch

from .base import Decision, Purifier


def aggregation_weights(signal: torch.Tensor, temperature: float) -> torch.Tensor:
    """(Q, K) signal -> softmax(signal / temperature) per prompt; uniform where the prompt has no signal."""
    defined = ~torch.isnan(signal).any(dim=1, keepdim=True)
    weights = torch.softmax(signal.nan_to_num(0.0) / temperature, dim=1)
    return torch.where(defined, weights, torch.full_like(weights, 1.0 / signal.size(1)))


class Aggregation(Purifier):
    name = "aggregation"

    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool) -> Decision:
        weights = aggregation_weights(signal.float().cpu(), self.settings.aggregation_temperature)
        return Decision(weights, torch.zeros(features.size(0), dtype=torch.bool))
