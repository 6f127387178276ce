"""Two real processes (torchrun, gloo on CPU) stay in step through a refill and a reference reset."""

import pytest
import torch

from conftest import torchrun


@pytest.mark.slow
def test_two_ranks_refill_and_reset_in_step(tmp_path, student_path):
    torchrun("prorl_two_ranks.py", str(tmp_path), timeout=400)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2 and "MULTI_CPU" in rank0["distributed_type"]
    assert len(rank0["batches"]) == len(rank1["batches"]) == 3

    moved_across_ranks = False
    for b0, b1 in zip(rank0["batches"], rank1["batches"]):
        # Same decision everywhere: same number of rounds, same informative counts, same slot filling.
        for key in ("rounds", "informative_per_round", "selection", "num_items_in_batch"):
            assert b0[key] == b1[key], key
        assert b0["rows"] == b1["rows"] == 6  # each rank keeps the batch size TRL expects
        # The two local slices form the global batch: whole groups of 4, only informative (odd-answer) prompts.
        answers, kept = b0["answers"] + b1["answers"], b0["kept"] + b1["kept"]
        keep_slots = b0["selection"][2]
        for slot in range(3):
            group = answers[4 * slot : 4 * slot + 4]
            assert len(set(group)) == 1
            assert all(kept[4 * slot : 4 * slot + 4]) == keep_slots[slot]
            if keep_slots[slot]:
                assert group[0] % 2 == 1
        # The token count TRL normalizes by is the kept tokens of both ranks.
        assert b0["num_items_in_batch"] == b0["tokens"] + b1["tokens"]
        rounds, groups, _ = b0["selection"]
        moved_across_ranks |= any(r > 0 for r in rounds)
    assert moved_across_ranks  # at least one refill group was moved into the batch across ranks

    assert rank0["resets"] == rank1["resets"] == [{"step": 2, "reason": "schedule", "requested_at": 2}]
    assert rank0["kl"] == pytest.approx(rank1["kl"])
    # Every prorl/ metric is the same on both ranks, refill_seconds included (the slowest process's).
    assert any("prorl/refill_seconds" in entry for entry in rank0["prorl_logs"])
    assert rank0["prorl_logs"] == rank1["prorl_logs"]
    assert rank0["kl"][1] > 0 and rank0["kl"][2] == pytest.approx(0.0, abs=1e-7)  # the rollout after the reset
    assert rank0["policy_checksum"] == pytest.approx(rank1["policy_checksum"], rel=1e-9)  # DDP kept replicas equal
    assert rank0["reference_checksum"] == pytest.approx(rank1["reference_checksum"], rel=1e-9)
