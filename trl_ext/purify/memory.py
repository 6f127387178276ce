"""The routers' memory of prompts with known outcomes: (prompt features, per-teacher signal), first in first out.

The similarity router reads its neighbours from it, the Plackett-Luce ranker its weighted rankings, and the
classifier router replays it for its updates. It only ever receives gathered data, so it is identical on every
process, and it is saved in every checkpoint. Rows are returned in storage order (no reader depends on the order).
"""

from __future__ import annotations

from typing import Any

import torch


class OutcomeMemory:
    def __init__(self, capacity: int, feature_dim: int, num_teachers: int):
        if capacity < 1:
            raise ValueError(f"The outcome memory needs a capacity >= 1, got {capacity}.")
        self.capacity = capacity
        self.features = torch.zeros(capacity, feature_dim)
        self.signals = torch.zeros(capacity, num_teachers)
        self.size = 0
        self.next = 0  # where the next row is written (the oldest row once full)
        self.seen = 0  # rows ever added, for "has the router learned enough to decide?"

    def __len__(self) -> int:
        return self.size

    def add(self, features: torch.Tensor, signals: torch.Tensor) -> None:
        for f, s in zip(features.float().cpu(), signals.float().cpu()):
            self.features[self.next] = f
            self.signals[self.next] = s
            self.next = (self.next + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)
            self.seen += 1

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (features, signals), in storage order (views, no copy)."""
        return self.features[: self.size], self.signals[: self.size]

    def similarities(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) -> (Q, size) cosine similarity to the stored prompts, both centred on the stored prompts' mean.

        Centring removes what every prompt shares (a chat template, an instruction) so that similarity reflects what
        tells prompts apart. Computed without materialising the centred keys: one (size, D) x (D, Q + 1) product.
        """
        keys, _ = self.contents()
        centre = keys.mean(dim=0)
        q = queries.float().cpu()
        products = keys @ torch.cat([q, centre[None]]).t()  # (size, Q + 1): k.q and k.c
        key_dot_query, key_dot_centre = products[:, :-1], products[:, -1:]
        # (k - c).(q - c) and |k - c|, |q - c| expanded in dot products.
        centred_dot = key_dot_query - key_dot_centre - (q @ centre)[None] + centre @ centre
        key_norm = (keys.pow(2).sum(dim=1, keepdim=True) - 2 * key_dot_centre + centre @ centre).clamp(min=0).sqrt()
        query_norm = (q - centre).norm(dim=1)
        return (centred_dot / key_norm.clamp(min=1e-6) / query_norm.clamp(min=1e-6)[None]).t()

    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features.clone(), "signals": self.signals.clone(), "size": self.size,
                "next": self.next, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["features"].shape != self.features.shape or state["signals"].shape != self.signals.shape:
            raise ValueError(
                f"The saved router memory has shape {tuple(state['features'].shape)} / {tuple(state['signals'].shape)}"
                f" but this trainer's is {tuple(self.features.shape)} / {tuple(self.signals.shape)}: resume with the "
                "same teachers, router_memory_size and router features as the checkpoint."
            )
        self.features.copy_(state["features"])
        self.signals.copy_(state["signals"])
        self.size, self.next, self.seen = int(state["size"]), int(state["next"]), int(state["seen"])
