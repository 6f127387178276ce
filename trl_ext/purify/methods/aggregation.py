"""Knowledge aggregation: all teachers merged into one consolidated teacher, weighted by how right each is.

Paper [S]: a large LLM (GPT-4) reads all teachers' rationales and writes one consolidated rationale; no training;
the least reliable of the five at resolving conflicts: its conflict-mitigation value is negative for every student
size, and for the smallest student it is below the naive multi-teacher baseline (42.01 vs 42.38 average accuracy).
In TinyLLM's pipeline the teachers see the gold answer when they write their rationales. Online [I]: the
consolidated teacher is the weighted geometric mean of ALL teachers, log pi*(y) = sum_k w_k log pi_k(y), with
w = softmax(evidence / aggregation_temperature) over the prompt's own teachers' outputs, like the paper's aggregator,
which reads every teacher on this question:

* where the prompt has a signal (its completions' rewards differ), the evidence is the signal: the verdict says
  which teachers rank the completions right;
* where it has none (every completion got the same reward, typically all wrong: exactly the prompts where the
  student most needs a teacher), the evidence is the teachers' CONSENSUS (signal.teacher_consensus): a teacher
  that orders the completions like the other teachers gets more weight, one at odds with all of them (a teacher
  that knows nothing of the task) less. It is a majority vote, as a consolidating LLM would make without the
  answer; when the majority is wrong, so is the aggregate. Without a consensus (None): equal weights there.

Nothing is learned or remembered, so nothing transfers between prompts; every teacher keeps some weight, so a
confidently wrong teacher still pulls.

Variants tried on the previous demo world, whose blind-spot generalist an earlier build made weaker at reversal
(benchmarks/purify_benchmark.py, results/purify_previous_world.json; per-seed in-domain differences to averaging vary
by +-0.1, so only a mean difference of more than ~0.04 over 8 seeds means anything):
- the reward-free mixture of the teachers' distributions log (1/K) sum_k pi_k(y): the student followed any teacher's
  mode (the reversal expert's letters on additions) and its reward collapsed;
- this weighting (temperature 0.05, consensus where a prompt has no signal): -0.035 +- 0.017 against averaging over
  seeds 0-7 (ahead on 2 of 8), that world's reference run; with equal weights instead of the consensus on prompts
  without a signal, 0.327 against 0.333 on seeds 0-3, within noise; the consensus is kept because it is what a
  consolidating reader without the answer does (router_accuracy cannot tell the two apart: it is measured on the
  prompts with a signal, where both weigh by the signal);
- temperature 0.5: +0.008 over seeds 0-7 (routing accuracy ~0.6, close to averaging);
- weights proportional to each teacher's evidence above chance, max(e - 1/2, 0) (off-task and confidently wrong
  teachers get none): -0.001 over seeds 0-7;
- a scale-sensitive evidence that separates a sharp expert from a lukewarm generalist ranking the same way: the
  reward-weighted log-likelihood margin sum_i (r_i - mean r) l_k(i) / (1/2 sum_i |r_i - mean r|) in nats, weights
  softmax(margin / 1 nat): +0.034 over seeds 0-7 but +0.001 over fresh seeds 8-15 (0.312 vs 0.311), so no gain.
On that world aggregation lost on additions, where the expert and the generalist both rank the completions right and
the per-prompt evidence splits the weight between them prompt by prompt. The classifier router splits additions
between the same two teachers as often, but by the prompt's features, and does well. A diagnostic run (seed 0, 300
steps) shows where the weight goes: 82% of addition prompts have no signal (all four samples wrong), and there the
consensus gives the addition expert, the reversal expert and the generalist 0.35 / 0.23 / 0.42, near averaging's
thirds but tilted towards the generalist, the weaker addition teacher and wrong on first operands >= 5; where a
signal exists the generalist still keeps 0.29 of the weight on those operands, since its likelihoods rank a right
answer above most wrong ones. Nothing here remembers that the expert is the better addition teacher; the routers
learn that across prompts. On the world today's code builds (results/purify.json, a generalist that reverses without
error) the same weighting beats averaging by +0.090 +- 0.020, on all 8 seeds, most of it on additions (0.297 against
averaging's 0.109): how aggregation fares against averaging depends on the teachers.
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
