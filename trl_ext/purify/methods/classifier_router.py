"""Classifier router: a small trainable classifier predicts the best teacher from the prompt.

Paper [S]: a frozen mDeBERTa-v3 encoder, a two-layer MLP and a softmax over the teachers ("standard text
classification"); the labels are not stated. Here [I]: the router features (purify/features.py) stand in for the
encoder; the two-layer MLP is trained online with cross-entropy against the signal's best teachers (a uniform
target over the teachers tied for best: a multi-label target when several teachers are right). After each rollout
the new decisive prompts join the outcome memory and the MLP takes `classifier_steps` Adam steps on minibatches of
`classifier_batch_size` prompts drawn from the whole memory (replay: no prompt is forgotten after one look; the
draws come from a generator seeded identically on every process and saved with the checkpoint). It routes to its
most probable teacher; until it has seen `min_examples` decisive prompts it averages all teachers.
"""

from __future__ import annotations

from typing import Any

import torch

from ..signal import best_teachers
from .base import Decision, MemoryRouter, RouterSettings, fallback_decision, top_choice


def soft_targets(signal: torch.Tensor) -> torch.Tensor:
    """(Q, K) signal -> the classifier's target: uniform over the best teachers."""
    best = best_teachers(signal).float()
    return best / best.sum(dim=1, keepdim=True).clamp(min=1.0)


def build_mlp(feature_dim: int, hidden_size: int, num_teachers: int, seed: int) -> torch.nn.Sequential:
    """The two-layer MLP, initialised from `seed` alone, so every process builds the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(feature_dim, hidden_size), torch.nn.Tanh(), torch.nn.Linear(hidden_size, num_teachers)
        )


class ClassifierRouter(MemoryRouter):
    name = "classifier_router"

    def __init__(self, num_teachers: int, feature_dim: int, settings: RouterSettings):
        super().__init__(num_teachers, feature_dim, settings)
        self.mlp = build_mlp(feature_dim, settings.classifier_hidden_size, num_teachers, settings.seed)
        self.optimizer = torch.optim.Adam(self.mlp.parameters(), lr=settings.classifier_learning_rate)
        self.generator = torch.Generator().manual_seed(settings.seed)

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mlp(features.float().cpu()), dim=1)

    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus) -> Decision:
        q = features.size(0)
        if not self.ready:
            return fallback_decision(q, self.num_teachers)
        return Decision(top_choice(self.probabilities(features)), torch.zeros(q, dtype=torch.bool))

    def _learn(self, features: torch.Tensor, signal: torch.Tensor) -> dict[str, float]:
        super()._learn(features, signal)
        if len(self.memory) == 0:
            return {"memory_size": 0.0}
        inputs, signals = self.memory.contents()
        targets = soft_targets(signals)
        batch_size = min(self.settings.classifier_batch_size, len(self.memory))
        with torch.enable_grad():
            for _ in range(self.settings.classifier_steps):
                rows = torch.randperm(len(self.memory), generator=self.generator)[:batch_size]
                self.optimizer.zero_grad()
                log_probs = torch.log_softmax(self.mlp(inputs[rows]), dim=1)
                loss = -(targets[rows] * log_probs).sum(dim=1).mean()
                loss.backward()
                self.optimizer.step()
        return {"memory_size": float(len(self.memory)), "classifier_loss": loss.item()}

    def sync_tensors(self) -> list[torch.Tensor]:
        return [p.data for p in self.mlp.parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mlp": self.mlp.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.mlp.load_state_dict(state["mlp"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
