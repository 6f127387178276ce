"""ProRL's dynamic sampling, pure parts: informative groups, slot filling, refill prompts, row operations."""

import math

import pytest
import torch

from trl_ext.prorl.batch_rows import (
    check_mergeable,
    concat_rows,
    mask_rows,
    pad_to_width,
    take_rows,
    take_table_rows,
)
from trl_ext.prorl.dynamic_sampling import (
    groups_that_train,
    informative_groups,
    informative_needed,
    kept_rows,
    local_rows,
    refill_prompt_indices,
    select_groups,
    selected_rows,
)

nan = math.nan


def flags(*values):
    return torch.tensor(values, dtype=torch.bool)


# ----- informative groups -----------------------------------------------------------------------------------------
def test_groups_with_equal_rewards_are_uninformative():
    rewards = torch.tensor([[1.0], [1.0], [1.0],   # all correct
                            [0.0], [0.0], [0.0],   # all wrong
                            [0.0], [1.0], [0.0],   # mixed
                            [0.3], [0.3], [0.7]])  # continuous, mixed
    assert informative_groups(rewards, torch.ones(1), 3).tolist() == [False, False, True, True]


def test_weighted_sum_decides_with_sum_then_normalize():
    # Two reward functions that vary in opposite directions cancel in the weighted sum: no signal (TRL's advantage
    # of that group is zero too). A zero-weight function never makes a group informative.
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0],
                            [1.0, 5.0], [1.0, 9.0]])
    assert informative_groups(rewards, torch.tensor([1.0, 1.0]), 2).tolist() == [False, True]
    assert informative_groups(rewards, torch.tensor([1.0, 0.0]), 2).tolist() == [True, False]


def test_normalize_then_sum_counts_any_varying_function():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0],
                            [1.0, 5.0], [1.0, 5.0]])
    result = informative_groups(rewards, torch.tensor([1.0, 1.0]), 2, aggregation="normalize_then_sum")
    assert result.tolist() == [True, False]


def test_unscorable_rows_are_ignored_and_lone_scores_carry_no_signal():
    rewards = torch.tensor([[nan], [1.0], [0.0],      # the NaN row is left out; 1 vs 0 remains
                            [nan], [nan], [1.0],      # one scorable completion: no group comparison
                            [nan], [1.0], [1.0]])     # equal among the scorable ones
    assert informative_groups(rewards, torch.ones(1), 3).tolist() == [True, False, False]


def test_tiny_spread_below_trls_zero_std_tolerance_is_uninformative():
    rewards = torch.tensor([[0.5], [0.5 + 1e-9], [0.5], [0.5 + 1e-3]])
    assert informative_groups(rewards, torch.ones(1), 2).tolist() == [False, True]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="groups of num_generations=4"):
        informative_groups(torch.zeros(6, 1), torch.ones(1), 4)
    with pytest.raises(ValueError, match="num_reward_funcs"):
        informative_groups(torch.zeros(6), torch.ones(1), 2)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        informative_groups(torch.zeros(4, 1), torch.ones(1), 2, aggregation="mean")


# ----- slot filling -----------------------------------------------------------------------------------------------
def test_filter_only_keeps_slots_in_place():
    selection = select_groups([flags(True, False, True, False)])
    assert selection.rounds == (0, 0, 0, 0) and selection.groups == (0, 1, 2, 3)
    assert selection.keep == (True, False, True, False)
    assert selection.is_identity and selection.kept == 2 and selection.masked == 2


def test_refill_fills_empty_slots_in_generation_order():
    first = flags(False, True, False, False)
    second = flags(False, True, True)    # groups 1 and 2 of round 1 are informative
    third = flags(True, False, False)    # group 0 of round 2
    selection = select_groups([first, second, third])
    assert selection.rounds == (1, 0, 1, 2)
    assert selection.groups == (1, 1, 2, 0)
    assert selection.keep == (True, True, True, True)
    assert not selection.is_identity
    assert informative_needed([first, second, third]) == 0
    assert informative_needed([first, second]) == 1


def test_slots_left_after_the_last_round_are_masked():
    selection = select_groups([flags(False, False, True), flags(False, True)])
    assert selection.rounds == (1, 0, 0) and selection.groups == (1, 1, 2)
    assert selection.keep == (True, False, True)


def test_rows_of_the_selection():
    selection = select_groups([flags(False, True), flags(True, False)])  # slot 0 <- round 1 group 0
    rows = selected_rows(selection, num_generations=3, round_sizes=[6, 6])
    assert rows.tolist() == [6, 7, 8, 3, 4, 5]
    assert kept_rows(selection, 3).tolist() == [True] * 6
    masked = select_groups([flags(False, True)])
    assert kept_rows(masked, 2).tolist() == [False, False, True, True]


def test_refill_prompts_are_reproducible_and_vary_with_step_and_round():
    a = refill_prompt_indices(100, 8, seed=0, step=5, round_index=1)
    assert a == refill_prompt_indices(100, 8, seed=0, step=5, round_index=1)  # every process draws the same
    assert a != refill_prompt_indices(100, 8, seed=0, step=5, round_index=2)
    assert a != refill_prompt_indices(100, 8, seed=0, step=6, round_index=1)
    assert a != refill_prompt_indices(100, 8, seed=1, step=5, round_index=1)
    assert len(a) == 8 and all(0 <= i < 100 for i in a)
    with pytest.raises(ValueError, match="non-empty"):
        refill_prompt_indices(0, 8, 0, 0, 0)


def test_local_rows_follow_trls_contiguous_layout():
    rows = list(range(12))
    assert local_rows(rows, 0, 6) == [0, 1, 2, 3, 4, 5]
    assert local_rows(rows, 1, 6) == [6, 7, 8, 9, 10, 11]


# ----- row operations on rollout dicts ------------------------------------------------------------------------------
PAD = 9


def rollout(prompt_width, completion_width, rows, offset=0):
    return {
        "prompt_ids": torch.full((rows, prompt_width), 1 + offset),
        "prompt_mask": torch.ones(rows, prompt_width, dtype=torch.long),
        "completion_ids": torch.full((rows, completion_width), 2 + offset),
        "completion_mask": torch.ones(rows, completion_width, dtype=torch.long),
        "ref_per_token_logps": torch.full((rows, completion_width), -0.5),
        "advantages": torch.arange(rows, dtype=torch.float) + offset,
        "num_items_in_batch": torch.tensor(rows * completion_width),
    }


def test_concat_pads_prompts_left_and_completions_right():
    merged = concat_rows([rollout(2, 3, rows=1), rollout(4, 1, rows=1, offset=10)], pad_token_id=PAD)
    assert merged["prompt_ids"].tolist() == [[PAD, PAD, 1, 1], [11, 11, 11, 11]]
    assert merged["prompt_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert merged["completion_ids"].tolist() == [[2, 2, 2], [12, PAD, PAD]]
    assert merged["completion_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert merged["ref_per_token_logps"].tolist() == [[-0.5, -0.5, -0.5], [-0.5, 0.0, 0.0]]
    assert merged["advantages"].tolist() == [0.0, 10.0]
    assert "num_items_in_batch" not in merged  # recomputed by the caller


def test_take_and_mask_rows():
    batch = rollout(2, 2, rows=3)
    picked = take_rows(batch, torch.tensor([2, 0]))
    assert picked["advantages"].tolist() == [2.0, 0.0]
    masked = mask_rows(batch, torch.tensor([True, False, True]))
    assert masked["completion_mask"].tolist() == [[1, 1], [0, 0], [1, 1]]
    assert masked["advantages"].tolist() == [0.0, 0.0, 2.0]
    assert masked["completion_ids"] is batch["completion_ids"]  # tokens stay; only the loss mask changes
    per_token = dict(batch, advantages=torch.ones(3, 2), tool_mask=torch.ones(3, 2, dtype=torch.long))
    masked = mask_rows(per_token, torch.tensor([False, True, True]))
    assert masked["advantages"].tolist() == [[0, 0], [1, 1], [1, 1]]
    assert masked["tool_mask"].tolist() == [[0, 0], [1, 1], [1, 1]]


def test_table_rows_follow_the_selection_across_rounds():
    first = {("prompt",): ["a", "b"], ("advantages",): [0.0, 0.0], ("rewards", "r"): [1.0, 1.0]}
    second = {("prompt",): ["c", "d"], ("advantages",): [0.5, -0.5], ("rewards", "r"): [1.0, 0.0],
              ("extra", "note"): ["x", "y"]}
    picked = take_table_rows([first, second], torch.tensor([3, 2, 0]))  # rows of the rounds concatenated
    assert picked == {("prompt",): ["d", "c", "a"], ("advantages",): [-0.5, 0.5, 0.0],
                      ("rewards", "r"): [0.0, 1.0, 1.0],
                      ("extra", "note"): ["y", "x", None]}  # the first round had no 'note' column


def test_pad_to_width_leaves_vectors_alone():
    assert pad_to_width(torch.ones(3), 5, "right", 0).shape == (3,)
    assert pad_to_width(torch.ones(2, 1), 3, "left", 7).tolist() == [[7, 7, 1], [7, 7, 1]]


def test_unknown_rollout_entries_cannot_be_merged():
    with pytest.raises(NotImplementedError, match=r"pixel_values.*dynamic_sampling='filter'"):
        check_mergeable({**rollout(1, 1, 1), "pixel_values": torch.ones(1, 3)})


def test_a_group_trains_when_any_of_its_rows_does():
    rows = torch.tensor([False, False, False, True, False, False, False, False, True])
    assert groups_that_train(rows, 3).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="groups of 4"):
        groups_that_train(rows, 4)
