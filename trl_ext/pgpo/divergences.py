"""Per-token divergence between the student and its self-teacher (SDPO's logit-level loss, official code
`compute_self_distillation_loss`).

    alpha = 0        D = KL(q || p)                               forward KL
    alpha = 1        D = KL(p || q)                               reverse KL
    0 < alpha < 1    M = (1 - alpha) p + alpha q
                     D = (1 - alpha) KL(p || M) + alpha KL(q || M)  generalized Jensen-Shannon

p is the student, q the teacher (no gradient). With `topk`, both are restricted to the student's k most likely tokens
at each position, plus one tail bucket holding the remaining mass, so the support is a proper distribution of k + 1
outcomes; without the tail the k entries are renormalized instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Support:
    """Student and teacher log-probabilities on a shared support of each position, (..., S)."""

    student: torch.Tensor
    teacher: torch.Tensor
    token_ids: torch.Tensor | None  # (..., k) vocabulary ids of the top-k entries (None: the full vocabulary)
    has_tail: bool  # the last entry is the tail bucket


def tail_log_mass(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_probs))) over the last dim, (..., 1), stable near 0 mass (log of -expm1 of logsumexp)."""
    covered = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)  # a tail of exactly 0 is log(0)
    return torch.log(-torch.expm1(covered))


def shared_support(
    student_logps: torch.Tensor, teacher_logps: torch.Tensor, topk: int | None, add_tail: bool = True
) -> Support:
    """Restrict full-vocabulary log-probs (..., V) of both models to the student's top-k tokens (+ tail bucket)."""
    if topk is None or topk >= student_logps.size(-1):
        return Support(student_logps, teacher_logps, token_ids=None, has_tail=False)
    token_ids = student_logps.detach().topk(topk, dim=-1).indices
    return support_from_top_k(student_logps.gather(-1, token_ids), teacher_logps.gather(-1, token_ids), token_ids,
                              add_tail)


def support_from_top_k(student: torch.Tensor, teacher: torch.Tensor, token_ids: torch.Tensor,
                       add_tail: bool = True) -> Support:
    """The shared support from both models' log-probs (..., k) of the student's top-k `token_ids`."""
    if add_tail:
        student = torch.cat([student, tail_log_mass(student)], dim=-1)
        teacher = torch.cat([teacher, tail_log_mass(teacher)], dim=-1)
    else:
        student = student.log_softmax(-1)
        teacher = teacher.log_softmax(-1)
    return Support(student, teacher, token_ids=token_ids, has_tail=add_tail)


# Log-probs are floored so that a zero-probability entry (-inf) contributes exactly 0, in value and in gradient,
# instead of 0 * inf = nan.
LOG_FLOOR = -1e4


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, from log-probabilities."""
    log_p, log_q = log_p.clamp(min=LOG_FLOOR), log_q.clamp(min=LOG_FLOOR)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-position divergence (...,) between student p and teacher q given as log-probs (..., S)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    teacher = teacher.detach()
    if alpha == 0.0:
        return kl(teacher, student)
    if alpha == 1.0:
        return kl(student, teacher)
    mixture = torch.logsumexp(
        torch.stack([student + math.log(1.0 - alpha), teacher + math.log(alpha)]), dim=0
    )
    return (1.0 - alpha) * kl(student, mixture) + alpha * kl(teacher, mixture)


def clipped_importance_weights(
    student_logps: torch.Tensor, old_logps: torch.Tensor | None, clip: float | None
) -> torch.Tensor | None:
    """min(exp(sg[log pi_theta(y_t) - log pi_old(y_t)]), clip): the off-policy correction of the official code.

    None when the update is on-policy (no old log-probs were needed): every weight would be exactly 1.
    """
    if old_logps is None:
        return None
    weights = torch.exp(student_logps.detach() - old_logps)
    return weights.clamp(max=clip) if clip is not None else weights
