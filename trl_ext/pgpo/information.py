"""Estimates of the information I_k between the student's predictions and the feedback-conditioned teacher.

PGPO (arXiv 2606.03620) scales each step by "a mutual-information estimate between the student's predictions and the
feedback-conditioned teacher"; the paper's estimator is not public, so both candidates below are our
interpretation ([I]). Each is computed from the log-probs the distillation loss already
has (no extra forward pass), detached, as sums over tokens, so that the statistics of every micro-batch and process
of an optimizer step add up before I_k is formed.

- "correction": mean over distillation tokens of KL(q_t || p_t), the expected pointwise information the privileged
  context adds to the student's next-token prediction. It grows when the teacher confidently disagrees, whether it
  is right or wrong.
- "agreement": the mutual information of the soft joint P(a, b) = mean_t p_t(a) q_t(b) of the student's and the
  teacher's next tokens at a random distillation position. It is high when the two move together across positions
  (a teacher that sharpens what the student half-knows) and falls towards 0 when the teacher's choices are
  unrelated to the student's (e.g. it copies a wrong answer from misleading feedback). Token ids are hashed into
  `num_buckets` buckets (id mod buckets) plus one for the top-k tail; the MI of bucketed variables is a lower bound
  on the MI of the ids (data-processing inequality), exact when there are at least as many buckets as tokens.
- "verified": the mutual information between the direction of the teacher's correction of each completion (does the
  teacher raise or lower its log-likelihood relative to the student?) and the verifier's verdict (did it succeed?),
  from the 2 x 2 counts of the step's completions with a teacher context, as a share of the verdict's entropy
  (I(S; C) / H(S) in [0, 1], so that it does not fall just because most completions succeed), and 0 when the
  corrections point away from success (the teacher raises failures more often than successes: mutual information
  alone would count a consistently wrong teacher as fully informative). A teacher whose corrections track the
  reward is informative; one that has lost its privileged-context skill, or follows misleading feedback, is not.
  This one goes beyond the abstract's wording (it uses the rewards), and is entirely ours.
"""

from __future__ import annotations

import torch

from .divergences import Support, kl

ESTIMATORS = ("agreement", "correction", "verified")


def correction_information(support: Support) -> torch.Tensor:
    """Per-position KL(q || p) on the shared support, (...,), detached."""
    return kl(support.teacher.detach(), support.student.detach())


def top1_agreement(support: Support) -> torch.Tensor:
    """Per-position 1.0 where the teacher's most likely entry of the support is the student's, (...,)."""
    return (support.teacher.argmax(-1) == support.student.argmax(-1)).float()


def _bucket_ids(support: Support, keep: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """(N, S) bucket of each support entry at the kept positions: token id mod buckets, the tail in the last one."""
    n, size = int(keep.sum()), support.student.size(-1)
    if support.token_ids is None:
        return torch.arange(size, device=keep.device).remainder(num_buckets).expand(n, -1)
    ids = support.token_ids.reshape(keep.numel(), -1)[keep].remainder(num_buckets)
    if support.has_tail:
        ids = torch.cat([ids, ids.new_full((n, 1), num_buckets)], dim=1)
    return ids


def agreement_joint(support: Support, mask: torch.Tensor, num_buckets: int, chunk_size: int = 4096) -> torch.Tensor:
    """Sum over masked positions of p_t(a) q_t(b) on token-id buckets, (num_buckets + 1, num_buckets + 1).

    Positions are processed `chunk_size` at a time, so memory stays at two (chunk, buckets) matrices however long the
    batch.
    """
    keep = mask.reshape(-1).bool()
    ids = _bucket_ids(support, keep, num_buckets)
    student = support.student.detach().reshape(keep.numel(), -1)[keep]
    teacher = support.teacher.detach().reshape(keep.numel(), -1)[keep]
    joint = torch.zeros(num_buckets + 1, num_buckets + 1, dtype=torch.float64, device=student.device)
    for start in range(0, student.size(0), chunk_size):
        rows = slice(start, start + chunk_size)

        def bucketed(log_probs: torch.Tensor) -> torch.Tensor:
            probs = log_probs[rows].exp().double()
            return probs.new_zeros(probs.size(0), num_buckets + 1).scatter_add_(1, ids[rows], probs)

        joint += bucketed(student).T @ bucketed(teacher)
    return joint


def mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """I(A; B) in nats of the joint distribution proportional to `joint` (any non-negative matrix with mass > 0)."""
    joint = joint.double()
    joint = joint / joint.sum()
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    terms = joint * (joint.log() - independent.log())
    return torch.where(joint > 0, terms, torch.zeros_like(terms)).sum()


def verified_joint(correction: torch.Tensor, success: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """2 x 2 counts over the `counted` completions (those with a context and distillation tokens): rows = failed /
    succeeded, columns = the teacher lowers / raises the completion's log-likelihood (`correction` = sum over its
    tokens of log q - log p), float64."""
    keep = counted.bool()
    raised = (correction.detach() > 0)[keep].long()
    succeeded = success.bool()[keep].long()
    return torch.bincount(succeeded * 2 + raised, minlength=4).double().view(2, 2)


def uncertainty_coefficient(joint: torch.Tensor) -> torch.Tensor | None:
    """I(S; C) / H(S) of a joint with S on the rows; None when S is constant (H(S) = 0: nothing to explain)."""
    rows = joint.double().sum(1) / joint.sum()
    entropy = -(rows * rows.clamp(min=1e-300).log()).sum()
    if entropy <= 0:
        return None
    return mutual_information(joint) / entropy


def verified_information(joint: torch.Tensor) -> torch.Tensor | None:
    """The "verified" I_k of a `verified_joint`: its uncertainty coefficient when the teacher raises the successes
    more often than the failures, else 0; None when every completion succeeded or every one failed.

    Mutual information is blind to the direction of a dependence: a teacher that copies a wrong answer from misleading
    feedback raises the failures and lowers the successes just as consistently as a right teacher does the opposite,
    and its corrections "predict" the verdict as well. For a step size only corrections that point towards success
    count, so a teacher pointing away from it gets no information (the smallest step).
    """
    coefficient = uncertainty_coefficient(joint)
    if coefficient is None:
        return None
    joint = joint.double()
    raises_failures, raises_successes = (joint[:, 1] / joint.sum(1).clamp(min=1e-300)).tolist()
    return coefficient if raises_successes > raises_failures else torch.zeros_like(coefficient)
