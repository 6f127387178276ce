"""What every purification method is: given the prompts' features (and their signal), weights over the teachers.

A method sees a batch of Q prompts (one per group, gathered from every process) and returns a (Q, K) weight matrix
whose rows sum to 1: one-hot when it picks a teacher, spread when it combines them or when chosen teachers tie.
Methods that learn online do so in `learn` (from the signal) or, for the RL selector, in `learn_from_improvement`
(from the student's measured improvement); the trainer calls `decide` BEFORE `learn` on the same batch, so a
router never routes a prompt with that prompt's own label and its logged accuracy is a held-out accuracy. (The
methods that read `signal` in `decide`, aggregation and the RL selector's state, see the label they are scored on:
their accuracy says how far they follow it.)

Everything here runs on CPU on identical gathered inputs on every process; `sync_tensors` lists the learned tensors
the trainer broadcasts from the main process after each update, so processes cannot drift apart numerically.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..memory import OutcomeMemory
from ..signal import BEST_TOLERANCE, decisive_prompts


@dataclass(frozen=True)
class RouterSettings:
    """Settings of the learning methods (the config's `router_*`, `similarity_*`, ... fields; all [I])."""

    memory_size: int = 1024
    min_examples: int = 16
    similarity_neighbors: int = 16
    plackett_luce_gamma: float = 1000.0
    plackett_luce_steps: int = 20
    plackett_luce_l2: float = 0.01
    classifier_hidden_size: int = 64
    classifier_learning_rate: float = 1e-2
    classifier_steps: int = 4
    classifier_batch_size: int = 256
    aggregation_temperature: float = 0.05
    rl_learning_rate: float = 0.005
    rl_entropy_coef: float = 0.01
    rl_exploration: float = 0.1
    rl_signal_in_state: bool = True
    rl_evidence_prior: float = 30.0
    seed: int = 0


@dataclass
class Decision:
    weights: torch.Tensor  # (Q, K), rows sum to 1
    fallback: torch.Tensor  # (Q,) bool: decided by the uniform-average fallback (the method knows too little yet)
    actions: torch.Tensor | None = None  # (Q,) the sampled teacher, for methods that explore (RL)


def uniform_weights(num_prompts: int, num_teachers: int) -> torch.Tensor:
    return torch.full((num_prompts, num_teachers), 1.0 / num_teachers)


def top_choice(scores: torch.Tensor, tolerance: float = BEST_TOLERANCE) -> torch.Tensor:
    """(Q, K) scores -> weights: all weight on the best teacher, split equally between teachers tied for best."""
    top = scores.max(dim=1, keepdim=True).values
    best = (scores >= top - tolerance).float()
    return best / best.sum(dim=1, keepdim=True)


def fallback_decision(num_prompts: int, num_teachers: int) -> Decision:
    return Decision(uniform_weights(num_prompts, num_teachers), torch.ones(num_prompts, dtype=torch.bool))


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run tiny router math on one thread: on a loaded machine, a multi-threaded pool spinning over
    microsecond-sized ops can be hundreds of times slower than one thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Purifier:
    """Base class. Subclasses set `name` and implement `_decide` (and `_learn` or `_learn_from_improvement` when
    they learn); the public methods run them single-threaded."""

    name = "base"
    learns_from_signal = False
    learns_from_improvement = False

    def __init__(self, num_teachers: int, feature_dim: int, settings: RouterSettings):
        self.num_teachers = num_teachers
        self.feature_dim = feature_dim
        self.settings = settings

    def decide(
        self, features: torch.Tensor, signal: torch.Tensor, explore: bool = False, consensus: torch.Tensor | None = None
    ) -> Decision:
        """Weights over the teachers for (Q, D) prompt features. Only the methods that see the teachers' outputs on
        the prompt itself read `signal` (Q, K) (aggregation, the RL selector's state) and the reward-free `consensus`
        (Q, K) (aggregation; signal.teacher_consensus); `explore` makes the RL selector sample instead of taking its
        best choice."""
        with single_threaded():
            return self._decide(features, signal, explore, consensus)

    def learn(self, features: torch.Tensor, signal: torch.Tensor) -> dict[str, float]:
        """Learn from a batch of prompts with their signal (NaN rows: no signal). Returns metrics to log."""
        with single_threaded():
            return self._learn(features, signal)

    def learn_from_improvement(
        self, features: torch.Tensor, signal: torch.Tensor, actions: torch.Tensor, improvement: torch.Tensor,
        consensus: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Learn from the student's measured improvement after training on the chosen teachers (RL only); `signal`
        and `consensus` are those the choices were made with."""
        with single_threaded():
            return self._learn_from_improvement(features, signal, actions, improvement, consensus)

    def _decide(self, features: torch.Tensor, signal: torch.Tensor, explore: bool, consensus) -> Decision:
        raise NotImplementedError

    def _learn(self, features: torch.Tensor, signal: torch.Tensor) -> dict[str, float]:
        return {}

    def _learn_from_improvement(self, features, signal, actions, improvement, consensus) -> dict[str, float]:
        raise NotImplementedError(f"{self.name} does not learn from the student's improvement.")

    def sync_tensors(self) -> list[torch.Tensor]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MemoryRouter(Purifier):
    """A router that learns by remembering decisive prompts with their signal (`OutcomeMemory`), and routes only
    once `min_examples` of them have been seen. Subclasses decide from `self.memory`; a subclass that trains on the
    memory calls `super()._learn` first and extends `state_dict`."""

    learns_from_signal = True

    def __init__(self, num_teachers: int, feature_dim: int, settings: RouterSettings):
        super().__init__(num_teachers, feature_dim, settings)
        self.memory = OutcomeMemory(settings.memory_size, feature_dim, num_teachers)

    @property
    def ready(self) -> bool:
        return self.memory.seen >= self.settings.min_examples

    def _learn(self, features: torch.Tensor, signal: torch.Tensor) -> dict[str, float]:
        decisive = decisive_prompts(signal)
        self.memory.add(features[decisive], signal[decisive])
        return {"memory_size": float(len(self.memory))}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
