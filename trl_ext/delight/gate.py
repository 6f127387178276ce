"""The Kondo gate (arXiv 2603.20526): pay for a backward pass only when a completion's delight is worth its price.

Gate rules, on one delight value chi per completion of the whole generation batch (all processes):
    "price"      keep ~ Bernoulli(sigmoid((chi - price) / eta))   zero price keeps positive delight more often
    "threshold"  keep = chi > price                               the deterministic (eta -> 0) gate
    "pass_rate"  keep = chi > price_k, price_k = the (1 - rho) quantile of a rolling delight history
                 (this batch included), so about a fraction rho of completions pass
Every rank holds the same history and draws from the same generator, so decisions agree across processes.

A non-finite delight (NaN or +-inf: from a NaN or -inf log-prob, e.g. vLLM's sampler) never passes and never enters
the history. It carries no usable priority, a backward pass on its completion risks a non-finite gradient, and
one NaN in the history would make every later quantile price NaN and silently close the gate.
"""

from __future__ import annotations

from collections import deque

import torch

GATE_RULES = ("none", "price", "threshold", "pass_rate")


def quantile_price(history: torch.Tensor, pass_rate: float) -> torch.Tensor:
    """The (1 - rho) quantile of past delights: the price at which about a fraction rho would pass."""
    return torch.quantile(history.to(torch.float64), 1.0 - pass_rate)


def gate_decisions(
    delight: torch.Tensor,
    rule: str,
    price: float | torch.Tensor = 0.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean keep-mask for completions with sequence delight `delight` (N,) under a fixed price; a non-finite
    delight never passes (except with rule 'none', which keeps everything)."""
    delight = delight.detach().to(torch.float64).cpu()
    if rule == "none":
        return torch.ones_like(delight, dtype=torch.bool)
    if rule == "price":
        probabilities = torch.sigmoid((delight - price) / eta)
        # One draw per completion, finite or not, so the generator's stream does not depend on the values.
        uniform = torch.rand(probabilities.shape, generator=generator, dtype=torch.float64)
        keep = uniform < probabilities
    elif rule in ("threshold", "pass_rate"):
        keep = delight > price
    else:
        raise ValueError(f"Unknown gate rule {rule!r}; expected one of {GATE_RULES}.")
    return keep & torch.isfinite(delight)


class KondoGate:
    """Stateful gate: the price history for `pass_rate`, and a generator for Bernoulli draws.

    `decide` must be called with the delights of the WHOLE generation batch (gathered), identically on every rank.
    """

    def __init__(self, rule: str, price: float, eta: float, pass_rate: float, history_size: int, seed: int):
        self.rule, self.price, self.eta, self.pass_rate = rule, price, eta, pass_rate
        self.history: deque[float] = deque(maxlen=history_size)
        self.seed = seed
        self.decisions_made = 0
        self.last_price = float(price)

    def _generator(self) -> torch.Generator:
        # A fresh generator per decision, seeded by (seed, decision index): identical on all ranks, and exactly
        # reproducible after resuming (only the counter needs saving).
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.decisions_made)

    def decide(self, delight: torch.Tensor) -> torch.Tensor:
        delight = delight.detach().to(torch.float64).cpu()
        price: float | torch.Tensor = self.price
        if self.rule == "pass_rate":
            finite = torch.isfinite(delight)
            self.history.extend(delight[finite].tolist())
            if self.pass_rate >= 1.0:
                keep = finite
                price = float("-inf")
            elif not self.history:  # no finite delight seen yet: no price can be set, and nothing here may pass
                keep = torch.zeros_like(delight, dtype=torch.bool)
                price = float("inf")
            else:
                price = quantile_price(torch.tensor(list(self.history)), self.pass_rate)
                keep = gate_decisions(delight, "pass_rate", price)
        else:
            keep = gate_decisions(delight, self.rule, price, self.eta, self._generator())
        self.decisions_made += 1
        self.last_price = float(price)
        return keep

    def state_dict(self) -> dict:
        return {"history": list(self.history), "decisions_made": self.decisions_made, "last_price": self.last_price}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.decisions_made = state["decisions_made"]
        self.last_price = state["last_price"]
