"""Similarity-based router: the teacher that did best on the prompt's nearest neighbours with known outcomes.

Paper [S]: a question embedding is compared with learned teacher embeddings (RouterDC, dual contrastive loss); the
router sees only the question; it is the best method for the smallest student and has the best conflict mitigation.
Here [I], as the issue specifies: a non-parametric router over the memory of past prompts with their per-teacher
signal (purify/signal.py). For a new prompt, take its `similarity_neighbors` most similar stored prompts (centred
cosine of the router features), average each teacher's signal over them, and route to the best teacher (ties split
the weight). It learns online simply by remembering; until `min_examples` decisive prompts have been seen it
falls back to averaging all teachers.
"""

from __future__ import annotations

import torch

from .base import Decision, MemoryRouter, fallback_decision, top_choice


def neighbour_scores(similarities: torch.Tensor, signals: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """(Q, M) similarities to M stored prompts and their (M, K) signals -> (Q, K) mean signal of the neighbours."""
    k = min(num_neighbors, similarities.size(1))
    nearest = similarities.topk(k, dim=1).indices  # (Q, k)
    return signals[nearest].mean(dim=1)


class SimilarityRouter(MemoryRouter):
    name = "similarity_router"


    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus) -> Decision:
        q = features.size(0)
        if not self.ready:
            return fallback_decision(q, self.num_teachers)
        _, signals = self.memory.contents()
        scores = neighbour_scores(self.memory.similarities(features), signals, self.settings.similarity_neighbors)
        return Decision(top_choice(scores), torch.zeros(q, dtype=torch.bool))

