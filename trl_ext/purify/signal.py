"""The one definition of "which teacher is right on a prompt", and the conflict between teachers.

The paper does not say how its routers' labels are made ([I] everywhere in this file). In the online trainer a teacher
never writes an answer; it only scores the student's sampled completions. So a teacher is "right" on a prompt to the
degree that its likelihoods RANK THE GROUP'S COMPLETIONS THE WAY THE VERIFIABLE REWARD DOES:

    signal[q, k] = sum_{i,j in group q} (r_i - r_j)^+ * agree_k(i, j)  /  sum_{i,j} (r_i - r_j)^+
    agree_k(i, j) = 1 if l_k(i) > l_k(j),  1/2 if l_k(i) == l_k(j),  0 otherwise

with l_k(i) = sum_t log pi_k(y_it) the teacher's log-likelihood of completion i. It is a reward-gap-weighted AUC
in [0, 1]: 1 = the teacher prefers every better completion, 1/2 = no information, 0 = confidently wrong (it prefers
the worse completions). With 0/1 rewards it is the plain pairwise ranking accuracy. It is undefined (NaN) on a
prompt whose completions all have the same reward: nothing there says which teacher is right.

Every purification method, the router-accuracy metric and the RL selector's state use this one signal; the teachers
that are "best" on a prompt are those within `tolerance` of its maximum. A prompt is *decisive* when it has a signal
and not all teachers tie for best; routers learn only from decisive prompts.
"""

from __future__ import annotations

import torch

BEST_TOLERANCE = 1e-6


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each completion: the sum of its valid tokens' log-probs. (..., B, T) -> (..., B)."""
    return (token_logps * mask).sum(dim=-1)


def combined_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int, aggregation: str = "sum_then_normalize"
) -> torch.Tensor:
    """(N, F) rewards of each reward function -> (N,) the reward the signal ranks completions by, combined as TRL
    combines them: the weighted sum ("sum_then_normalize", TRL's default), or with "normalize_then_sum" (GDPO) the
    weighted sum of each function's rewards standardized within the group (TRL's formula, eps 1e-4). NaN where no
    function scored a completion."""
    unscorable = rewards_per_func.isnan().all(dim=1)
    weights = weights.to(rewards_per_func)
    if aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, group_size, rewards_per_func.size(1))
        mean = grouped.nanmean(dim=1, keepdim=True)
        count = (~grouped.isnan()).sum(dim=1, keepdim=True)
        var = ((grouped - mean) ** 2).nan_to_num(0.0).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        rewards_per_func = ((grouped - mean) / (var.sqrt() + 1e-4)).view_as(rewards_per_func)
    elif aggregation != "sum_then_normalize":
        raise ValueError(f"Unknown multi_objective_aggregation {aggregation!r}.")
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    return rewards.masked_fill(unscorable, float("nan"))


def ranking_agreement(teacher_seq_logps: torch.Tensor, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The signal: (K, N) teacher log-likelihoods and (N,) rewards of N = Q * group_size completions -> (Q, K).

    Rows are grouped as TRL groups them: consecutive `group_size` completions share a prompt. NaN rewards
    (unscorable completions, or completions the loss ignores) take part in no pair.
    """
    num_teachers, num_rows = teacher_seq_logps.shape
    if num_rows % group_size:
        raise ValueError(f"{num_rows} completions cannot be split into groups of {group_size}.")
    logps = teacher_seq_logps.double().view(num_teachers, -1, group_size)  # (K, Q, G)
    r = rewards.double().view(-1, group_size)  # (Q, G)
    gap = (r.unsqueeze(2) - r.unsqueeze(1)).nan_to_num(0.0).clamp(min=0.0)  # (Q, G, G): (r_i - r_j)^+
    diff = logps.unsqueeze(3) - logps.unsqueeze(2)  # (K, Q, G, G): l_k(i) - l_k(j)
    agree = (diff > 0).double() + 0.5 * (diff == 0).double()
    total = gap.sum(dim=(1, 2))  # (Q,)
    agreed = (agree * gap).sum(dim=(2, 3))  # (K, Q)
    signal = agreed / total.clamp(min=1e-12)
    signal = torch.where(total > 0, signal, torch.full_like(signal, float("nan")))
    return signal.t().to(torch.float32)  # (Q, K)


def best_teachers(signal: torch.Tensor, tolerance: float = BEST_TOLERANCE) -> torch.Tensor:
    """(Q, K) bool: the teachers within `tolerance` of the prompt's best signal (all False without a signal)."""
    valid = ~torch.isnan(signal).any(dim=1, keepdim=True)
    top = signal.nan_to_num(float("-inf")).max(dim=1, keepdim=True).values
    return valid & (signal >= top - tolerance)


def decisive_prompts(signal: torch.Tensor, tolerance: float = BEST_TOLERANCE) -> torch.Tensor:
    """(Q,) bool: prompts with a signal on which the teachers do not all tie for best (something to learn)."""
    best = best_teachers(signal, tolerance)
    return best.any(dim=1) & (best.sum(dim=1) < signal.size(1))


def choice_accuracy(weights: torch.Tensor, signal: torch.Tensor, tolerance: float = BEST_TOLERANCE) -> torch.Tensor:
    """Router accuracy against the signal: mean over decisive prompts of the weight put on a best teacher.

    For a one-hot choice this is the fraction of prompts routed to a best teacher; for uniform weights it is the
    expected accuracy of a uniformly random choice. NaN when no prompt is decisive.
    """
    decisive = decisive_prompts(signal, tolerance)
    if not decisive.any():
        return torch.tensor(float("nan"))
    on_best = (weights * best_teachers(signal, tolerance).to(weights.dtype)).sum(dim=1)
    return on_best[decisive].mean()


def _opposite_orders(teacher_seq_logps: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt and teacher pair: (K, K, Q) count of completion pairs both teachers order strictly, and of those
    they order oppositely."""
    num_teachers = teacher_seq_logps.size(0)
    logps = teacher_seq_logps.double().view(num_teachers, -1, group_size)
    order = torch.sign(logps.unsqueeze(3) - logps.unsqueeze(2)).nan_to_num(0.0)  # (K, Q, G, G); NaN: no order
    upper = torch.ones(group_size, group_size, dtype=torch.bool, device=logps.device).triu(diagonal=1)
    order = order[:, :, upper]  # (K, Q, pairs)
    both = (order.unsqueeze(1) != 0) & (order.unsqueeze(0) != 0)  # (K, K, Q, pairs)
    opposite = (order.unsqueeze(1) * order.unsqueeze(0)) < 0
    return both.sum(dim=3).double(), opposite.sum(dim=3).double()


def teacher_conflict(teacher_seq_logps: torch.Tensor, group_size: int) -> torch.Tensor:
    """The "knowledge conflict": (K, K) rate at which two teachers strictly prefer opposite completions.

    Over every pair of completions of the same prompt that both teachers order strictly, the fraction they order
    oppositely. Reward-free: it measures disagreement, not who is right. NaN where a teacher pair orders no pair. A
    completion with a NaN log-likelihood takes part in no pair.
    """
    return conflict_and_consensus(teacher_seq_logps, group_size)[0]


def teacher_consensus(teacher_seq_logps: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reward-free: (Q, K) how much each teacher agrees with the OTHER teachers on how to order the prompt's
    completions, in [0, 1] like the signal: the mean over the other teachers of 1 - their conflict rate on this
    prompt (1 = ordered like every other teacher, 1/2 = unrelated or nothing to compare, 0 = always opposite).

    It is not the signal: a majority of teachers can agree and be wrong. Aggregation uses it only on prompts where
    the signal is undefined (methods/aggregation.py).
    """
    return conflict_and_consensus(teacher_seq_logps, group_size)[1]


def conflict_and_consensus(teacher_seq_logps: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`teacher_conflict` (K, K) and `teacher_consensus` (Q, K) from one count of the teachers' completion orders."""
    num_teachers = teacher_seq_logps.size(0)
    counted, opposite = _opposite_orders(teacher_seq_logps, group_size)  # (K, K, Q)
    pooled_counted, pooled_opposite = counted.sum(dim=2), opposite.sum(dim=2)
    rate = pooled_opposite / pooled_counted.clamp(min=1)
    conflict = torch.where(pooled_counted > 0, rate, torch.full_like(rate, float("nan")))
    if num_teachers == 1:
        return conflict, torch.full((counted.size(2), 1), 0.5)
    agreement = torch.where(counted > 0, 1.0 - opposite / counted.clamp(min=1), torch.full_like(counted, 0.5))
    others = ~torch.eye(num_teachers, dtype=torch.bool, device=agreement.device)
    consensus = (agreement * others.unsqueeze(-1)).sum(dim=1) / (num_teachers - 1)  # (K, Q)
    return conflict, consensus.t().to(torch.float32).cpu()


def evidence(signal: torch.Tensor, consensus: torch.Tensor | None) -> torch.Tensor:
    """(Q, K) what a method that reads the teachers' outputs on the prompt itself knows of who is right: the signal
    where the prompt has one, else the teachers' consensus, else 1/2 ("no information" on the signal's scale)."""
    defined = ~torch.isnan(signal).any(dim=1, keepdim=True)
    fallback = consensus.to(signal.dtype) if consensus is not None else torch.full_like(signal, 0.5)
    return torch.where(defined, signal.nan_to_num(0.5), fallback)


def mean_conflict(conflict: torch.Tensor) -> torch.Tensor:
    """Mean of the (K, K) conflict matrix over distinct teacher pairs (NaN entries skipped; NaN if none)."""
    k = conflict.size(0)
    pairs = conflict[torch.ones(k, k, dtype=torch.bool).triu(diagonal=1)]
    pairs = pairs[~torch.isnan(pairs)]
    return pairs.mean() if pairs.numel() else torch.tensor(float("nan"), dtype=conflict.dtype)
