"""Dynamic sampling as DAPO defines it: which prompt groups carry signal, which groups fill the batch, refill prompts.

A group (the `num_generations` completions of one prompt) whose rewards are all equal has zero advantage for every
completion: it adds nothing to the policy gradient, only tokens to the loss normalizer (and KL terms). DAPO drops
such groups and samples more prompts until the batch holds as many informative groups as it should.

Everything here is pure (tensors and ints in, tensors and ints out) and identical on every process because it is
computed from rewards that TRL has already gathered over all processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# TRL counts a group as zero-std with `torch.isclose(std, 0)`, i.e. std <= 1e-8; the same threshold keeps
# `frac_reward_zero_std` (TRL's metric) and our informative/uninformative split consistent.
ZERO_STD_ATOL = 1e-8
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _group_std(values: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std over the last dim ignoring NaNs (as TRL's `nanstd`); NaN where fewer than 2 values."""
    count = (~values.isnan()).sum(-1)
    mean = values.nanmean(-1, keepdim=True)
    sq = ((values - mean) ** 2).nan_to_num(0.0).sum(-1)
    var = sq / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def informative_groups(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    """(num_groups,) bool: True for the groups whose completions' rewards are not all equal.

    `rewards_per_func` is TRL's (N, num_reward_funcs) reward matrix of the whole generation batch (gathered over
    processes, NaN where a function did not score a row), rows grouped by prompt in blocks of `num_generations`.
    With `sum_then_normalize` (TRL's default) the group reward is the weighted sum that TRL normalizes per group;
    with `normalize_then_sum` (GDPO) a group is informative when any weighted reward function varies within it.
    A group with fewer than two scorable completions is uninformative (TRL gives it zero advantage).
    """
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be (N, num_reward_funcs), got shape {tuple(rewards_per_func.shape)}")
    n, num_funcs = rewards_per_func.shape
    if num_generations < 2 or n % num_generations:
        raise ValueError(f"{n} rewards cannot be split into groups of num_generations={num_generations}")
    weights = reward_weights.to(rewards_per_func.device, rewards_per_func.dtype)
    unscorable = rewards_per_func.isnan().all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards = rewards.masked_fill(unscorable, float("nan"))
        std = _group_std(rewards.view(-1, num_generations))
        return std > ZERO_STD_ATOL  # NaN compares False: fewer than 2 scorable completions
    if aggregation == "normalize_then_sum":
        grouped = rewards_per_func.masked_fill(unscorable.unsqueeze(1), float("nan"))
        grouped = grouped.view(-1, num_generations, num_funcs).transpose(1, 2)  # (groups, funcs, G)
        varies = (_group_std(grouped) > ZERO_STD_ATOL) & (weights != 0)
        return varies.any(dim=1)
    raise ValueError(f"Unknown multi_objective_aggregation {aggregation!r}; expected one of {AGGREGATIONS}.")


def groups_that_train(row_trains: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(num_groups,) bool: the groups with at least one row that trains (`row_trains`: (N,) bool over the whole
    generation batch, a row with loss tokens and a nonzero advantage). Rewards that differ carry no gradient when
    every row of the group is masked, e.g. truncated completions under `mask_truncated_completions`."""
    if row_trains.dim() != 1 or num_generations < 1 or row_trains.numel() % num_generations:
        raise ValueError(f"{tuple(row_trains.shape)} rows cannot be split into groups of {num_generations}")
    return row_trains.view(-1, num_generations).any(dim=1)


@dataclass(frozen=True)
class GroupSelection:
    """Which generated group fills each group slot of the training batch.

    Slot i holds group `groups[i]` of generation round `rounds[i]`; `keep[i]` is False for a slot that no
    informative group could fill (its rows stay in the batch with a zero loss mask).
    """

    rounds: tuple[int, ...]
    groups: tuple[int, ...]
    keep: tuple[bool, ...]

    @property
    def kept(self) -> int:
        return sum(self.keep)

    @property
    def masked(self) -> int:
        return len(self.keep) - self.kept

    @property
    def is_identity(self) -> bool:
        """True when every slot holds its own first-round group (nothing moved between rounds)."""
        return all(r == 0 and g == i for i, (r, g) in enumerate(zip(self.rounds, self.groups)))


def select_groups(informative_per_round: list[torch.Tensor]) -> GroupSelection:
    """Fill the first round's group slots with informative groups.

    Informative first-round groups stay in their slots; each uninformative slot takes the next informative group of
    the later (refill) rounds, in generation order; slots left over keep their uninformative group, masked. With a
    single round this is DAPO's "filter" (mask) step; with refill rounds it is DAPO's "sample until full" buffer.
    """
    if not informative_per_round:
        raise ValueError("select_groups needs at least the first round")
    first = [bool(x) for x in informative_per_round[0].tolist()]
    spares = [(r, g) for r, flags in enumerate(informative_per_round[1:], start=1)
              for g, ok in enumerate(flags.tolist()) if ok]
    spares.reverse()  # pop() from the end = take in generation order
    rounds, groups, keep = [], [], []
    for slot, ok in enumerate(first):
        if ok:
            rounds.append(0), groups.append(slot), keep.append(True)
        elif spares:
            r, g = spares.pop()
            rounds.append(r), groups.append(g), keep.append(True)
        else:
            rounds.append(0), groups.append(slot), keep.append(False)
    return GroupSelection(tuple(rounds), tuple(groups), tuple(keep))


def informative_needed(informative_per_round: list[torch.Tensor]) -> int:
    """How many more informative groups the first round's slots still need (0 when the batch can be filled)."""
    slots = informative_per_round[0].numel()
    return max(0, slots - sum(int(flags.sum()) for flags in informative_per_round))


def selected_rows(selection: GroupSelection, num_generations: int, round_sizes: list[int]) -> torch.Tensor:
    """Global row indices into the rounds concatenated in order (round r's rows start at sum(round_sizes[:r]))."""
    offsets = [0]
    for size in round_sizes[:-1]:
        offsets.append(offsets[-1] + size)
    rows = [offsets[r] + g * num_generations + j
            for r, g in zip(selection.rounds, selection.groups) for j in range(num_generations)]
    return torch.tensor(rows, dtype=torch.long)


def kept_rows(selection: GroupSelection, num_generations: int) -> torch.Tensor:
    """(num_slots * num_generations,) bool: the rows of the assembled batch that the loss trains on."""
    return torch.tensor(selection.keep, dtype=torch.bool).repeat_interleave(num_generations)


def refill_prompt_indices(dataset_size: int, num_prompts: int, seed: int, step: int, round_index: int) -> list[int]:
    """Dataset rows for one refill round, drawn uniformly with replacement.

    The generator is seeded from (seed, step, round) only, so every process draws the same prompts (no
    communication needed) and a resumed run draws what the original run would have drawn.
    """
    if dataset_size < 1:
        raise ValueError("dynamic sampling needs a non-empty training dataset to draw refill prompts from")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + round_index) % (2**63 - 1))
    return torch.randint(dataset_size, (num_prompts,), generator=generator).tolist()


def local_rows(global_rows: list, process_index: int, rows_per_process: int) -> list:
    """This process's contiguous slice of a global row list (TRL's layout: process k holds rows [k*B, (k+1)*B))."""
    return global_rows[process_index * rows_per_process : (process_index + 1) * rows_per_process]
