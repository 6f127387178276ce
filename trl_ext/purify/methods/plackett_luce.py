"""Plackett-Luce ranking: the teachers ranked for each prompt by a Plackett-Luce model, the top one used.

Paper [S, secondary transcription]: P(teacher i | q) = exp(xi_i) / sum_j exp(xi_j), with the scores xi fitted for
each question by maximum likelihood over training rankings weighted by w = gamma^(1 + cos(e_q, e_train)),
"borrowed from RouteLLM" (similarity-weighted ranking, gamma = 10 there). Here [I]:

* the training rankings are the stored prompts' signals (purify/signal.py): teacher k ranks above teacher l on a
  stored prompt when its signal is higher;
* ties use Breslow's approximation: every teacher contributes  xi_k - logsumexp_{l : s_l <= s_k} xi_l,  which is the
  exact Plackett-Luce log-likelihood when there are no ties;
* xi is fitted per prompt by `plackett_luce_steps` Newton steps on the weighted mean log-likelihood (concave)
  with a small L2 penalty that keeps xi finite when one teacher always wins;
* similarities are the centred cosines of the router features;
* gamma defaults to 1000, not RouteLLM's 10: on the hashed n-gram features, additions with different first operands
  (where the generalist is right or confidently wrong) differ by a few n-grams only, and at gamma 10 the fit was
  close to the global ranking (purify benchmark, 4 seeds, in-domain student reward: 0.333 at 10, level with
  averaging; 0.387 at 100; 0.400 at 1000).

The router sees only the prompt. Until `min_examples` decisive prompts are stored it averages all teachers.
"""

from __future__ import annotations

import torch

from ..signal import BEST_TOLERANCE
from .base import Decision, MemoryRouter, RouterSettings, fallback_decision, top_choice


def risk_sets(signals: torch.Tensor, tolerance: float = BEST_TOLERANCE) -> torch.Tensor:
    """(M, K) signals -> (M, K, K) bool: [m, k, l] is True when teacher l is not ranked above teacher k."""
    return signals.unsqueeze(1) <= signals.unsqueeze(2) + tolerance


def plackett_luce_log_likelihood(scores: torch.Tensor, signals: torch.Tensor) -> torch.Tensor:
    """(Q, K) scores xi and (M, K) rankings given as signals -> (Q, M) log-likelihood of each ranking (Breslow ties)."""
    risk = risk_sets(signals).to(scores.dtype)  # (M, K, K)
    logits = scores[:, None, None, :] + risk.log()[None]  # (Q, M, K, K); -inf outside the risk set
    return (scores[:, None, :] - torch.logsumexp(logits, dim=-1)).sum(dim=-1)


def similarity_weights(similarities: torch.Tensor, gamma: float) -> torch.Tensor:
    """RouteLLM's weights gamma^(1 + cos), normalised to sum to 1 per query."""
    w = torch.pow(torch.as_tensor(gamma, dtype=similarities.dtype), 1.0 + similarities)
    return w / w.sum(dim=1, keepdim=True)


def distinct_rankings(signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rankings among (M, K) signals, as (P, K, K) risk sets, and each signal's ranking index (M,).

    The likelihood depends on a stored prompt only through its ranking, and K teachers have few distinct rankings
    (13 weak orders for K = 3), so the fit works on P rankings with summed weights instead of M prompts.
    """
    risk = risk_sets(signals)
    patterns, index = torch.unique(risk.flatten(1), dim=0, return_inverse=True)
    return patterns.view(-1, signals.size(1), signals.size(1)), index


def fit_plackett_luce(signals: torch.Tensor, weights: torch.Tensor, steps: int = 20, l2: float = 0.01) -> torch.Tensor:
    """Per-query scores xi (Q, K) maximising sum_m w[q, m] * loglik(ranking m | xi_q) - l2/2 * |xi_q|^2.

    Newton's method on this concave objective, from xi = 0. With P_mk(j) = teacher j's softmax probability inside
    teacher k's risk set, the gradient is  sum_m w_qm (1 - sum_k P_mk(j)) - l2 xi_j  and the negative Hessian
    sum_m w_qm sum_k (diag(P_mk) - P_mk P_mk^T) + l2 I  (positive definite).
    """
    patterns, index = distinct_rankings(signals)
    w = torch.zeros(weights.size(0), patterns.size(0), dtype=torch.float64).index_add_(1, index, weights.double())
    risk_log = patterns.double().log()  # (P, K, K); -inf outside the risk sets
    num_teachers = signals.size(1)
    xi = torch.zeros(weights.size(0), num_teachers, dtype=torch.float64)
    ridge = l2 * torch.eye(num_teachers, dtype=torch.float64)
    for _ in range(steps):
        p = torch.softmax(xi[:, None, None, :] + risk_log[None], dim=-1)  # (Q, P, K, K): [q, m, k, j]
        grad = torch.einsum("qm,qmj->qj", w, 1.0 - p.sum(dim=2)) - l2 * xi
        curvature = torch.diag_embed(p.sum(dim=2)) - torch.einsum("qmkj,qmkl->qmjl", p, p)
        neg_hessian = torch.einsum("qm,qmjl->qjl", w, curvature) + ridge
        step = torch.linalg.solve(neg_hessian, grad.unsqueeze(-1)).squeeze(-1)
        xi = xi + step
        if step.abs().max() < 1e-7:  # converged (Newton is quadratic near the optimum)
            break
    return xi.float()


class PlackettLuceRanking(MemoryRouter):
    name = "plackett_luce"

    def __init__(self, num_teachers: int, feature_dim: int, settings: RouterSettings):
        super().__init__(num_teachers, feature_dim, settings)
        self.last_scores: torch.Tensor | None = None  # (Q, K) fitted xi of the latest decision, for inspection

    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus) -> Decision:
        q = features.size(0)
        if not self.ready:
            return fallback_decision(q, self.num_teachers)
        _, signals = self.memory.contents()
        weights = similarity_weights(self.memory.similarities(features), self.settings.plackett_luce_gamma)
        xi = fit_plackett_luce(signals, weights, self.settings.plackett_luce_steps, self.settings.plackett_luce_l2)
        self.last_scores = xi
        # Teachers the rankings cannot tell apart get (numerically almost) equal scores: split the weight.
        return Decision(top_choice(xi, tolerance=1e-4), torch.zeros(q, dtype=torch.bool))

