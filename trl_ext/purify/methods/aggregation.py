"""Knowledge aggregation: all teachers merged into one consolidated teacher, weighted by how right each is.

Paper [S]: a large LLM (GPT-4) reads all teachers' rationales and writes one consolidated rationale; no training;
the least reliable of the five at resolving conflicts. In TinyLLM's pipeline the teachers see the gold answer when
they write their rationales. Online [I]: the consolidated teacher is the weighted geometric mean of ALL teachers,
log pi*(y) = sum_k w_k log pi_k(y), with w = softmax(evidence / aggregation_temperature) over the prompt's own
teachers' outputs, like the paper's aggregator, which reads every teacher on this question:

* where the prompt has a signal (its completions' rewards differ), the evidence is the signal: the verdict says
  which teachers rank the completions right;
* where it has none (every completion got the same reward, typically all wrong: exactly the prompts where the
  student most needs a teacher), the evidence is the teachers' CONSENSUS (signal.teacher_consensus): a teacher
  that orders the completions like the other teachers gets more weight, one at odds with all of them (a teacher
  that knows nothing of the task) less. It is a majority vote, as a consolidating LLM would make without the
  answer; when the majority is wrong, so is the aggregate. Without a consensus (None): equal weights there.

Nothing is learned or remembered, so nothing transfers between prompts; every teacher keeps some weight, so a
confidently wrong teacher still pulls.

Variants tried on the demo world (benchmarks/purify_benchmark.py, 4 seeds): the reward-free mixture of the teachers'
distributions log (1/K) sum_k pi_k(y) let the student follow any teacher's mode (the reversal expert's letters on
additions) and collapsed its reward. Equal weights on prompts without a signal (the previous default, 0.327 against
averaging's 0.333 on seeds 0-3) and the consensus (this one, 0.311; on seeds 4-7 0.248 against 0.297) both end at or
below the naive average; the consensus puts more weight on the right teachers (held-out routing accuracy
0.84 -> 0.91), so it is kept. Why soft evidence weights do worse than equal ones here is open.
"""

from __future__ import annotations

import torch

from ..signal import evidence
from .base import Decision, Purifier


def aggregation_weights(signal: torch.Tensor, temperature: float, consensus: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, K) signal -> softmax(evidence / temperature) per prompt, the evidence being the signal where the prompt
    has one, else the (Q, K) consensus; uniform where neither is available (signal.evidence)."""
    return torch.softmax(evidence(signal, consensus) / temperature, dim=1)


class Aggregation(Purifier):
    name = "aggregation"

    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus) -> Decision:
        consensus = consensus.float().cpu() if consensus is not None else None
        weights = aggregation_weights(signal.float().cpu(), self.settings.aggregation_temperature, consensus)
        return Decision(weights, torch.zeros(features.size(0), dtype=torch.bool))
