"""Delightful Policy Gradient (arXiv 2603.14608), from DeepMind's `egg/losses/dg.py` (DelightSigmoidLoss).

    surprisal   l_t  = -log pi_theta(y_t)              current learner, detached
    delight     chi_t = U * l_t                        U = r - mean(r of the prompt's group), no std scaling
    weight      w_t  = sigmoid((chi_t - lambda) / eta)  or  w_t ~ Bernoulli(sigmoid(...))  (stochastic gate)
    loss        -(1/N) sum_t w_t * U * log pi_theta(y_t)   -> a per-token advantage w_t * U for TRL's loss

A rare success (U > 0, surprising token) gets w -> 1; a rare failure (U < 0, surprising) gets w -> 0.
"""

from __future__ import annotations

import torch


def surprisal(logps: torch.Tensor) -> torch.Tensor:
    """-log pi(y_t), detached: delight weights are constants of the loss."""
    return -logps.detach()


def token_delight(advantages: torch.Tensor, surprisals: torch.Tensor) -> torch.Tensor:
    """chi_t = U * l_t; `advantages` is (B,) per sequence or (B, T) per token."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return advantages * surprisals


def delight_weights(
    delight: torch.Tensor,
    eta: float = 1.0,
    price: float = 0.0,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """w = sigmoid((chi - price) / eta), or a Bernoulli draw with that probability when `stochastic`."""
    probabilities = torch.sigmoid((delight - price) / eta)
    if not stochastic:
        return probabilities
    uniform = torch.rand(probabilities.shape, generator=generator, dtype=probabilities.dtype)
    return (uniform.to(probabilities.device) < probabilities).to(probabilities.dtype)


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values` on valid tokens, 0 elsewhere. Selected, not multiplied: log-probs on masked-out positions may be NaN
    or -inf (vLLM's sampler log-probs are), and NaN * 0 = NaN would leak into sums over the completion."""
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def sequence_delight(token_delights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A completion's delight: the token-mean of chi_t over its valid tokens (0 for an empty completion).

    The gate acts on whole completions (skipping a token saves no transformer compute), so it needs one number
    per completion; the mean keeps long and short completions on the same scale.
    """
    count = mask.to(token_delights.dtype).sum(-1).clamp(min=1.0)
    return masked(token_delights, mask).sum(-1) / count
