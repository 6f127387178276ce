"""The purified teacher: the K teachers' per-token log-probs turned into one, with per-row teacher weights.

    log pi*(y_t) = sum_k w_k log pi_k(y_t)        (rows of w sum to 1; one-hot w: exactly the chosen teacher)

With uniform weights this is the naive multi-teacher baseline: GNDPO's per-token log-ratio against it is the
average of the K per-teacher log-ratios, i.e. the sum of K on-policy distillation losses with equal weights,
TinyLLM's recipe in on-policy form [I]. Soft weights give a product of the teachers' distributions tempered by
their weights (a weighted geometric mean), which is what aggregation uses [I].
"""

from __future__ import annotations

import torch


def purified_logps(teacher_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(K, B, T) teacher log-probs of the sampled tokens and (B, K) weights (rows sum to 1) -> (B, T)."""
    w = weights.t().unsqueeze(-1).to(teacher_logps.dtype)  # (K, B, 1)
    # 0 * (-inf) would be NaN: a teacher with no weight must not contribute, whatever it says.
    return torch.where(w > 0, w * teacher_logps, torch.zeros_like(teacher_logps)).sum(dim=0)
