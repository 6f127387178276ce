"""GNDPO's advantage, from the official code (OPPO-Mente-Lab/GNDPO, verl `core_algos.py`).

    s_t = clip(log pi_T(y_t) - log pi_old(y_t), -c, +c)        on every valid completion token
    A_t = (s_t - mu) / sqrt(var + eps)                          mu, unbiased var over ALL valid tokens of the batch

"The batch" is the whole generation batch: every process and every gradient-accumulation micro-batch
(`reduce_sum` all-reduces the moments). OPD, the paper's baseline, uses A_t = s_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.stats import MaskedMoments, ReduceSum, local_reduce, masked_moments

NORMALIZATION_EPS = 1e-8  # inside the square root, as in the official code


def distillation_scores(
    teacher_logps: torch.Tensor, student_logps: torch.Tensor, mask: torch.Tensor, score_clip: float
) -> torch.Tensor:
    """Clipped per-token log-ratio teacher/student on the sampled tokens; zero where `mask` is 0."""
    raw = teacher_logps - student_logps
    return raw.clamp(-score_clip, score_clip) * mask


def normalize_scores(
    scores: torch.Tensor,
    mask: torch.Tensor,
    reduce_sum: ReduceSum = local_reduce,
    eps: float = NORMALIZATION_EPS,
) -> tuple[torch.Tensor, MaskedMoments]:
    """Whiten masked scores with the global mean and unbiased variance; zero where `mask` is 0."""
    moments = masked_moments(scores, mask, reduce_sum, unbiased=True)
    normalized = (scores.to(torch.float64) - moments.mean) * torch.rsqrt(moments.var + eps)
    return normalized.to(scores.dtype) * mask, moments


@dataclass(frozen=True)
class GNDPOAdvantages:
    advantages: torch.Tensor  # (B, T), zero on masked tokens
    scores: torch.Tensor  # (B, T) clipped log-ratios before normalization, zero on masked tokens
    score_moments: MaskedMoments  # global mean/std of the clipped scores, before normalization
    clipped_fraction: torch.Tensor  # global fraction of valid tokens whose raw log-ratio was clipped
    reverse_kl: torch.Tensor  # global mean of log pi_old - log pi_T (k1 estimate of KL(student || teacher))


def gndpo_advantages(
    teacher_logps: torch.Tensor,
    student_logps: torch.Tensor,
    mask: torch.Tensor,
    score_clip: float = 5.0,
    normalization: str = "global",
    reduce_sum: ReduceSum = local_reduce,
) -> GNDPOAdvantages:
    """Per-token advantages of GNDPO (`normalization="global"`) or plain OPD (`"none"`), with diagnostics."""
    mask = mask.to(teacher_logps.dtype)
    scores = distillation_scores(teacher_logps, student_logps, mask, score_clip)
    if normalization == "global":
        advantages, moments = normalize_scores(scores, mask, reduce_sum)
    elif normalization == "none":
        advantages, moments = scores, masked_moments(scores, mask, reduce_sum)
    else:
        raise ValueError(f"Unknown advantage normalization {normalization!r}; expected 'global' or 'none'.")
    log_ratio = teacher_logps - student_logps
    clipped = (log_ratio.abs() > score_clip).to(mask.dtype)
    return GNDPOAdvantages(
        advantages=advantages,
        scores=scores,
        score_moments=moments,
        clipped_fraction=masked_moments(clipped, mask, reduce_sum, unbiased=False).mean,
        reverse_kl=masked_moments(-log_ratio, mask, reduce_sum, unbiased=False).mean,
    )
