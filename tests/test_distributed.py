"""A real two-process run (torchrun, gloo on CPU): statistics are global and identical on both ranks."""

import pytest
import torch

from conftest import torchrun
from trl_ext.core.stats import masked_moments


@pytest.mark.slow
def test_two_ranks_share_global_mean_and_std(tmp_path, student_path, teacher_path):
    # The fixtures build the demo models once, before the two ranks start.
    torchrun("gndpo_two_ranks.py", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert "MULTI_CPU" in rank0["distributed_type"]
    assert len(rank0["rollouts"]) == len(rank1["rollouts"]) >= 1
    for r0, r1 in zip(rank0["rollouts"], rank1["rollouts"]):
        # Both ranks see the same mu and sigma ...
        assert r0["mean"] == pytest.approx(r1["mean"], abs=1e-9)
        assert r0["var"] == pytest.approx(r1["var"], abs=1e-9)
        # ... and they are the statistics of the union of both ranks' tokens, not of either rank alone.
        whole = masked_moments(torch.cat([r0["scores"].flatten(), r1["scores"].flatten()]),
                               torch.cat([r0["mask"].flatten(), r1["mask"].flatten()]))
        assert r0["mean"] == pytest.approx(whole.mean.item(), abs=1e-6)
        assert r0["var"] == pytest.approx(whole.var.item(), abs=1e-6)
        alone = masked_moments(r0["scores"], r0["mask"])
        assert abs(alone.mean.item() - whole.mean.item()) > 1e-6 or abs(alone.var.item() - whole.var.item()) > 1e-6
    # DDP kept the replicas identical.
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)


@pytest.mark.slow
# steps_per_generation 2: two rollouts per optimizer window of 4 micro-steps; "survivors": the loss normalizer counts
# the kept tokens of both ranks.
@pytest.mark.parametrize("steps_per_generation, normalizer", [(4, "all_tokens"), (2, "all_tokens"), (4, "survivors")])
def test_gate_with_different_survivors_per_rank_stays_in_step(tmp_path, steps_per_generation, normalizer):
    from trl_ext import demo

    demo.student_path("reversal")  # build the model once, before the two ranks start
    # A hang would hit the timeout and fail.
    torchrun("delight_two_ranks.py", str(tmp_path), str(steps_per_generation), normalizer)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == 2
    assert len(rank0["kept"]) == len(rank1["kept"]) == 4 * 4 // steps_per_generation  # 4 optimizer steps
    assert rank0["kept"] != rank1["kept"]  # the ranks really had different numbers of survivors
    assert rank0["history"] == rank1["history"]  # the price history is identical on every rank
    for (kept0, normalizer0), (kept1, normalizer1) in zip(rank0["tokens"], rank1["tokens"], strict=True):
        assert normalizer0 == normalizer1  # one global count
        if normalizer == "survivors":
            assert normalizer0 == kept0 + kept1
    assert rank0["counters"]["micro_batches_skipped"] == rank1["counters"]["micro_batches_skipped"] > 0
    for name, value in rank0["parameters"].items():
        assert torch.equal(value, rank1["parameters"][name]), name


@pytest.mark.slow
def test_sharded_teacher_state_is_saved_whole_and_restored_into_each_shard(tmp_path):
    """FSDP2 shards a teacher copy over the ranks: its checkpointed weights must be the full ones (trl_ext's
    core/full_state.py gathers them for rank 0 to write) and loading must put each rank's part back. The reference
    reset's copy into another sharded module (shard to shard) and into an unsharded one must yield the full weights."""
    torchrun("full_state_two_ranks.py", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank1["saved"] is None  # only the writing rank keeps the gathered copy
    assert rank0["local_rows"] == [3, 3, 1, 1]  # really sharded: each rank held half of every parameter's rows
    assert rank0["saved"]
    for saved, expected in zip(rank0["saved"], rank0["expected"], strict=True):
        assert torch.equal(saved, expected)
    for rank in (rank0, rank1):
        for restored, expected in zip(rank["restored"], rank0["expected"], strict=True):
            assert torch.equal(restored, expected)
        # The reference reset's copy of the module's parameters.
        for target in ("sharded", "plain"):
            for copied, expected in zip(rank["copied"][target], rank0["expected_parameters"], strict=True):
                assert torch.equal(copied, expected), target
